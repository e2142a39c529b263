"""The Numba printer: SymPy expressions as Python source that Numba compiles, with the
numerical guards the kernels need (clipped inverse trigonometric functions and fractional powers,
float literals, a default branch for every Piecewise, the Heaviside convention of
:mod:`symntk.numeric`)."""
from __future__ import annotations

import keyword
import re

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ..numeric import heaviside_h0

__all__ = ["NumbaPrinter", "identifier"]


def _float(x) -> str:
    v = float(x)
    if v != v or v in (float("inf"), float("-inf")):
        return {"nan": "math.nan", "inf": "math.inf", "-inf": "-math.inf"}[repr(v)]
    return repr(v)


class NumbaPrinter(PythonCodePrinter):
    """Python source that Numba compiles, with numerical guards against rounding and
    undefined branches:

    * numbers print as float literals (``169/100 -> 1.69``): no integer arithmetic in kernels;
    * ``acos``/``asin`` are the module's ``_acos``/``_asin``, which clip their argument into
      [-1, 1] (rounding pushes correlations past 1) and, being polynomials, vectorise;
    * fractional powers clip the base at 0 (``sqrt(1 - c**2)`` at c = 1 + 1e-16);
    * ``Max``/``Min`` print as nested builtin ``max``/``min`` of two arguments;
    * ``Heaviside`` uses its value at 0 (:func:`symntk.numeric.heaviside_h0`) as the default
      branch, ``sign`` 0;
    * ``Piecewise`` always has a default branch (NaN when no condition holds: never a silent value);
    * ``SafePow(x, p)`` is ``x**p if x > 0 else 0``.

    ``names`` maps SymPy symbols to the code that reads them (locals, table entries, parameters).
    """
    printmethod = "_numbacode"

    def __init__(self, names: dict | None = None):
        super().__init__({"fully_qualified_modules": True, "standard": "python3",
                          "allow_unknown_functions": False})
        self.names = names if names is not None else {}

    # -- atoms
    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        return identifier(expr.name)

    _print_Dummy = _print_Symbol

    def _print_Indexed(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise ValueError(f"no storage for {expr} in this function")

    def _print_Integer(self, expr):
        return _float(expr)

    def _print_Rational(self, expr):
        return _float(expr)

    def _print_Float(self, expr):
        return _float(expr)

    def _print_Half(self, expr):
        return "0.5"

    def _print_Zero(self, expr):
        return "0.0"

    def _print_One(self, expr):
        return "1.0"

    def _print_NegativeOne(self, expr):
        return "-1.0"

    def _print_Exp1(self, expr):
        return "math.e"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    # -- powers
    def _print_Pow(self, expr, rational=False):
        base, e = expr.base, expr.exp
        if base == sp.E:
            return f"math.exp({self._print(e)})"
        b = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
        if e.is_Integer:
            n = int(e)
            if n == 0:
                return "1.0"
            if n < 0:
                return f"(1.0 / ({self._print(sp.Pow(base, -n, evaluate=False))}))"
            if n == 1:
                return self._print(base)
            if n <= 3 and (base.is_Symbol or base.is_Atom):
                return "(" + "*".join([b] * n) + ")"
            return f"{b}**{n}"
        if e == sp.S.Half:
            return f"math.sqrt(max(0.0, {self._print(base)}))"
        if e == -sp.S.Half:
            return f"(1.0 / math.sqrt(max(0.0, {self._print(base)})))"
        if e.is_Rational and e.q == 2:
            return f"max(0.0, {self._print(base)})**{_float(e)}"
        return f"{b}**{self.parenthesize(e, sp.printing.precedence.PRECEDENCE['Pow'])}"

    def _print_SafePow(self, expr):
        x, p = expr.args
        xs = self._print(x)
        if p == -sp.S.Half:
            val = f"1.0 / math.sqrt({xs})"
        elif p == -1:
            val = f"1.0 / {xs}"
        elif p == sp.S.Half:
            val = f"math.sqrt({xs})"
        else:
            val = f"{xs}**{_float(p)}"
        return f"({val} if {xs} > 0.0 else 0.0)"

    # -- inverse trigonometric functions: clipped, branch-free helpers (see _HELPERS)
    def _print_acos(self, expr):
        return f"_acos({self._print(expr.args[0])})"

    def _print_asin(self, expr):
        return f"_asin({self._print(expr.args[0])})"

    # -- kinks
    def _minmax(self, expr, fn):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out

    def _print_Max(self, expr):
        return self._minmax(expr, "max")

    def _print_Min(self, expr):
        return self._minmax(expr, "min")

    def _print_Abs(self, expr):
        return f"abs({self._print(expr.args[0])})"

    def _print_Heaviside(self, expr):
        x = self._print(expr.args[0])
        h0 = heaviside_h0(expr)
        return f"(1.0 if {x} > 0.0 else (0.0 if {x} < 0.0 else {self._print(h0)}))"

    def _print_sign(self, expr):
        x = self._print(expr.args[0])
        return f"(1.0 if {x} > 0.0 else (-1.0 if {x} < 0.0 else 0.0))"

    def _print_Piecewise(self, expr):
        out = "math.nan"
        for e, c in reversed(expr.args):
            if c == sp.true:
                out = self._print(e)
            else:
                out = f"({self._print(e)} if {self._print(c)} else {out})"
        return out

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " and ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " or ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"(not {self._print(expr.args[0])})"

    def _print_Function(self, expr):
        raise NotImplementedError(f"no Numba code for the function {expr.func} in {expr}")

    def _print_Sum(self, expr):
        raise ValueError(f"a Sum reached the printer: {expr} (reductions are loops)")


_IDENT = re.compile(r"[^0-9a-zA-Z_]")


def identifier(name: str) -> str:
    """A valid, non-keyword Python identifier for a SymPy name."""
    out = _IDENT.sub("_", name)
    if not out or out[0].isdigit() or keyword.iskeyword(out):
        out = "v_" + out
    return out


def index_code(e) -> str:
    """An index expression (integers and the loop variable) as Python integer code."""
    e = sp.sympify(e)
    if e.is_Integer:
        return str(int(e))
    return sp.sstr(sp.expand(e))
