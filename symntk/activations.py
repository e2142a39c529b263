"""Activation registry and a safe formula parser.

Every activation is a SymPy expression in ONE canonical real variable :data:`X`
(``Symbol('x', real=True)``).  A single variable keeps the rest of symntk simple: a
Nonlin applies ``phi.xreplace({X: z})`` to a Gaussian ``z``, the derivative
``phi'`` needed by the backward pass (TP2 Eq. 8, Programs 1-2) is ``sympy.diff(phi, X)``,
and the Gaussian-expectation rules (:mod:`symntk.gaussian`, TP2 App. E) recognise
the heads that appear here (``Max(0, .)``, ``Heaviside``, ``erf``, ``exp``, ...).

Kinked activations are written with ``Max(0, .)`` on purpose: with a *real* symbol
SymPy differentiates ``Max(0, x)`` to ``Heaviside(x)`` and ``Max(0, -x)`` to
``-Heaviside(-x)``, so derivatives and expectations reduce to the ReLU/step entries
of the closed-form table.

**Jumps.**  A discontinuous activation (``sign``, ``Heaviside``/``step``, ``floor``,
``ceiling``, a ``Piecewise`` whose pieces do not meet) has a weak derivative with a
``DiracDelta`` at each jump, which is not polynomially bounded (TP2 Cor. 7.3 asks for it) and
would make the NTK's diagonal infinite.  symntk uses one convention everywhere instead: the
derivative *almost everywhere* (:func:`partial_derivative` drops the Dirac part), which is what
reverse-mode autodiff computes on a finite network (a jump is hit with probability zero) and what
Neural Tangents' ``stax.Sign`` uses (its NTK has a zero derivative term).  :func:`jump_points`
finds the jumps symbolically so that ``derive`` can say which nonlinearities had one.

User formulas (command line, files) are read by :func:`parse_formula`, a tokenizer
plus recursive-descent parser over a whitelist.  It never calls ``eval``,
``sympify`` or ``parse_expr`` on the text.
"""

from __future__ import annotations

import functools
import math
import re
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import sympy

__all__ = ["X", "ACTIVATIONS", "activation", "parse_formula", "derivative", "partial_derivative",
           "jump_points", "JumpWarning"]

#: The canonical activation variable.  ``real=True`` matters: it is what makes
#: ``diff(Max(0, x))`` come out as ``Heaviside(x)`` and ``diff(Abs(x))`` as ``sign(x)``.
X = sympy.Symbol("x", real=True)


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------
def _param(value: Any, name: str) -> sympy.Expr:
    """Convert an activation parameter to an exact SymPy number or expression.

    Python floats are read as the decimal they print as (``0.2 -> 1/5``): a symbolic
    library should not carry the binary rounding error of ``0.2`` into closed forms.
    Strings are refused (``strict=True``): text goes through :func:`parse_formula`.
    """
    if isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be a number, not {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"parameter {name!r} must be finite, got {value!r}")
        return sympy.Rational(repr(value))
    try:
        return sympy.sympify(value, strict=True)
    except sympy.SympifyError as exc:
        raise ValueError(f"parameter {name!r} must be a number or SymPy expression, got {value!r}") from exc


# --------------------------------------------------------------------------------------
# The registry: name -> constructor returning an expression in X
# --------------------------------------------------------------------------------------
def _sigmoid(z: sympy.Expr) -> sympy.Expr:
    return 1 / (1 + sympy.exp(-z))


def _leaky_relu(alpha: Any = 0.01) -> sympy.Expr:
    """``Max(0,x) - alpha*Max(0,-x)``: both pieces stay ReLUs of +-x (see module doc)."""
    a = _param(alpha, "alpha")
    return sympy.Max(0, X) - a * sympy.Max(0, -X)


def _monomial(k: Any = 2) -> sympy.Expr:
    """``x**k`` for an integer ``k >= 1`` (polynomially bounded, TP2 Setup A.5)."""
    k = _param(k, "k")
    if not (k.is_Integer and k >= 1):
        raise ValueError(f"monomial degree k must be an integer >= 1, got {k}")
    return X**k


def _polynomial(*coeffs: Any) -> sympy.Expr:
    """``c0 + c1*x + c2*x**2 + ...`` from ascending coefficients.

    Accepts ``polynomial([c0, c1, ...])`` or ``polynomial(c0, c1, ...)``.
    """
    if len(coeffs) == 1 and isinstance(coeffs[0], (list, tuple, sympy.Tuple)):
        coeffs = tuple(coeffs[0])
    if not coeffs:
        raise ValueError("polynomial needs at least one coefficient")
    expr = sympy.Add(*(_param(c, f"c{i}") * X**i for i, c in enumerate(coeffs)))
    if not expr.has(X):
        raise ValueError(f"polynomial {list(coeffs)} is constant; an activation must depend on x")
    return expr


#: name -> constructor.  Parametrised constructors take positional or keyword
#: parameters (``leaky_relu(alpha=0.01)``, ``monomial(k)``, ``polynomial(coeffs)``).
#: Read-only: add an activation by editing this table (tests iterate over it).
ACTIVATIONS: Mapping[str, Callable[..., sympy.Expr]] = MappingProxyType(
    {
        "relu": lambda: sympy.Max(0, X),
        "leaky_relu": _leaky_relu,
        # |x| as two ReLUs so that its derivative is Heaviside(x) - Heaviside(-x).
        "abs": lambda: sympy.Max(0, X) + sympy.Max(0, -X),
        "step": lambda: sympy.Heaviside(X),
        "erf": lambda: sympy.erf(X),
        "tanh": lambda: sympy.tanh(X),
        "sigmoid": lambda: _sigmoid(X),
        # GELU = x * Phi(x) with Phi the standard normal CDF.
        "gelu": lambda: X * (1 + sympy.erf(X / sympy.sqrt(2))) / 2,
        "sin": lambda: sympy.sin(X),
        "cos": lambda: sympy.cos(X),
        "exp": lambda: sympy.exp(X),
        "identity": lambda: X,
        "softplus": lambda: sympy.log(1 + sympy.exp(X)),
        "swish": lambda: X * _sigmoid(X),
        "silu": lambda: X * _sigmoid(X),
        "monomial": _monomial,
        "polynomial": _polynomial,
    }
)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
class _Token(NamedTuple):
    kind: str  # "num", "name", "op", "bad" (a character outside the grammar) or "end"
    text: str
    pos: int


# re.ASCII: Python's \d would otherwise accept non-ASCII digits.
_TOKEN_RE = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
    | (?P<op>\*\*|[-+*/^(),=\[\]])
    """,
    re.VERBOSE | re.ASCII,
)

_MAX_TEXT = 10_000  # characters; formulas are one-liners
_MAX_DEPTH = 100  # nesting of parentheses / unary signs / powers
_MAX_DIGITS = 10_000  # size of an exact number the parser may create


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            # Reported when the parser reaches it, so that errors come in reading order
            # ("__import__('os')" fails on the unknown name, not on the quote).
            tokens.append(_Token("bad", text[pos], pos))
            break
        if m.lastgroup != "ws":
            tokens.append(_Token(m.lastgroup, m.group(), pos))
        pos = m.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _number(tok: _Token, text: str) -> sympy.Rational:
    """Exact value of a numeric literal (``0.1 -> 1/10``, ``1e-3 -> 1/1000``)."""
    mantissa, _, exponent = tok.text.lower().partition("e")
    if exponent and abs(int(exponent)) > 400:
        raise ValueError(f"number {tok.text!r} at position {tok.pos} in {text!r} is out of range")
    return sympy.Rational(tok.text)


def _digits(q: sympy.Rational) -> float:
    return math.log10(max(abs(int(q.p)), int(q.q), 2))


def _power(base: sympy.Expr, exponent: sympy.Expr, tok: _Token, text: str) -> sympy.Expr:
    # SymPy evaluates numeric powers exactly; refuse "9**9**9"-style inputs up front.
    if base.is_Rational and exponent.is_Rational and abs(exponent) * _digits(base) > _MAX_DIGITS:
        raise ValueError(f"power at position {tok.pos} in {text!r} is too large to evaluate exactly")
    return sympy.Pow(base, exponent)


# --------------------------------------------------------------------------------------
# Whitelist of functions and constants accepted by parse_formula
# --------------------------------------------------------------------------------------
class _Fn(NamedTuple):
    arity: int | None  # None: one or more arguments
    build: Callable[..., sympy.Expr]


_FUNCTIONS: Mapping[str, _Fn] = MappingProxyType(
    {
        "exp": _Fn(1, sympy.exp),
        "log": _Fn(1, sympy.log),
        "sqrt": _Fn(1, sympy.sqrt),
        "sin": _Fn(1, sympy.sin),
        "cos": _Fn(1, sympy.cos),
        "tan": _Fn(1, sympy.tan),
        "tanh": _Fn(1, sympy.tanh),
        "sinh": _Fn(1, sympy.sinh),
        "cosh": _Fn(1, sympy.cosh),
        "erf": _Fn(1, sympy.erf),
        "erfc": _Fn(1, sympy.erfc),
        "Abs": _Fn(1, sympy.Abs),
        "abs": _Fn(1, sympy.Abs),
        "sign": _Fn(1, sympy.sign),
        "Max": _Fn(None, sympy.Max),
        "max": _Fn(None, sympy.Max),
        "Min": _Fn(None, sympy.Min),
        "min": _Fn(None, sympy.Min),
        "Heaviside": _Fn(1, sympy.Heaviside),
        "step": _Fn(1, sympy.Heaviside),
        "relu": _Fn(1, lambda z: sympy.Max(0, z)),
        "floor": _Fn(1, sympy.floor),
        "ceil": _Fn(1, sympy.ceiling),
        "sigmoid": _Fn(1, _sigmoid),
    }
)

_CONSTANTS: Mapping[str, sympy.Expr] = MappingProxyType({"pi": sympy.pi, "E": sympy.E})


class _Parser:
    """Recursive descent over the grammar (``^`` is a synonym of ``**``)::

        expr  := term (("+" | "-") term)*
        term  := unary (("*" | "/") unary)*
        unary := ("+" | "-") unary | power
        power := atom (("**" | "^") unary)?        # right-associative, -x**2 == -(x**2)
        atom  := NUMBER | NAME | NAME "(" expr ("," expr)* ")" | "(" expr ")"

    Call specs (``leaky_relu(alpha=0.2)``, ``polynomial([1, 0, 2])``) add keyword
    arguments and bracketed lists, see :meth:`call_spec`.
    """

    def __init__(self, text: str, variables: Mapping[str, sympy.Symbol]):
        if len(text) > _MAX_TEXT:
            raise ValueError(f"formula is too long ({len(text)} > {_MAX_TEXT} characters)")
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.depth = 0
        self.variables = variables

    # -- helpers ------------------------------------------------------------------------
    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, tok: _Token, what: str, hint: str = "") -> ValueError:
        if tok.kind == "bad":
            what = "unexpected character"
        shown = repr(tok.text) if tok.kind != "end" else "end of input"
        hint = f" ({hint})" if hint and tok.kind != "bad" else ""
        return ValueError(f"{what} {shown} at position {tok.pos} in {self.text!r}{hint}")

    def expect_op(self, op: str) -> _Token:
        if self.tok.kind != "op" or self.tok.text != op:
            raise self.error(self.tok, f"expected {op!r}, found")
        return self.advance()

    def at_op(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def nest(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error(tok, "formula nested too deeply")

    def finish(self) -> None:
        if self.tok.kind != "end":
            raise self.error(self.tok, "unexpected token")

    # -- grammar ------------------------------------------------------------------------
    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.at_op("+", "-"):
            op = self.advance().text
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while self.at_op("*", "/"):
            op = self.advance()
            rhs = self.unary()
            if op.text == "/" and rhs == 0:
                raise self.error(op, "division by zero")
            value = value * rhs if op.text == "*" else value / rhs
        return value

    def unary(self) -> sympy.Expr:
        if self.at_op("+", "-"):
            tok = self.advance()
            self.nest(tok)
            operand = self.unary()
            self.depth -= 1
            return -operand if tok.text == "-" else operand
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.at_op("**", "^"):
            tok = self.advance()
            self.nest(tok)
            exponent = self.unary()
            self.depth -= 1
            return _power(base, exponent, tok, self.text)
        return base

    def atom(self) -> sympy.Expr:
        tok = self.tok
        if tok.kind == "num":
            self.advance()
            return _number(tok, self.text)
        if tok.kind == "name":
            self.advance()
            if self.at_op("("):
                return self.call(tok)
            if tok.text in self.variables:
                return self.variables[tok.text]
            if tok.text in _CONSTANTS:
                return _CONSTANTS[tok.text]
            known = ", ".join(list(self.variables) + list(_CONSTANTS))
            raise self.error(tok, "unknown name", f"allowed names: {known}")
        if self.at_op("("):
            self.advance()
            self.nest(tok)
            value = self.expr()
            self.expect_op(")")
            self.depth -= 1
            return value
        raise self.error(tok, "unexpected token")

    def call(self, name: _Token) -> sympy.Expr:
        fn = _FUNCTIONS.get(name.text)
        if fn is None:
            raise self.error(name, "unknown function", f"allowed functions: {', '.join(_FUNCTIONS)}")
        self.nest(self.expect_op("("))
        args = [self.expr()]
        while self.at_op(","):
            self.advance()
            args.append(self.expr())
        self.expect_op(")")
        self.depth -= 1
        if fn.arity is not None and len(args) != fn.arity:
            raise self.error(name, "wrong number of arguments for function", f"expected {fn.arity}, got {len(args)}")
        return fn.build(*args)

    # -- activation call specs: NAME "(" [param ("," param)*] ")" ----------------------
    def call_spec(self) -> tuple[str, list[Any], dict[str, Any]]:
        """Parse ``name(p, ..., key=p)`` where each ``p`` is a constant or ``[p, ...]``."""
        name = self.advance()
        if name.kind != "name":
            raise self.error(name, "expected an activation name, found")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if self.at_op("("):
            self.advance()
            while not self.at_op(")"):
                if self.tok.kind == "name" and self.tokens[self.i + 1].text == "=":
                    key = self.advance().text
                    self.advance()
                    kwargs[key] = self.spec_value()
                elif kwargs:
                    raise self.error(self.tok, "positional parameter after keyword parameter")
                else:
                    args.append(self.spec_value())
                if not self.at_op(")"):
                    self.expect_op(",")
            self.advance()
        self.finish()
        return name.text, args, kwargs

    def spec_value(self) -> Any:
        if self.at_op("["):
            self.advance()
            items = [] if self.at_op("]") else [self.expr()]
            while self.at_op(","):
                self.advance()
                items.append(self.expr())
            self.expect_op("]")
            return items
        return self.expr()


def _variable_table(variables: Sequence[str]) -> dict[str, sympy.Symbol]:
    if isinstance(variables, str):
        variables = (variables,)
    table: dict[str, sympy.Symbol] = {}
    for name in variables:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", name, re.ASCII):
            raise ValueError(f"variable name {name!r} is not an identifier")
        if name in _FUNCTIONS or name in _CONSTANTS:
            raise ValueError(f"variable name {name!r} clashes with a function or constant")
        table[name] = sympy.Symbol(name, real=True)
    return table


def parse_formula(text: str, variables: Sequence[str] = ("x",)) -> sympy.Expr:
    """Parse a user formula into a SymPy expression without evaluating the text.

    Accepted: numbers (``2``, ``0.5``, ``.5``, ``1e-3``; read *exactly*, so
    ``0.5*x`` is ``x/2``), the names in ``variables`` (real symbols, so ``"x"`` gives
    :data:`X`), the constants ``pi`` and ``E``, the operators ``+ - * / ** ^``
    (``^`` is power), parentheses, unary signs, and the whitelisted functions
    ``exp log sqrt sin cos tan tanh sinh cosh erf erfc Abs/abs sign Max/max Min/min
    Heaviside/step floor ceil relu sigmoid``.  ``relu(z)`` becomes ``Max(0, z)`` and
    ``sigmoid(z)`` becomes ``1/(1 + exp(-z))``.

    Anything else raises :class:`ValueError` naming the offending token and its
    position, e.g. ``parse_formula("open(1)")`` or ``parse_formula("x.real")``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_formula expects a string, got {type(text).__name__}")
    parser = _Parser(text, _variable_table(variables))
    if parser.tok.kind == "end":
        raise ValueError("empty formula")
    value = parser.expr()
    parser.finish()
    return value


# --------------------------------------------------------------------------------------
# activation() and derivative()
# --------------------------------------------------------------------------------------
def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown activation {name!r}; known activations: {', '.join(sorted(ACTIVATIONS))}")


def _from_registry(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> sympy.Expr:
    try:
        return ACTIVATIONS[name](*args, **kwargs)
    except TypeError as exc:  # wrong number / names of parameters
        raise ValueError(f"bad parameters for activation {name!r}: {exc}") from exc


def _from_string(spec: str) -> sympy.Expr:
    text = spec.strip()
    if re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", text, re.ASCII) and text != "x":
        if text not in ACTIVATIONS:
            raise _unknown(text)
        return _from_registry(text, (), {})
    head = re.match(r"\s*([A-Za-z_][A-Za-z_0-9]*)\s*\(", text, re.ASCII)
    if head and head.group(1) in ACTIVATIONS:
        # "leaky_relu(0.2)" is a call spec; "tanh(x)" is a formula in x.
        try:
            name, args, kwargs = _Parser(text, {}).call_spec()
        except ValueError as spec_error:
            try:
                return parse_formula(text, ("x",))
            except ValueError:
                raise spec_error from None
        return _from_registry(name, args, kwargs)
    try:
        return parse_formula(text, ("x",))
    except ValueError as exc:
        if head and head.group(1) not in _FUNCTIONS and head.group(1) not in ACTIVATIONS:
            raise _unknown(head.group(1)) from exc
        raise


def activation(spec: str | sympy.Expr | sympy.Lambda) -> sympy.Expr:
    """Return the activation described by ``spec`` as an expression in :data:`X`.

    ``spec`` may be

    * a registered name: ``"relu"``;
    * a call spec of a registered name: ``"leaky_relu(0.2)"``, ``"monomial(3)"``,
      ``"leaky_relu(alpha=0.2)"``, ``"polynomial([1, 0, 2])"``;
    * a formula in ``x`` read by :func:`parse_formula`: ``"x*tanh(x)"``;
    * a SymPy expression in exactly one free symbol (renamed to :data:`X`);
    * a ``sympy.Lambda`` of one variable (its body may hold further parameters).

    Unknown names raise :class:`ValueError` listing the known activations.
    """
    if isinstance(spec, str):
        return _from_string(spec)
    if isinstance(spec, sympy.Lambda):
        if len(spec.variables) != 1:
            raise ValueError(f"activation Lambda must take one variable, got {len(spec.variables)}: {spec}")
        return spec.expr.xreplace({spec.variables[0]: X})
    if isinstance(spec, sympy.Basic):
        if not isinstance(spec, sympy.Expr):
            raise TypeError(f"activation must be a SymPy expression, got {type(spec).__name__}")
        free = spec.free_symbols
        if len(free) != 1:
            raise ValueError(
                f"activation expression {spec} must have exactly one free symbol, found "
                f"{len(free)} ({', '.join(sorted(map(str, free))) or 'none'}); "
                "use sympy.Lambda(x, ...) for activations with parameters"
            )
        (sym,) = free
        return spec.xreplace({sym: X})
    raise TypeError(f"cannot make an activation from {type(spec).__name__}: {spec!r}")


# A derivative still holding one of these heads is not an ordinary function.
_NOT_DIFFERENTIABLE = (sympy.Derivative, sympy.Subs)

#: Integer-valued steps: piecewise constant, jumping wherever their argument crosses an integer.
_INTEGER_STEPS = (sympy.floor, sympy.ceiling)


class JumpWarning(UserWarning):
    """A nonlinearity jumps: its NTK uses the derivative almost everywhere (zero at the jump)."""


def _without_frac(expr: sympy.Expr) -> sympy.Expr:
    return expr.replace(lambda e: isinstance(e, sympy.frac),
                        lambda e: e.args[0] - sympy.floor(e.args[0]))


def partial_derivative(expr: sympy.Expr, var: sympy.Symbol, what: str) -> sympy.Expr:
    """``d expr / d var`` almost everywhere.

    The Dirac part of the weak derivative (``DiracDelta`` at the jumps of ``sign``, ``Heaviside``;
    SymPy already differentiates a ``Piecewise`` piece by piece) is dropped and the derivative of
    ``floor``/``ceiling`` is 0: the derivative autodiff computes at finite width and Neural Tangents'
    ``Sign`` uses.  An unevaluated ``Derivative`` or ``Subs`` of anything else raises
    :class:`ValueError` naming ``what``.  Which activations jump is :func:`jump_points`' business.
    """
    d = sympy.diff(_without_frac(expr), var)
    d = d.replace(lambda e: isinstance(e, sympy.DiracDelta), lambda e: sympy.S.Zero)
    d = d.replace(lambda e: isinstance(e, sympy.Derivative) and isinstance(e.expr, _INTEGER_STEPS),
                  lambda e: sympy.S.Zero)
    d = d.replace(lambda e: isinstance(e, sympy.Subs) and e.expr == 0, lambda e: sympy.S.Zero)
    bad = sorted({type(a).__name__ for a in d.atoms(*_NOT_DIFFERENTIABLE)})
    if bad:
        raise ValueError(f"{what} {expr} is not differentiable in the sense the NTK needs: "
                         f"its derivative {d} contains {', '.join(bad)}")
    return d


_EPS = sympy.Symbol("epsilon", positive=True)


@functools.lru_cache(maxsize=1024)
def jump_points(expr: sympy.Expr, var: sympy.Symbol) -> tuple[sympy.Expr, ...]:
    """Where ``expr`` jumps as a function of ``var``: a tuple of conditions, ``Eq(x, 0)`` for a
    point, ``Contains(u, Integers)`` for a ``floor``/``ceiling`` of u (it jumps wherever u is an
    integer).  Empty for a continuous function.

    Candidates are the zeros of the arguments of ``Heaviside`` and ``sign`` and the boundaries of
    ``Piecewise`` conditions; a candidate p is a jump when the one-sided limits
    lim_{eps -> 0+} expr(p -+ eps) differ (so ``x sign(x)`` and ``Max(0, x)`` are not jumps).
    A difference SymPy cannot prove zero counts as a jump.
    """
    expr = _without_frac(expr)
    found: list[sympy.Expr] = [sympy.Contains(a.args[0], sympy.Integers)
                               for a in expr.atoms(*_INTEGER_STEPS) if var in a.free_symbols]
    edges = [a.args[0] for a in expr.atoms(sympy.Heaviside, sympy.sign)]
    edges += [r.lhs - r.rhs for pw in expr.atoms(sympy.Piecewise) for _, cond in pw.args
              for r in (cond.atoms(sympy.core.relational.Relational) if cond is not sympy.true else ())]
    points = []
    for edge in edges:
        if var not in edge.free_symbols:
            continue
        try:
            roots = sympy.solve(edge, var)
        except NotImplementedError:
            roots = []
        points.extend(r for r in roots if r not in points and r.is_extended_real is not False)
    for p in points:
        try:
            left = sympy.limit(expr.subs(var, p - _EPS), _EPS, 0, "+")
            right = sympy.limit(expr.subs(var, p + _EPS), _EPS, 0, "+")
            jump = sympy.simplify(right - left) != 0
        except (NotImplementedError, ValueError, TypeError):
            jump = True
        if jump:
            found.append(sympy.Eq(var, p))
    return tuple(found)


def derivative(spec: str | sympy.Expr | sympy.Lambda) -> sympy.Expr:
    """``phi'(x) = d phi / dx`` for any ``spec`` accepted by :func:`activation`.

    With the real :data:`X`, ``relu' = Heaviside(x)``, ``|x|' = sign(x)``,
    ``leaky_relu' = Heaviside(x) + alpha*Heaviside(-x)`` and ``step' = sign' = 0`` (almost
    everywhere, see :func:`partial_derivative`).
    """
    return partial_derivative(activation(spec), X, "activation")
