"""Values of model symbols given by the user: by SymPy symbol or by its name.

``params={sigma_w: 1.4}`` and ``params={"sigma_w": 1.4}`` mean the same.  A symbol is looked up
first as itself, then by name: the same name may carry different assumptions in different nodes
(``Symbol("n")`` and ``Symbol("n", positive=True)`` are different SymPy symbols but one model
quantity).  Every path that binds values (the reference evaluator, the compiled kernels, the code
generator's loop bounds, the finite-width networks) binds them here.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import sympy as sp

__all__ = ["by_name", "bind", "subs_by_name", "bind_parameters"]


def by_name(mapping: Mapping | None, what: str = "params") -> dict[str, object]:
    """``{name: value}`` from a dict keyed by symbols or names; a clear error for other keys."""
    out = {}
    for key, value in dict(mapping or {}).items():
        name = key.name if isinstance(key, sp.Symbol) else key
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be SymPy symbols or their names, got {key!r}")
        out[name] = value
    return out


def bind(symbols: Iterable[sp.Symbol], params: Mapping | None, what: str = "params"
         ) -> tuple[dict, list[str]]:
    """``(bound, missing)``: the value of each symbol (by symbol, else by name) and the sorted
    names of those with none (``None`` counts as none); callers say what a missing one means."""
    params = dict(params or {})
    names = by_name(params, what)
    bound, missing = {}, []
    for s in sorted(symbols, key=str):
        value = params.get(s)
        if value is None:
            value = names.get(s.name)
        if value is None:
            missing.append(s.name)
        else:
            bound[s] = value
    return bound, missing


def subs_by_name(expr: sp.Expr, binding: Mapping[sp.Symbol, object]) -> sp.Expr:
    """``expr`` with every free symbol whose *name* is bound replaced by its value."""
    names = {s.name: v for s, v in binding.items()}
    return expr.xreplace({s: names[s.name] for s in expr.free_symbols if s.name in names})


def bind_parameters(derivation, params: Mapping | None, dim: int) -> dict:
    """Every free model symbol of ``derivation`` (variances, widths) mapped to its value.

    A symbolic input dimension ``d`` takes ``dim``, the number of features of the data; a value
    passed for it must agree.  ``ValueError`` naming the symbols left unbound.
    """
    dims = {inp.dim for inp in derivation.program.inputs if isinstance(inp.dim, sp.Symbol)}
    bound, missing = bind(set(derivation.parameters()) | dims, params)
    for s in dims:
        if s in bound and float(bound[s]) != dim:
            raise ValueError(f"params give the input dimension {s} = {bound[s]} but the data "
                             f"have {dim} features")
        bound[s] = dim
    missing = [m for m in missing if m not in {s.name for s in dims}]
    if missing:
        raise ValueError(f"unbound symbols {missing}: pass them in params=")
    return bound
