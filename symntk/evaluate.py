"""Direct NumPy evaluation of a :class:`~symntk.derivation.Derivation` (the reference path).

Every equation is lambdified once and evaluated for all pairs of inputs at once by broadcasting:
symbols of input copy xi have shape (N1, 1), of xi' shape (1, N2), cross-input symbols (N1, N2).
This is the readable, slow-to-start reference; :mod:`symntk.codegen` is the fast path.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from .binding import bind_parameters
from .equations import Derivation, Equation, Loop
from .gaussian import GaussianExpectation
from .numeric import lambdify
from .quadrature import gaussian_expectation
from .result import KernelResult, check_pair, squared_distances

__all__ = ["gram", "evaluate_pair"]


def _expectation_nodes(expr):
    return sorted(expr.atoms(GaussianExpectation), key=sp.default_sort_key)


def _quadrature(node, values, consts, idx):
    """Numeric value of an unevaluated Gaussian expectation, for every input pair at once."""
    integrand, variables, cov = node.args[0], tuple(node.args[1]), node.args[2]
    k = len(variables)
    entries = [[_value(cov[i, j], values, consts, idx) for j in range(k)] for i in range(k)]
    shape = np.broadcast_shapes(*[np.shape(e) for row in entries for e in row])
    S = np.empty(shape + (k, k))
    for i in range(k):
        for j in range(k):
            S[..., i, j] = np.broadcast_to(entries[i][j], shape)
    # Other symbols in the integrand (model constants, or derived per-input scalars such as a
    # Moment) are extra arguments, broadcast over the quadrature grid by a trailing axis.
    extra = sorted(integrand.atoms(sp.Indexed), key=str) + sorted(
        (s for s in integrand.free_symbols - set(variables) if not isinstance(s, sp.Indexed)
         and not any(s in i.free_symbols for i in integrand.atoms(sp.Indexed))), key=str)
    dummies = [sp.Dummy() for _ in extra]
    body = integrand.xreplace(dict(zip(extra, dummies)))
    vals = [np.asarray(_value(e, values, consts, idx), dtype=np.float64) for e in extra]
    f = lambdify(tuple(variables) + tuple(dummies), body, guarded=True)
    vals = [np.broadcast_to(v, shape)[..., None] for v in vals]
    return gaussian_expectation(lambda *u: f(*u, *vals), S)


def gram(derivation: Derivation, X1, X2=None, params: dict | None = None,
         diagonal: bool = False) -> KernelResult:
    """NNGP and NTK Gram matrices K[i, j] = k(X1[i], X2[j]).

    ``X2=None`` means X2 = X1; the diagonal k(x, x) then comes from the derivation's diagonal
    system (both copies one input), which is exact where the pair formulas lose digits to
    cancellation at correlation 1.  ``diagonal=True`` returns only k(x, x), shape (N1,).
    """
    if diagonal or X2 is None:
        diag = _diagonal(derivation, X1, params)
        if diagonal:
            return diag
    if X2 is None:
        full = _gram(derivation, X1, X1, params)
        _refuse_nan(full, diag)
        idx = np.diag_indices(full.ntk.shape[0])
        for K, k in [(full.ntk, diag.ntk), (full.nngp, diag.nngp)] + \
                [(full.ntk_terms[n], diag.ntk_terms[n]) for n in full.ntk_terms]:
            if K is not None:
                K[idx] = k
        return full
    result = _gram(derivation, X1, X2, params)
    _refuse_nan(result)
    return result


def _refuse_nan(*results):
    """Never a silent wrong number.  (A zero variance is not one: the numeric form of the
    derivation takes the closed-form table's zero-variance limits, as the compiled kernel does.)"""
    for r in results:
        for K in (r.ntk, r.nngp):
            if K is not None and not np.all(np.isfinite(K)):
                raise ValueError(
                    "the NumPy reference evaluator produced NaN/inf (the recursion overflows "
                    "float64 or an expectation has no finite value at these inputs)")


def _diagonal(derivation: Derivation, X, params) -> KernelResult:
    if derivation.diagonal is None:
        raise ValueError("this derivation has no diagonal system")
    r = _gram(derivation.diagonal, X, X[:1] if np.ndim(X) == 2 else X, params, rows_only=True)
    return KernelResult(None if r.nngp is None else r.nngp[:, 0], r.ntk[:, 0],
                        {k: v[:, 0] for k, v in r.ntk_terms.items()})


def _gram(derivation: Derivation, X1, X2, params, rows_only: bool = False) -> KernelResult:
    derivation = derivation.numeric()
    inputs = derivation.program.inputs
    if len(inputs) != 1:
        raise NotImplementedError("programs with several Input nodes need a dict of inputs")
    X1, X2 = check_pair(X1, X2, inputs[0].dim)
    dim = X1.shape[1]
    values: dict = {}
    for sym, info in derivation.inputs.items():
        i, j = info.copies
        A = X1 if i == 0 else X2
        B = X1 if j == 0 else X2
        if info.extra.get("distance"):         # ||xi - xi'||^2 / d, for stable correlations
            values[sym] = squared_distances(A, B)
        elif i == j == 0:
            values[sym] = (np.einsum("ij,ij->i", A, A) / dim)[:, None]
        elif i == j == 1:
            values[sym] = (np.einsum("ij,ij->i", B, B) / dim)[None, :]
        else:
            values[sym] = A @ B.T / dim
    consts = bind_parameters(derivation, params, dim)
    _run(derivation, values, consts)
    shape = (X1.shape[0], 1 if rows_only else X2.shape[0])
    terms = {k: np.broadcast_to(_value(v, values, consts), shape).copy()
             for k, v in derivation.ntk_terms.items()}
    ntk = np.broadcast_to(_value(derivation.ntk, values, consts), shape).copy()
    nngp = None if derivation.nngp is None else \
        np.broadcast_to(_value(derivation.nngp, values, consts), shape).copy()
    return KernelResult(nngp, ntk, terms)


def evaluate_pair(derivation: Derivation, x1, x2=None, params: dict | None = None):
    """(nngp, ntk) for one pair of inputs."""
    x1 = np.atleast_2d(np.asarray(x1, dtype=float))
    x2 = x1 if x2 is None else np.atleast_2d(np.asarray(x2, dtype=float))
    r = gram(derivation, x1, x2, params)
    return (None if r.nngp is None else float(r.nngp[0, 0])), float(r.ntk[0, 0])


def _run(derivation: Derivation, values: dict, consts: dict):
    for step in derivation.steps:
        if isinstance(step, Loop):
            start = int(sp.sympify(step.start).subs(consts))
            stop = int(sp.sympify(step.stop).subs(consts))
            ls = range(start, stop + 1) if step.direction > 0 else range(stop, start - 1, -1)
            for lv in ls:
                for eq in step.equations:
                    _assign(eq, values, consts, {step.index: lv})
        else:
            _assign(step, values, consts, {})


def _key(lhs, consts, idx):
    if isinstance(lhs, sp.Indexed):
        return (lhs.base.label, int(lhs.indices[0].subs(idx).subs(consts)))
    return lhs


def _assign(eq: Equation, values, consts, idx):
    values[_key(eq.lhs, consts, idx)] = _value(eq.rhs, values, consts, idx)


def _value(expr, values, consts, idx=None):
    idx = idx or {}
    expr = sp.sympify(expr)
    if isinstance(expr, sp.Add) and any(isinstance(a, sp.Sum) for a in expr.args):
        return sum((_value(a, values, consts, idx) for a in expr.args), start=0.0)
    if isinstance(expr, sp.Sum):
        (l, lo, hi), = expr.limits
        lo, hi = int(sp.sympify(lo).subs(consts)), int(sp.sympify(hi).subs(consts))
        return sum((_value(expr.function, values, consts, {**idx, l: v})
                    for v in range(lo, hi + 1)), start=0.0)
    args, vals = [], []
    sub = {}
    for node in _expectation_nodes(expr):
        dummy = sp.Dummy()
        sub[node] = dummy
        args.append(dummy)
        vals.append(_quadrature(node, values, consts, idx))
    expr = expr.xreplace(sub)
    for ind in expr.atoms(sp.Indexed):
        key = _key(ind, consts, idx)
        if key not in values:
            raise KeyError(f"{ind} (index {key[1]}) is used before it is computed")
        dummy = sp.Dummy()
        sub[ind] = dummy
        args.append(dummy)
        vals.append(values[key])
    expr = expr.xreplace(sub)
    for s in expr.free_symbols:
        if s in sub.values():
            continue
        if s in values:
            args.append(s)
            vals.append(values[s])
        elif s in consts:
            args.append(s)
            vals.append(consts[s])
        elif s in idx:
            args.append(s)
            vals.append(idx[s])
        else:
            raise KeyError(f"symbol {s} has no value")
    with np.errstate(invalid="ignore", divide="ignore"):   # Piecewise evaluates every branch
        return np.asarray(lambdify(args, expr, guarded=True)(*vals), dtype=np.float64)
