"""Limits of individual program quantities: E[psi(Z^x, Z^{dx}, ...)] (TP2 Box 1, TP3 Thm 2.10).

    symntk.expectation(program, lambda Z, dZ: Z(x) ** 2, mode="exact")

is lim (1/n) sum_alpha x_alpha^2 as a SymPy expression (in the input kernels ``xi.xi/d``, which
``x=`` binds).  ``dZ(node)`` is the cotangent dx = sqrt(n) df/dx.  Used to check the gradient
statistics of the GIA counterexamples (TP2 §6.3) and the Zhat/Zdot identities (TP3 §2-3).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import sympy as sp

from .program import Program
from .zcalculus import Engine, reduce_expectations

__all__ = ["expectation"]


def expectation(program: Program, fn: Callable, mode: str = "gia", x=None) -> sp.Expr:
    """E[fn(Z, dZ)] for one input (copy 0); ``x`` (an input vector) makes the value a number."""
    if program.repeats:
        program = program.unrolled()
    labels = {n: getattr(n, "name", None) or f"z{i}" for i, n in enumerate(program.nodes)}
    eng = Engine(program, lambda n: str(labels[n]), mode=mode)
    expr = eng.expect(fn(lambda node: eng.z(node, 0), lambda node: eng.dz(node, 0)))
    values = {}
    if x is not None:
        x = np.asarray(x, dtype=float).ravel()
        for sym in eng.input_kernels.values():
            values[sym] = sp.nsimplify(float(x @ x) / x.size)
    for sym, rhs in eng.equations:
        values[sym] = reduce_expectations(rhs.xreplace(values))
    return sp.simplify(reduce_expectations(expr.xreplace(values)))
