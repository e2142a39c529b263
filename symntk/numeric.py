"""SymPy heads as numeric functions: the one table behind every numeric path.

Three consumers evaluate SymPy expressions numerically without going through each other:

* NumPy arrays, through ``sympy.lambdify`` (the reference evaluator :mod:`symntk.evaluate` and the
  finite-width networks of :mod:`symntk.finite`): :func:`lambdify`;
* scalars in floats or ``mpmath.mp`` (the quadrature of :func:`symntk.gaussian.numeric_expectation`):
  :data:`SCALAR_HEADS` and :func:`scalar_function`;
* the generated Numba code, whose printer (:class:`symntk.codegen.printer.NumbaPrinter`) writes the
  same conventions as text.

**Heaviside convention.**  H(x) = 1 for x > 0, 0 for x < 0, and H(0) = h0, the node's own second
argument: SymPy stores ``Heaviside(x)`` as ``Heaviside(x, 1/2)``, so h0 = 1/2 unless an expression
says otherwise (:func:`heaviside_h0`).  No path substitutes a value of its own.  H(0) matters only
on a set of Gaussian measure zero, except at a degenerate input (a zero variance), where the
closed forms and the finite network must still agree.

**Guards.**  With ``guarded=True`` (the reference evaluator of the kernel recursions), ``acos``
and ``asin`` clip their argument into [-1, 1] and ``sqrt`` clips at 0: the recursions are exact
in real arithmetic, but rounding can push a correlation a hair past +-1 or a variance a hair
below 0.  The finite network evaluates the activation itself and is not guarded.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import sympy as sp

__all__ = ["HEAVISIDE_AT_ZERO", "heaviside_h0", "heaviside", "lambdify", "SCALAR_HEADS",
           "scalar_function"]

#: H(0) of a ``Heaviside(x)`` written without a second argument (SymPy's own default).
HEAVISIDE_AT_ZERO = sp.S.Half


def heaviside_h0(node: sp.Heaviside) -> sp.Expr:
    """The value at 0 of a Heaviside node: its second argument, else :data:`HEAVISIDE_AT_ZERO`."""
    return node.args[1] if len(node.args) > 1 else HEAVISIDE_AT_ZERO


def heaviside(x: Any, h0: Any = float(HEAVISIDE_AT_ZERO)) -> Any:
    """Scalar H(x): 1 for x > 0, 0 for x < 0, ``h0`` at 0."""
    return 1 if x > 0 else 0 if x < 0 else h0


# ---------------------------------------------------------------------------- NumPy (lambdify)
def _safe_pow(x, p):
    """:class:`symntk.gaussian.SafePow`: ``x**p`` where ``x > 0``, else 0 (zero-variance limit)."""
    x = np.asarray(x, dtype=np.float64)
    pos = x > 0
    return np.where(pos, np.power(np.where(pos, x, 1.0), p), 0.0)


_NUMPY = {"Heaviside": lambda x, h0=float(HEAVISIDE_AT_ZERO): np.heaviside(x, h0),
          "SafePow": _safe_pow}

_GUARDED = {
    **_NUMPY,
    "acos": lambda x: np.arccos(np.clip(x, -1.0, 1.0)),
    "asin": lambda x: np.arcsin(np.clip(x, -1.0, 1.0)),
    "sqrt": lambda x: np.sqrt(np.maximum(x, 0.0)),
}


def _scipy_available() -> bool:
    try:
        import scipy.special  # noqa: F401  (erf, gamma, ... live there)
    except ImportError:  # pragma: no cover - scipy is present wherever the tests run
        return False
    return True


def lambdify(args, expr, *, guarded: bool = False, scipy: bool = False) -> Callable:
    """``expr`` as a vectorised NumPy function of ``args`` (Heaviside as ``np.heaviside`` with
    the node's h0, not NumPyPrinter's slow ``select``).  ``guarded``: clipped ``acos``/``asin``/
    ``sqrt`` (module docstring); ``scipy``: special functions from SciPy where it is installed."""
    modules = [_GUARDED if guarded else _NUMPY]
    if scipy and _scipy_available():
        modules.append("scipy")
    modules.append("numpy")
    return sp.lambdify(args, expr, modules=modules)


# ---------------------------------------------------------------------------- scalars (mpmath)
def _float_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # keep IEEE semantics (mpmath.fp.exp gives inf too)
        return math.inf


def _float_log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf if x == 0 else math.nan


def _float_sign(x: float) -> float:
    return 1.0 if x > 0 else -1.0 if x < 0 else 0.0


#: SymPy head -> (float implementation for ``mpmath.fp``, ``mpmath.mp`` function name, or "" for
#: the Python function that serves both).  The float path uses :mod:`math` directly: the
#: ``mpmath.fp`` wrappers cost ~5x more per call.
SCALAR_HEADS: Mapping[type, tuple[Callable[..., Any], str]] = MappingProxyType(
    {
        sp.exp: (_float_exp, "exp"),
        sp.log: (_float_log, "log"),
        sp.sin: (math.sin, "sin"),
        sp.cos: (math.cos, "cos"),
        sp.tan: (math.tan, "tan"),
        sp.tanh: (math.tanh, "tanh"),
        sp.sinh: (math.sinh, "sinh"),
        sp.cosh: (math.cosh, "cosh"),
        sp.asin: (math.asin, "asin"),
        sp.acos: (math.acos, "acos"),
        sp.atan: (math.atan, "atan"),
        sp.erf: (math.erf, "erf"),
        sp.erfc: (math.erfc, "erfc"),
        sp.Abs: (abs, "fabs"),
        sp.sign: (_float_sign, "sign"),
        sp.Max: (max, ""),
        sp.Min: (min, ""),
        sp.Heaviside: (heaviside, ""),
    }
)


def scalar_function(head: type, ctx: Any) -> Callable[..., Any]:
    """The numeric function of ``head`` in the mpmath context ``ctx`` (``mpmath.fp`` or ``mp``)."""
    import mpmath
    as_float, name = SCALAR_HEADS[head]
    if ctx is mpmath.fp or not name:
        return as_float
    return getattr(ctx, name)
