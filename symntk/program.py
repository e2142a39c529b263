"""The tensor-program IR (NETSOR-T, TP2 Def. 7.1; TP3 Def. 2.1).

A program is a graph of immutable SymPy ``Basic`` nodes.  Equality is structural, so a weight used
twice *is* one node, and questions of weight sharing and transposes are questions about the graph.

Node kinds (NETSOR, TP1 Def. 4.1; NETSOR-T, TP2 Def. 7.1; NETSOR-T+, TP2 App. B):

=================  =====================================================================
``Input``          the network input xi in R^d (finite d); never a width-space vector
``Weight``         an input A-var W : A(fan_out, fan_in), entries N(0, variance / fan_in)
``Transpose``      W.T, for NETSOR-T programs (backprop, tied autoencoders)
``Embedding``      U @ xi, an input G-var (TP1 §4: the input enters only this way)
``Bias``           an input G-var b ~ N(0, variance), the same vector for every input
``MatMul``         W @ h or W.T @ h  (a G-var)
``Nonlin``         phi(h1, ..., hk) coordinatewise, phi a SymPy ``Lambda`` (an H-var)
``Moment``         the scalar (1/n) sum_alpha psi(h1_alpha, ...)  (NETSOR-T+, TP2 App. B)
``Concat``         [x_1; ...; x_k] of widths n_i (read by a matmul or a readout only)
``Dropout``        m x / keep, a Bernoulli mask per example (read by a matmul or a readout only)
``Repeat``         a block written once, iterated for l = start..stop (depth or time)
``Readout``        f = v^T h / sqrt(n) (+ b_out): trained, zero-mean readout
``FixedReadout``   f = sum_alpha h_alpha / sqrt(n): a fixed all-ones readout (nonzero mean)
=================  =====================================================================

Every weight and bias carries its variance (a SymPy expression, so formulas keep ``sigma_w^2``
symbolic until numbers are bound; a numeric NaN, infinite, complex or negative variance is refused
when the node is built), its fan-in, and its parametrization (TP2 §4; TP2b Setup 5.2; Jacot et
al. 2018):

* ``"ntk"``  Jacot / Neural Tangents: W = sigma/sqrt(fan_in) * omega, omega ~ N(0, 1) trained,
* ``"tp"``   Tensor Programs / NTK4A: omega ~ N(0, sigma^2) trained, W = omega / sqrt(fan_in),
* ``"standard"``: W ~ N(0, sigma^2 / fan_in) trained directly.

The forward law is the same in all three; they differ only in the NTK (TP2 §4; Neural Tangents
``Dense``).
"""
from __future__ import annotations

from typing import Callable, Iterator

import sympy as sp
from sympy import Basic, Lambda, Symbol, Tuple
from sympy.core.symbol import Str

from .parametrization import PARAMETRIZATIONS

__all__ = [
    "ProgramError", "Node", "Vector", "Input", "Weight", "Transpose", "Embedding", "Bias",
    "MatMul", "Concat", "concat", "Dropout", "dropout", "DROPOUT_MODES", "Nonlin", "Moment",
    "Carry", "Repeat", "Readout", "VectorReadout", "FixedReadout",
    "READOUTS", "OutputBias", "Scan", "Pool", "POOLINGS", "scan", "Conv", "AvgPool", "PADDINGS",
    "Aggregate", "AGGREGATIONS", "BatchNorm", "Program", "nonlin", "repeat", "PARAMETRIZATIONS",
    "WIDTH",
]

#: The default width symbol of hidden layers.
WIDTH = Symbol("n", positive=True, integer=True)


class ProgramError(ValueError):
    """A program that is not a valid tensor program; the message names the offending node."""


def _expr(value, what: str) -> sp.Expr:
    try:
        expr = sp.sympify(value, strict=True)
    except (sp.SympifyError, TypeError) as exc:
        raise ProgramError(f"{what} must be a number or a SymPy expression, got {value!r}") from exc
    if not isinstance(expr, sp.Expr):
        raise ProgramError(f"{what} must be a scalar expression, got {value!r}")
    return expr


_NOT_FINITE = (sp.S.NaN, sp.S.Infinity, sp.S.NegativeInfinity, sp.S.ComplexInfinity)


def _variance(value, what: str) -> sp.Expr:
    """A variance sigma^2: a finite, real, non-negative number, or a SymPy expression (e.g. a
    symbolic ``sigma_w**2``) that is not known to be otherwise.  Refused where it enters, so a
    NaN never reaches a kernel as a misleading downstream error."""
    expr = _expr(value, what)
    if expr.has(sp.S.NaN):
        raise ProgramError(f"{what} is not a number: got {value!r}")
    if expr.has(*_NOT_FINITE) or expr.is_finite is False:
        raise ProgramError(f"{what} must be finite, got {value!r}")
    if expr.is_extended_real is False:
        raise ProgramError(f"{what} must be real, got {value!r}")
    if expr.is_nonnegative is False:
        raise ProgramError(f"{what} must be non-negative, got {value!r}")
    return expr


def _dim(value, what: str) -> sp.Expr:
    expr = _expr(value, what)
    if expr.is_number and not (expr.is_integer and expr > 0):
        raise ProgramError(f"{what} must be a positive integer or a width symbol, got {expr}")
    return expr


def _str(value) -> str:
    """Accept both a Python str and SymPy's Str, since ``func(*args)`` rebuilds nodes from args."""
    return value.name if isinstance(value, Str) else value


def _index(index) -> Tuple:
    if index is None:
        return Tuple()
    if isinstance(index, (tuple, list, Tuple)):
        return Tuple(*[sp.sympify(i) for i in index])
    return Tuple(sp.sympify(index))


def _parametrization(p: str) -> Str:
    p = _str(p)
    if p not in PARAMETRIZATIONS:
        raise ProgramError(f"unknown parametrization {p!r}; expected one of {PARAMETRIZATIONS}")
    return Str(p)


def _common_positions(args, what: str) -> str | None:
    """The one position axis of ``args`` (position-free arguments broadcast over it)."""
    axes = {a.positions for a in args if isinstance(a, (Vector, Moment))} - {None}
    if len(axes) > 1:
        raise ProgramError(f"{what} mixes vectors indexed by different positions "
                           f"({', '.join(sorted(axes))})")
    return next(iter(axes), None)


class Node(Basic):
    """Base class of every IR node."""

    #: The vectors (and Moment scalars) this node reads, whose cotangents it feeds in backprop.
    operands: tuple = ()

    def __setattr__(self, name, value):
        # Nodes are values (hash-consed, shared by every program using them): only SymPy's own
        # slots are ever written, by Basic.__new__.
        if not any(name in getattr(k, "__slots__", ()) for k in type(self).__mro__):
            raise AttributeError(f"IR nodes are immutable: cannot set {name!r} on "
                                 f"{type(self).__name__}")
        super().__setattr__(name, value)

    def label(self) -> str:
        """A short human name for error messages and printing."""
        return type(self).__name__

    # SymPy's printers dispatch on class names, and MatMul / Transpose would be taken for
    # SymPy's matrix expressions: nodes print themselves.
    def _sympystr(self, printer) -> str:
        return f"{type(self).__name__}({self.label()})"

    def _latex(self, printer) -> str:
        return r"\mathrm{%s}" % self.label().replace("_", r"\_")


def _position_axes(positions) -> str:
    """A position shape as one label: ``"t"`` (a sequence) or ``("h", "w")`` -> ``"h,w"`` (an
    image: one position per pixel).  Vectors indexed by the same axes share the label."""
    if positions is None or positions == "" or isinstance(positions, (str, Str)):
        axes = tuple(a for a in (_str(positions) or "").split(",") if a)
    elif isinstance(positions, (tuple, list, Tuple)):
        axes = tuple(_str(a) for a in positions)
    else:
        raise ProgramError(f"positions must be an axis name or a tuple of axis names, got "
                           f"{positions!r}")
    for a in axes:
        if not isinstance(a, str) or not a.isidentifier():
            raise ProgramError(f"position axis names must be identifiers, got {a!r}")
    if len(set(axes)) != len(axes):
        raise ProgramError(f"position axes {axes} repeat a name")
    return ",".join(axes)


class Input(Node):
    """The network input: xi in R^d, or with ``positions="t"`` a sequence xi^1..xi^T of tokens in
    R^d (data of shape (N, T, d); T may differ between the two sides of a kernel), or with
    ``positions=("h", "w")`` an image of H x W pixels in R^d (data (N, H, W, d), channels last):
    the positions then have a shape, one axis per name.  Only an ``Embedding`` (or a ``Conv``)
    may consume it: the input never lives in width space (TP1 §4)."""

    def __new__(cls, name: str = "xi", dim=Symbol("d", positive=True, integer=True),
                positions: str | tuple | None = None):
        return super().__new__(cls, Str(_str(name)), _dim(dim, f"dimension of input {name!r}"),
                               Str(_position_axes(positions)))

    name = property(lambda self: self.args[0].name)
    dim = property(lambda self: self.args[1])
    positions = property(lambda self: self.args[2].name or None)

    @property
    def position_axes(self) -> tuple:
        """The names of the position axes: () for one vector per example, ("t",) for a
        sequence, ("h", "w") for an image."""
        return tuple(a for a in self.args[2].name.split(",") if a)

    def label(self):
        return self.name


class Weight(Node):
    """An input A-var W : A(fan_out, fan_in) with entries N(0, variance / fan_in) at initialization.

    ``index`` ties the weight to a loop index: inside a ``Repeat`` body, a weight indexed by the
    loop variable is a fresh matrix in every iteration; an unindexed one is shared (tied) across
    iterations, and across every other place it is used.
    """

    def __new__(cls, name: str, fan_out=WIDTH, fan_in=WIDTH, variance=1,
                parametrization: str = "ntk", index=None):
        return super().__new__(
            cls, Str(_str(name)), _dim(fan_out, f"fan_out of weight {name!r}"),
            _dim(fan_in, f"fan_in of weight {name!r}"), _variance(variance, f"variance of weight {name!r}"),
            _parametrization(parametrization), _index(index))

    name = property(lambda self: self.args[0].name)
    fan_out = property(lambda self: self.args[1])
    fan_in = property(lambda self: self.args[2])
    variance = property(lambda self: self.args[3])
    parametrization = property(lambda self: self.args[4].name)
    index = property(lambda self: self.args[5])

    @property
    def T(self) -> "Transpose":
        return Transpose(self)

    def __matmul__(self, other):
        if isinstance(other, Input):
            return Embedding(self, other)
        return MatMul(self, other)

    def label(self):
        return self.name if not self.index else f"{self.name}[{', '.join(map(str, self.index))}]"


class Transpose(Node):
    """W.T: same entries as W.  GIA treats it as an independent matrix; exact mode does not."""

    def __new__(cls, weight: Weight):
        if not isinstance(weight, Weight):
            raise ProgramError(f"only a Weight can be transposed, got {type(weight).__name__}")
        return super().__new__(cls, weight)

    weight = property(lambda self: self.args[0])
    fan_out = property(lambda self: self.args[0].fan_in)
    fan_in = property(lambda self: self.args[0].fan_out)

    @property
    def variance(self):
        """sigma^2_{W^T} = (n'/n) sigma_W^2 for W : A(n', n) (TP2 App. C, variable dimensions)."""
        w = self.weight
        return sp.simplify(w.variance * w.fan_out / w.fan_in)

    @property
    def T(self):
        return self.weight

    def __matmul__(self, other):
        return MatMul(self, other)

    def label(self):
        return f"{self.weight.label()}^T"


# ----------------------------------------------------------------------------------- vectors
class Vector(Node):
    """A width-space vector (G-var or H-var).  Arithmetic builds coordinatewise ``Nonlin`` nodes."""

    @property
    def dim(self) -> sp.Expr:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def name(self) -> str | None:
        return None

    @property
    def positions(self) -> str | None:
        """The position axis the vector is indexed by (a sequence's tokens), or None."""
        return None

    def named(self, name: str) -> "Vector":
        raise ProgramError(f"{self.label()} cannot be renamed")

    def _binary(self, other, op: Callable, swap=False):
        a, b = Symbol("a", real=True), Symbol("b", real=True)
        if isinstance(other, Vector):
            f = op(b, a) if swap else op(a, b)
            return Nonlin(Lambda((a, b), f), (self, other))
        if isinstance(other, (Node, Basic)) and not isinstance(other, sp.Expr):
            raise ProgramError(f"cannot combine vector {self.label()} with {type(other).__name__}")
        c = _expr_any(other)
        return Nonlin(Lambda(a, op(c, a) if swap else op(a, c)), (self,))

    def __add__(self, other):
        return self._binary(other, lambda a, b: a + b)

    def __radd__(self, other):
        return self._binary(other, lambda a, b: a + b, swap=True)

    def __sub__(self, other):
        return self._binary(other, lambda a, b: a - b)

    def __rsub__(self, other):
        return self._binary(other, lambda a, b: a - b, swap=True)

    def __mul__(self, other):
        return self._binary(other, lambda a, b: a * b)

    def __rmul__(self, other):
        return self._binary(other, lambda a, b: a * b, swap=True)

    def __truediv__(self, other):
        if isinstance(other, Vector):
            raise ProgramError("division by a vector is not polynomially bounded; use a Nonlin")
        return self._binary(other, lambda a, b: a / b)

    def __neg__(self):
        a = Symbol("a", real=True)
        return Nonlin(Lambda(a, -a), (self,))

    def label(self):
        return self.name or type(self).__name__


def _expr_any(value) -> sp.Expr:
    try:
        return sp.sympify(value, strict=True)
    except (sp.SympifyError, TypeError) as exc:
        raise ProgramError(f"cannot use {value!r} in a vector expression") from exc


class Embedding(Vector):
    """U @ xi, an input G-var with Cov(Z^{U xi}, Z^{U xi'}) = sigma_U^2 xi.xi'/d (Sigma^in of
    TP2 Eq. 18)."""

    def __new__(cls, weight: Weight, inp: Input, name: str = ""):
        if not isinstance(weight, Weight):
            raise ProgramError(f"an embedding needs a Weight, got {type(weight).__name__}")
        if not isinstance(inp, Input):
            raise ProgramError(f"an embedding embeds an Input, got {type(inp).__name__}")
        if sp.simplify(weight.fan_in - inp.dim) != 0:
            raise ProgramError(
                f"dimension mismatch in {weight.label()} @ {inp.label()}: weight fan_in "
                f"{weight.fan_in} != input dimension {inp.dim}")
        return super().__new__(cls, weight, inp, Str(_str(name)))

    weight = property(lambda self: self.args[0])
    input = property(lambda self: self.args[1])
    dim = property(lambda self: self.args[0].fan_out)
    positions = property(lambda self: self.args[1].positions)
    name = property(lambda self: self.args[2].name or None)

    def named(self, name):
        return Embedding(self.weight, self.input, name)

    def label(self):
        return self.name or f"{self.weight.label()} {self.input.label()}"


class Bias(Vector):
    """An input G-var b with iid N(0, variance) coordinates; the same vector for every input."""

    def __new__(cls, name: str, dim=WIDTH, variance=1, parametrization: str = "ntk", index=None):
        return super().__new__(cls, Str(_str(name)), _dim(dim, f"dimension of bias {name!r}"),
                               _variance(variance, f"variance of bias {name!r}"),
                               _parametrization(parametrization), _index(index))

    name = property(lambda self: self.args[0].name)
    dim = property(lambda self: self.args[1])
    variance = property(lambda self: self.args[2])
    parametrization = property(lambda self: self.args[3].name)
    index = property(lambda self: self.args[4])

    def label(self):
        return self.name if not self.index else f"{self.name}[{', '.join(map(str, self.index))}]"


class MatMul(Vector):
    """W @ h or W.T @ h: a G-var (TP1 Def. 4.1, MatMul)."""

    def __new__(cls, matrix, vec, name: str = ""):
        if not isinstance(matrix, (Weight, Transpose)):
            raise ProgramError(f"MatMul needs a Weight or its transpose, got {type(matrix).__name__}")
        if isinstance(vec, Input):
            if isinstance(matrix, Transpose):
                raise ProgramError(f"{matrix.label()} cannot embed the input {vec.label()}")
            return Embedding(matrix, vec, name)
        if not isinstance(vec, Vector):
            raise ProgramError(
                f"{matrix.label()} @ {getattr(vec, 'label', lambda: repr(vec))()}: "
                f"a matrix multiplies a width-space vector, not a {type(vec).__name__}")
        if sp.simplify(matrix.fan_in - vec.dim) != 0:
            raise ProgramError(
                f"dimension mismatch in {matrix.label()} @ {vec.label()}: fan_in {matrix.fan_in} "
                f"!= vector dimension {vec.dim}")
        if isinstance(vec, (Concat, Dropout)) and isinstance(matrix, Transpose):
            raise ProgramError(f"{matrix.label()} @ {vec.label()}: a transposed matrix over a "
                               "concatenation or a dropout is not supported")
        return super().__new__(cls, matrix, vec, Str(_str(name)))

    matrix = property(lambda self: self.args[0])
    vector = property(lambda self: self.args[1])
    dim = property(lambda self: self.args[0].fan_out)
    name = property(lambda self: self.args[2].name or None)

    @property
    def operands(self) -> tuple:
        return (self.vector,)

    @property
    def positions(self):
        return self.vector.positions

    @property
    def weight(self) -> Weight:
        m = self.matrix
        return m.weight if isinstance(m, Transpose) else m

    @property
    def transposed(self) -> bool:
        return isinstance(self.matrix, Transpose)

    def named(self, name):
        return MatMul(self.matrix, self.vector, name)

    def label(self):
        return self.name or f"{self.matrix.label()} {self.vector.label()}"


class Concat(Vector):
    """[x_1; ...; x_k]: the vectors stacked into one of dimension n_1 + ... + n_k (Neural
    Tangents' ``FanInConcat`` on the channel axis), e.g. branches of widths n and 2n.

    Its coordinates do not share one law (a branch's coordinates are that branch's Z), so only a
    matmul ``W @ concat`` or a readout may read it: W's columns split into independent blocks
    W_i, and W x = sum_i W_i x_i has Cov(Z^{Wx}, Z^{Wx'}) = sigma_W^2 sum_i (n_i / N) E[Z^{x_i}
    Z^{x'_i}], N = sum_i n_i: the width-weighted average of the branch kernels.
    """

    def __new__(cls, *vectors, name: str = ""):
        if len(vectors) == 1 and isinstance(vectors[0], (list, tuple, Tuple)):
            vectors = tuple(vectors[0])
        if len(vectors) < 2:
            raise ProgramError("Concat needs at least two vectors")
        for v in vectors:
            if not isinstance(v, Vector) or isinstance(v, (Concat, Dropout)):
                raise ProgramError(f"Concat stacks width-space vectors (not nested Concats or "
                                   f"dropouts), got "
                                   f"{getattr(v, 'label', lambda: repr(v))()}")
            if v.positions is not None:
                raise ProgramError(f"Concat of {v.label()!r}, a vector indexed by positions "
                                   f"{v.positions!r}, is not supported: pool it first")
        return super().__new__(cls, Tuple(*vectors), Str(_str(name)))

    vectors = property(lambda self: tuple(self.args[0]))
    operands = vectors
    dim = property(lambda self: sp.Add(*[v.dim for v in self.args[0]]))
    name = property(lambda self: self.args[1].name or None)

    @property
    def fractions(self) -> tuple:
        """n_i / N: the weight of each branch in the kernels of the concatenation."""
        total = self.dim
        return tuple(sp.simplify(v.dim / total) for v in self.vectors)

    def named(self, name):
        return Concat(*self.vectors, name=name)

    def label(self):
        return self.name or "[" + " | ".join(v.label() for v in self.vectors) + "]"


def concat(*vectors, name: str = "") -> Concat:
    """``concat(x1, x2)``: the vectors stacked (Neural Tangents' ``FanInConcat``), read by a
    matmul or a readout."""
    return Concat(*vectors, name=name)


class Dropout(Vector):
    """Dropout in Neural Tangents' ``train`` mode: y = m * x / keep coordinatewise, keep = 1 - rate,
    with a Bernoulli(keep) mask m drawn afresh for every example (one mask per example, shared by
    the forward and backward pass).  Two different examples see independent masks, E[m m'] =
    keep^2, so their kernels are unchanged; an example with itself sees E[m^2] = keep, so the
    diagonal k(xi, xi) of every kernel read through y is divided by keep (NT's ``Dropout``).

    ``test`` mode is the identity (use :func:`dropout`, which returns ``x`` itself).  Like a
    concatenation, only a matmul or a readout may read y: its Z is not a function of Z^x alone.
    """

    def __new__(cls, vec: Vector, rate, name: str = ""):
        if not isinstance(vec, Vector) or isinstance(vec, (Concat, Dropout)):
            raise ProgramError(f"Dropout acts on a width-space vector (not a concatenation or a "
                               f"dropout), got "
                               f"{getattr(vec, 'label', lambda: repr(vec))()}")
        if vec.positions is not None:
            raise ProgramError(f"Dropout of {vec.label()!r}, indexed by positions "
                               f"{vec.positions!r}, is not supported")
        rate = _expr(rate, "dropout rate")
        if rate.is_number and not (rate.is_real and 0 <= rate < 1):
            raise ProgramError(f"dropout rate must be in [0, 1) (the probability of dropping a "
                               f"coordinate), got {rate}")
        return super().__new__(cls, vec, rate, Str(_str(name)))

    vector = property(lambda self: self.args[0])
    rate = property(lambda self: self.args[1])
    keep = property(lambda self: 1 - self.args[1])
    operands = property(lambda self: (self.args[0],))
    dim = property(lambda self: self.args[0].dim)
    name = property(lambda self: self.args[2].name or None)

    def named(self, name):
        return Dropout(self.vector, self.rate, name)

    def label(self):
        return self.name or f"dropout({self.vector.label()})"


#: Neural Tangents' dropout modes.
DROPOUT_MODES = ("train", "test")


def dropout(vec: Vector, rate, mode: str = "train", name: str = "") -> Vector:
    """Dropout of ``vec`` with drop probability ``rate`` in [0, 1) (Neural Tangents'
    ``stax.Dropout(1 - rate, mode)``, whose argument is the keep rate): ``"train"`` builds a
    :class:`Dropout` node, ``"test"`` is the identity."""
    if mode not in DROPOUT_MODES:
        raise ProgramError(f"unknown dropout mode {mode!r}; expected one of {DROPOUT_MODES}")
    node = Dropout(vec, rate, name)      # checks the rate in both modes
    return node if mode == "train" else vec


class Nonlin(Vector):
    """phi(h1, ..., hk; theta) applied coordinatewise (TP1 Def. 4.1, Nonlin; sums and gates
    included).  Arguments are vectors, or ``Moment`` scalars theta (NETSOR-T+ Nonlin+, TP2 App. B:
    e.g. LayerNorm's x / sqrt(mean(x^2)))."""

    def __new__(cls, phi, args, name: str = ""):
        args = tuple(args)
        if not isinstance(phi, Lambda):
            raise ProgramError(f"Nonlin needs a SymPy Lambda, got {type(phi).__name__}")
        if len(phi.variables) != len(args):
            raise ProgramError(
                f"nonlinearity {phi} takes {len(phi.variables)} arguments, given {len(args)}")
        for a in args:
            if not isinstance(a, (Vector, Moment)):
                raise ProgramError(
                    f"nonlinearity {phi.expr} applied to {getattr(a, 'label', lambda: repr(a))()}, "
                    f"a {type(a).__name__}; coordinatewise functions take width-space vectors "
                    "(and Moment scalars)")
        if not any(isinstance(a, Vector) for a in args):
            raise ProgramError("a Nonlin needs at least one vector argument")
        dims = {a.dim for a in args if isinstance(a, Vector)}
        if len(dims) > 1:
            raise ProgramError(
                f"nonlinearity {phi.expr} mixes vectors of dimensions {sorted(map(str, dims))}")
        _common_positions(args, f"nonlinearity {phi.expr}")
        return super().__new__(cls, phi, Tuple(*args), Str(_str(name)))

    phi = property(lambda self: self.args[0])
    inputs = property(lambda self: tuple(self.args[1]))
    operands = inputs
    positions = property(lambda self: _common_positions(self.inputs, ""))
    dim = property(lambda self: next(a for a in self.args[1] if isinstance(a, Vector)).dim)
    name = property(lambda self: self.args[2].name or None)

    def named(self, name):
        return Nonlin(self.phi, self.inputs, name)

    def label(self):
        return self.name or f"{self.phi.expr}"


class BatchNorm(Vector):
    """x = phi(BN(h)) over a batch, coordinatewise in width: per neuron alpha, the batch members
    b = 1..B (the rows of one batch) are centred and normalised by their own statistics,

        x_{b alpha} = phi((h_{b alpha} - mean_b h_{b alpha}) / sqrt(var_b h_{b alpha} + epsilon)),

    with the biased batch variance (1/B) sum_b (PyTorch ``BatchNorm1d(affine=False,
    track_running_stats=False)``, TP2 App. E.4 / NTK4A ``Batchnorm-NTK``).  An example's output
    then depends on its whole batch: the kernels are functions of pairs of batches.  The
    backward map is TP2 Eq. 28: dh = G (I - x~ x~^T / B) (phi'(x~) * dx) / sigma, G = I - 11^T/B.
    ``epsilon >= 0``; with epsilon = 0 the map is scale invariant in h."""

    def __new__(cls, vec, activation="relu", epsilon=0, name: str = ""):
        if not isinstance(vec, Vector):
            raise ProgramError(f"BatchNorm normalises a width-space vector, got "
                               f"{type(vec).__name__}")
        if vec.positions is not None:
            raise ProgramError(f"BatchNorm of {vec.label()!r}, indexed by positions "
                               f"{vec.positions!r}, is not supported")
        if isinstance(activation, Lambda):
            phi = activation
        else:
            from .activations import X, activation as _activation
            phi = Lambda(X, _activation(activation))
        if len(phi.variables) != 1:
            raise ProgramError(f"the activation of a BatchNorm takes one argument, got {phi}")
        eps = _expr(epsilon, "epsilon of BatchNorm")
        if eps.is_negative or (eps.is_number and not eps.is_finite):
            raise ProgramError(f"epsilon of BatchNorm must be finite and >= 0, got {epsilon!r}")
        return super().__new__(cls, vec, phi, eps, Str(_str(name)))

    vector = property(lambda self: self.args[0])
    phi = property(lambda self: self.args[1])
    epsilon = property(lambda self: self.args[2])
    dim = property(lambda self: self.args[0].dim)
    name = property(lambda self: self.args[3].name or None)
    operands = property(lambda self: (self.args[0],))

    def named(self, name):
        return BatchNorm(self.vector, self.phi, self.epsilon, name)

    def label(self):
        return self.name or f"bn({self.vector.label()})"


class Moment(Node):
    """theta = (1/n) sum_alpha psi(h1_alpha, ..., hk_alpha) -> E psi(Z^h1, ...) (NETSOR-T+,
    TP2 Box 2)."""

    def __new__(cls, psi, args, name: str = ""):
        args = tuple(args)
        if not isinstance(psi, Lambda) or len(psi.variables) != len(args):
            raise ProgramError("Moment needs a Lambda with one variable per vector argument")
        for a in args:
            if not isinstance(a, Vector):
                raise ProgramError(f"Moment averages width-space vectors, got {type(a).__name__}")
        return super().__new__(cls, psi, Tuple(*args), Str(_str(name)))

    psi = property(lambda self: self.args[0])
    inputs = property(lambda self: tuple(self.args[1]))
    operands = inputs
    #: a Moment of positioned vectors is one scalar per position
    positions = property(lambda self: _common_positions(self.inputs, ""))
    name = property(lambda self: self.args[2].name or None)

    def label(self):
        return self.name or f"mean({self.psi.expr})"


class Carry(Vector):
    """The state carried into a ``Repeat`` or ``Scan`` body (a placeholder; only valid inside its
    body).  In a ``Scan`` over positions ``t`` it stands for the previous state s^{t-1}."""

    def __new__(cls, name: str, dim=WIDTH, positions: str | None = None):
        return super().__new__(cls, Str(_str(name)), _dim(dim, f"dimension of carry {name!r}"),
                               Str(_str(positions or "")))

    name = property(lambda self: self.args[0].name)
    dim = property(lambda self: self.args[1])
    positions = property(lambda self: self.args[2].name or None)


class Repeat(Vector):
    """carry_l = body(carry_{l-1}, l) for l = start..stop, carry_{start-1} = init.

    The body is written once, in terms of the ``Carry`` placeholder and the loop symbol ``l``; the
    derivation keeps it as a recursion in ``l``.  The value of the node is carry_stop.
    """

    def __new__(cls, index: Symbol, start, stop, carry: Carry, body: Vector, init: Vector,
                name: str = ""):
        if not isinstance(carry, Carry):
            raise ProgramError("Repeat needs a Carry placeholder")
        for what, v in (("body", body), ("init", init)):
            if not isinstance(v, Vector):
                raise ProgramError(f"the {what} of a Repeat must be a vector, got {type(v).__name__}")
        if sp.simplify(body.dim - carry.dim) != 0 or sp.simplify(init.dim - carry.dim) != 0:
            raise ProgramError(f"Repeat {name or carry.name!r}: body, init and carry dimensions differ")
        if carry in init.atoms(Carry):
            raise ProgramError(f"the init of Repeat {carry.name!r} uses its own carry")
        start, stop = sp.sympify(start), sp.sympify(stop)
        if start.is_number and stop.is_number and stop < start:
            raise ProgramError(f"Repeat {name or carry.name!r}: stop {stop} < start {start}")
        return super().__new__(cls, index, start, stop, carry, body, init, Str(_str(name)))

    index = property(lambda self: self.args[0])
    start = property(lambda self: self.args[1])
    stop = property(lambda self: self.args[2])
    carry = property(lambda self: self.args[3])
    body = property(lambda self: self.args[4])
    init = property(lambda self: self.args[5])
    dim = property(lambda self: self.args[3].dim)
    name = property(lambda self: self.args[6].name or None)

    def iteration(self, l, state: Vector) -> Vector:
        """The body at iteration ``l`` applied to ``state``."""
        return self.body.xreplace({self.index: sp.sympify(l), self.carry: state})

    def unrolled(self, stop=None) -> Vector:
        """carry_stop as an ordinary (loop-free) graph; ``stop`` must be concrete."""
        stop = self.stop if stop is None else sp.sympify(stop)
        if not (self.start.is_Integer and stop.is_Integer):
            raise ProgramError(f"Repeat {self.label()!r} has symbolic bounds; give integers to unroll")
        state = self.init
        for l in range(int(self.start), int(stop) + 1):
            state = self.iteration(l, state)
        return state

    def named(self, name):
        return Repeat(*self.args[:6], name)


class Scan(Vector):
    """A recurrence over positions: s^t = body(s^{t-1}, inputs at t) for t = 1..T, s^0 = init.

    The body is written once in terms of the ``Carry`` (s^{t-1}) and positioned vectors at the
    same t; weights used in it are shared over t (an RNN, TP2 §6.2.1 Eq. 14).  ``init`` is a
    position-free vector, or None for the zero state.  The node is the whole sequence s^1..s^T.

    ``coupled`` adds further states updated in lockstep with s (e.g. the LSTM cell c): a sequence
    of ``(carry, body, init)`` triples, c^t = body_c(s^{t-1}, c^{t-1}, inputs at t), every body
    reading the *previous* value of every carry.  A body may reuse another body's node (the LSTM's
    h^t = o^t tanh(c^t) reads the node c^t itself).  The node's value is still the primary
    sequence s; the coupled states live only inside the recurrence.
    """

    def __new__(cls, carry: Carry, body: Vector, init: Vector | None = None, name: str = "",
                coupled=()):
        label = name or getattr(carry, "name", "scan")
        init = _no_init(init)
        if isinstance(coupled, Tuple):  # rebuilt from args: a flat (carry, body, init)* tuple
            coupled = [tuple(coupled[i:i + 3]) for i in range(0, len(coupled), 3)]
        states = [(carry, body, init)] + [tuple(c) for c in coupled]
        carries = [c for c, _, _ in states]
        for k, state in enumerate(states):
            if len(state) != 3:
                raise ProgramError(f"Scan {label!r}: a coupled state is a (carry, body, init) "
                                   f"triple, got {len(state)} items")
            _check_scan_state(label, state[0], state[1], _no_init(state[2]), carries,
                              carry.positions if k else None)
        if len(set(carries)) != len(carries):
            raise ProgramError(f"Scan {label!r}: two states share one Carry")
        flat = [x for c, b, i in states[1:] for x in (c, b, _no_init(i) or Str(""))]
        return super().__new__(cls, carry, body, init if init is not None else Str(""),
                               Str(_str(name)), Tuple(*flat))

    carry = property(lambda self: self.args[0])
    body = property(lambda self: self.args[1])
    init = property(lambda self: self.args[2] if isinstance(self.args[2], Vector) else None)
    dim = property(lambda self: self.args[0].dim)
    positions = property(lambda self: self.args[0].positions)
    name = property(lambda self: self.args[3].name or None)

    @property
    def coupled(self) -> tuple:
        """The coupled states as ((carry, body, init-or-None), ...) (empty for a plain Scan)."""
        aux = self.args[4] if len(self.args) > 4 else Tuple()
        return tuple((aux[i], aux[i + 1], _no_init(aux[i + 2])) for i in range(0, len(aux), 3))

    @property
    def carries(self) -> tuple:
        return (self.carry,) + tuple(c for c, _, _ in self.coupled)

    @property
    def bodies(self) -> tuple:
        return (self.body,) + tuple(b for _, b, _ in self.coupled)

    @property
    def inits(self) -> tuple:
        return (self.init,) + tuple(i for _, _, i in self.coupled)

    @property
    def operands(self) -> tuple:
        return self.bodies

    def named(self, name):
        return Scan(self.carry, self.body, self.init, name, self.coupled)


def _no_init(init):
    """None for a missing init (also the placeholder ``Str("")`` that args store)."""
    return None if init is None or (isinstance(init, Str) and init.name == "") else init


def _check_scan_state(label, carry, body, init, carries, positions):
    if not isinstance(carry, Carry) or carry.positions is None:
        raise ProgramError(f"Scan {label!r} needs a Carry placeholder with positions")
    if positions is not None and carry.positions != positions:
        raise ProgramError(f"Scan {label!r}: coupled carry {carry.name!r} runs over positions "
                           f"{carry.positions!r}, not {positions!r}")
    if not isinstance(body, Vector):
        raise ProgramError(f"the body of Scan {label!r} must be a vector, got {type(body).__name__}")
    if body.positions != carry.positions:
        raise ProgramError(
            f"the body of Scan {label!r} must be indexed by the positions {carry.positions!r} "
            f"of its carry (it is indexed by {body.positions!r}): feed it a positioned input")
    if sp.simplify(body.dim - carry.dim) != 0:
        raise ProgramError(f"Scan {label!r}: body and carry dimensions differ")
    if init is not None:
        if not isinstance(init, Vector):
            raise ProgramError(f"the init of Scan {label!r} must be a vector or None")
        if init.positions is not None:
            raise ProgramError(f"the init of Scan {label!r} is the state before the first "
                               "position: it must be position-free")
        if sp.simplify(init.dim - carry.dim) != 0:
            raise ProgramError(f"Scan {label!r}: init and carry dimensions differ")
        if set(carries) & init.atoms(Carry):
            raise ProgramError(f"the init of Scan {label!r} uses its own carry")


#: how a pooling readout reduces positions: mean over t, the last position t = T, or every
#: position kept side by side (a flattened image, read by a Dense layer of fan-in n P).
POOLINGS = ("mean", "last", "flatten", "sum")


class Pool(Vector):
    """A position-free vector from a positioned one: (1/T) sum_t x^t (``"mean"``; over every
    pixel of an image, global average pooling), x^T (``"last"``), e.g. the average-pooled or
    last-state readout of an RNN (TP2 App. E.2), or ``"flatten"``: the concatenation of x^t
    over all P positions, which a readout reads as v . vec(x) / sqrt(n P) (Neural Tangents'
    ``Flatten``; its kernel is (1/P) sum_t E[Z^{x^t} Z^{x'^t}], same positions only), or
    ``"sum"``: sum_t x^t (the sum-pooling readout of a graph network, Du et al. 2019)."""

    def __new__(cls, vec: Vector, how: str = "mean", name: str = ""):
        if not isinstance(vec, Vector):
            raise ProgramError(f"Pool reduces a vector, got {type(vec).__name__}")
        if vec.positions is None:
            raise ProgramError(f"Pool({vec.label()!r}): the vector has no positions to pool over")
        if _str(how) not in POOLINGS:
            raise ProgramError(f"unknown pooling {how!r}; expected one of {POOLINGS}")
        return super().__new__(cls, vec, Str(_str(how)), Str(_str(name)))

    vector = property(lambda self: self.args[0])
    how = property(lambda self: self.args[1].name)
    dim = property(lambda self: self.args[0].dim)
    name = property(lambda self: self.args[2].name or None)
    operands = property(lambda self: (self.args[0],))

    def named(self, name):
        return Pool(self.vector, self.how, name)

    def label(self):
        return self.name or f"{self.how}_t {self.vector.label()}"


#: Padding of a convolution or pooling window (Neural Tangents' ``Padding``): zeros around the
#: image with the output the size of the input / stride (``"SAME"``), no padding
#: (``"VALID"``), or the image wrapped around as a torus (``"CIRCULAR"``).
PADDINGS = ("SAME", "VALID", "CIRCULAR")


def _window(values, rank: int, what: str, default=None) -> Tuple:
    if values is None:
        values = default
    if isinstance(values, (int, sp.Integer)) and not isinstance(values, bool):
        values = (values,) * rank
    if not isinstance(values, (tuple, list, Tuple)) or len(values) != rank:
        raise ProgramError(f"{what} must be {rank} positive integer(s), one per position axis, "
                           f"got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, sp.Integer)) or int(v) < 1:
            raise ProgramError(f"{what} must be positive integers, got {values!r}")
        out.append(sp.Integer(int(v)))
    return Tuple(*out)


def _padding(padding) -> Str:
    p = _str(padding)
    if not isinstance(p, str) or p.upper() not in PADDINGS:
        raise ProgramError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    return Str(p.upper())


def _positioned(vec, what: str):
    if not isinstance(vec, (Input, Vector)):
        raise ProgramError(f"{what} reads a positioned vector or input, got {type(vec).__name__}")
    if vec.positions is None:
        raise ProgramError(f"{what}: {vec.label()!r} has no positions (an image input is "
                           "Input(name, channels, positions=('h', 'w')))")
    return len(vec.positions.split(","))


class Conv(Vector):
    """y = W * x, a convolution over the positions of x (pixels, or tokens):

        y^p = sum_{k in F} W_k x^{s p + k - pad}

    one matrix W_k : A(n_out, n_in) per filter offset k, shared by every position p (Novak et
    al. 2019; Arora et al. 2019).  ``weight`` holds all of them side by side, a
    ``Weight(fan_out=n_out, fan_in=n_in * |F|)``, so its entries have variance sigma^2 / (n_in |F|):
    Neural Tangents' fan-in C_in * prod(filter).  Positions outside the image read zero
    (``"SAME"``; the window sum is still divided by the whole |F|), are never visited
    (``"VALID"``), or wrap around (``"CIRCULAR"``).  ``x`` is a positioned vector or the image
    ``Input`` itself (the first layer).
    """

    def __new__(cls, weight: Weight, vec, filter_shape, strides=None, padding: str = "SAME",
                name: str = ""):
        if not isinstance(weight, Weight):
            raise ProgramError(f"a convolution needs a Weight, got {type(weight).__name__}")
        rank = _positioned(vec, f"Conv {weight.label()!r}")
        filt = _window(filter_shape, rank, f"filter shape of Conv {weight.label()!r}")
        strides = _window(strides, rank, f"strides of Conv {weight.label()!r}", default=1)
        size = int(sp.prod(filt))
        if sp.simplify(weight.fan_in - vec.dim * size) != 0:
            raise ProgramError(
                f"dimension mismatch in Conv {weight.label()}: fan_in {weight.fan_in} != "
                f"input channels {vec.dim} x filter size {size} (one matrix per filter offset)")
        return super().__new__(cls, weight, vec, filt, strides, _padding(padding),
                               Str(_str(name)))

    weight = property(lambda self: self.args[0])
    vector = property(lambda self: self.args[1])
    filter_shape = property(lambda self: tuple(int(f) for f in self.args[2]))
    strides = property(lambda self: tuple(int(s) for s in self.args[3]))
    padding = property(lambda self: self.args[4].name)
    dim = property(lambda self: self.args[0].fan_out)
    positions = property(lambda self: self.args[1].positions)
    name = property(lambda self: self.args[5].name or None)
    matrix = weight

    @property
    def operands(self) -> tuple:
        return (self.vector,) if isinstance(self.vector, Vector) else ()

    @property
    def filter_size(self) -> int:
        return int(sp.prod(self.filter_shape))

    def named(self, name):
        return Conv(self.weight, self.vector, self.filter_shape, self.strides, self.padding, name)

    def label(self):
        return self.name or f"{self.weight.label()} * {self.vector.label()}"


class AvgPool(Vector):
    """y^p = (1/|F|) sum_{k in F} x^{s p + k - pad}: average pooling over a window of positions
    (no parameters; Neural Tangents' ``AvgPool`` with ``normalize_edges=False``: at SAME borders
    the sum is still divided by the whole window; strides default to 1, as there)."""

    def __new__(cls, vec: Vector, window_shape, strides=None, padding: str = "VALID",
                name: str = ""):
        if not isinstance(vec, Vector):
            raise ProgramError(f"AvgPool pools a width-space vector, got {type(vec).__name__}")
        rank = _positioned(vec, "AvgPool")
        window = _window(window_shape, rank, "window shape of AvgPool")
        strides = _window(strides, rank, "strides of AvgPool", default=1)
        return super().__new__(cls, vec, window, strides, _padding(padding), Str(_str(name)))

    vector = property(lambda self: self.args[0])
    filter_shape = property(lambda self: tuple(int(f) for f in self.args[1]))
    strides = property(lambda self: tuple(int(s) for s in self.args[2]))
    padding = property(lambda self: self.args[3].name)
    dim = property(lambda self: self.args[0].dim)
    positions = property(lambda self: self.args[0].positions)
    name = property(lambda self: self.args[4].name or None)
    operands = property(lambda self: (self.args[0],))

    @property
    def filter_size(self) -> int:
        return int(sp.prod(self.filter_shape))

    def named(self, name):
        return AvgPool(self.vector, self.filter_shape, self.strides, self.padding, name)

    def label(self):
        return self.name or f"avgpool {self.vector.label()}"


#: Normalisations of a neighbourhood aggregation: the plain sum of the neighbours, or their mean.
AGGREGATIONS = ("sum", "mean")


class Aggregate(Vector):
    """y_p = sum_s A[p, s] x_s: a fixed linear map over the positions (graph nodes) of x, with a
    matrix A given per example as data (the graph's adjacency), shared by every channel (Neural
    Tangents' ``Aggregate`` / ``DotGeneral`` over the position axis; the AGGREGATE step of a
    graph network, Du et al. 2019 "Graph Neural Tangent Kernel", Eq. 4).

    The matrix applied is A_hat = A + I (``self_loops=True``: every node also reads itself, as in
    Du et al.) or A, then ``how="sum"`` (c_p = 1) or ``how="mean"`` (c_p = 1 / sum_s A_hat[p, s],
    the node's degree): y_p = c_p sum_s A_hat[p, s] x_s.  It has no weights, so the kernels of y are
    C^y = A_hat1 C^x A_hat2^T and Theta^y = A_hat1 Theta^x A_hat2^T (one matrix per example).
    """

    def __new__(cls, vec: Vector, how: str = "sum", self_loops: bool = True, name: str = ""):
        if not isinstance(vec, Vector):
            raise ProgramError(f"Aggregate mixes the positions of a width-space vector, got "
                               f"{type(vec).__name__} (aggregate after the first Conv/Dense)")
        if vec.positions is None or "," in vec.positions:
            raise ProgramError(f"Aggregate({vec.label()!r}): the vector must be indexed by one "
                               "position axis (the nodes of a graph)")
        if _str(how) not in AGGREGATIONS:
            raise ProgramError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")
        if not isinstance(self_loops, (bool, sp.logic.boolalg.BooleanAtom)):
            raise ProgramError(f"self_loops must be True or False, got {self_loops!r}")
        return super().__new__(cls, vec, Str(_str(how)), sp.true if self_loops else sp.false,
                               Str(_str(name)))

    vector = property(lambda self: self.args[0])
    how = property(lambda self: self.args[1].name)
    self_loops = property(lambda self: bool(self.args[2]))
    dim = property(lambda self: self.args[0].dim)
    positions = property(lambda self: self.args[0].positions)
    name = property(lambda self: self.args[3].name or None)
    operands = property(lambda self: (self.args[0],))

    def named(self, name):
        return Aggregate(self.vector, self.how, self.self_loops, name)

    def label(self):
        return self.name or f"agg_{self.how} {self.vector.label()}"


def scan(body: Callable[[Vector], Vector], positions: str = "t", init: Vector | None = None,
         dim=WIDTH, name: str = "s") -> Scan:
    """``scan(lambda s_prev: phi(W @ s_prev + U @ xi + b), "t")``: the recurrence s^t over
    the positions of a sequence input, weights shared over t."""
    carry = Carry(f"{name}_prev", dim, positions)
    return Scan(carry, body(carry), init, name)


def nonlin(phi, *args, name: str = "") -> Nonlin:
    """Apply a coordinatewise function.  ``phi`` is a Lambda, an expression in one free symbol, or
    an activation name understood by :func:`symntk.activations.activation`."""
    if not isinstance(phi, Lambda):
        from .activations import X, activation
        phi = Lambda(X, activation(phi))
    return Nonlin(phi, args, name)


def repeat(body: Callable[[Vector, Symbol], Vector], init: Vector, start, stop,
           index: Symbol | str = "l", name: str = "h") -> Repeat:
    """Build a ``Repeat`` from a Python function ``body(carry, l)`` written once."""
    l = Symbol(index, integer=True, positive=True) if isinstance(index, str) else index
    carry = Carry(name, init.dim)
    out = body(carry, l)
    if not isinstance(out, Vector):
        raise ProgramError(f"the body of repeat {name!r} must return a vector, got {type(out).__name__}")
    return Repeat(l, start, stop, carry, out, init, name)


# ----------------------------------------------------------------------------------- outputs
class OutputBias(Node):
    """The scalar bias of a readout (Neural Tangents' Dense readout has one)."""

    def __new__(cls, name: str = "b_out", variance=1, parametrization: str = "ntk"):
        return super().__new__(cls, Str(_str(name)), _variance(variance, f"variance of output bias {name!r}"),
                               _parametrization(parametrization))

    name = property(lambda self: self.args[0].name)
    variance = property(lambda self: self.args[1])
    parametrization = property(lambda self: self.args[2].name)

    def label(self):
        return self.name


def _readout_vector(vec) -> None:
    if not isinstance(vec, Vector):
        raise ProgramError(f"a readout reads a width-space vector, got {type(vec).__name__}")
    if vec.positions is not None:
        raise ProgramError(f"a readout reads one vector per example, but {vec.label()!r} is "
                           f"indexed by positions {vec.positions!r}: pool it first (Pool(x, "
                           "'mean') or Pool(x, 'last'))")


def _output_bias(bias):
    if bias is not None and bias != Str("") and not isinstance(bias, OutputBias):
        raise ProgramError(f"a readout bias must be an OutputBias, got {type(bias).__name__}")
    return bias if isinstance(bias, OutputBias) else Str("")


class Readout(Node):
    """f = v^T h / sqrt(n) + b_out with v a trained ``Weight`` (fan_out 1): the independent,
    zero-mean readout of TP1 Cor. 5.5 that the Simple GIA Check asks for (TP2 Condition 1).

    ``Readout(u, h)`` with ``u`` a ``Vector`` of the program builds a :class:`VectorReadout`.
    """

    def __new__(cls, weight, vec: Vector, bias: OutputBias | None = None):
        if isinstance(weight, Vector):
            return VectorReadout(weight, vec, bias)
        if not isinstance(weight, Weight):
            raise ProgramError(f"a readout needs a Weight or a Vector, got {type(weight).__name__}")
        _readout_vector(vec)
        if sp.simplify(weight.fan_in - vec.dim) != 0:
            raise ProgramError(f"dimension mismatch in readout {weight.label()}: fan_in "
                               f"{weight.fan_in} != dimension {vec.dim} of {vec.label()}")
        if weight.fan_out != 1:
            raise ProgramError(f"readout {weight.label()} must have fan_out 1 (one output)")
        return super().__new__(cls, weight, vec, _output_bias(bias))

    weight = property(lambda self: self.args[0])
    vector = property(lambda self: self.args[1])
    operands = property(lambda self: (self.args[1],))
    #: an independent trained readout weight (zero mean, used nowhere else)
    trained = True

    @property
    def bias(self) -> OutputBias | None:
        b = self.args[2]
        return b if isinstance(b, OutputBias) else None


class VectorReadout(Node):
    """f = u^T h / sqrt(n) + b_out with ``u`` a vector computed by the program itself (e.g. a
    readout tied to the input embedding).  It has no parameter of its own, and u is not an
    independent zero-mean weight, so the Simple GIA Check fails (TP2 §6.3, TP3 App. C)."""

    def __new__(cls, weight: Vector, vec: Vector, bias: OutputBias | None = None):
        _readout_vector(weight)
        _readout_vector(vec)
        if sp.simplify(weight.dim - vec.dim) != 0:
            raise ProgramError(f"readout vector {weight.label()} and {vec.label()} differ in dimension")
        return super().__new__(cls, weight, vec, _output_bias(bias))

    weight = property(lambda self: self.args[0])
    vector = property(lambda self: self.args[1])
    operands = property(lambda self: (self.args[1], self.args[0]))
    trained = False
    bias = Readout.bias


class FixedReadout(Node):
    """f = sum_alpha h_alpha / sqrt(n): an untrained all-ones readout.

    Its cotangent is d h = sqrt(n) df/dh = 1, a nonzero-mean readout, so the Simple GIA Check fails
    (TP2 §6.3): the NTK derived under GIA may be wrong.
    """

    def __new__(cls, vec: Vector):
        _readout_vector(vec)
        return super().__new__(cls, vec)

    vector = property(lambda self: self.args[0])
    operands = property(lambda self: (self.args[0],))
    weight = None
    bias = None
    trained = False


#: Every kind of program output.
READOUTS = (Readout, VectorReadout, FixedReadout)


# ----------------------------------------------------------------------------------- program
class Program:
    """A validated tensor program with one scalar output.

    ``Program(output)`` walks the graph, checks it (dimensions are checked as nodes are built;
    here: the output is a readout, it depends on an input, no ``Carry`` escapes its ``Repeat``,
    one name means one weight), and records the topological order every later stage reads.
    """

    def __init__(self, output, name: str = "program", require_input: bool = True):
        if not isinstance(output, READOUTS):
            raise ProgramError(
                f"the program output must be a readout ({', '.join(r.__name__ for r in READOUTS)}), "
                f"got {type(output).__name__}"
                " (a vector must be read out to give the network's scalar output)")
        self.output = output
        self.name = name
        self.nodes = tuple(_topological(output))
        self.require_input = require_input
        self._validate()

    # -- structure -----------------------------------------------------------------------
    # ``nodes`` reaches a Repeat's body through the Repeat (the body is a template), so the
    # parameters of loop bodies are listed per iteration by ``unrolled().weights``.
    @property
    def inputs(self) -> tuple[Input, ...]:
        return tuple(n for n in self.nodes if isinstance(n, Input))

    @property
    def weights(self) -> tuple[Weight, ...]:
        return tuple(n for n in self.nodes if isinstance(n, Weight))

    @property
    def biases(self) -> tuple[Bias, ...]:
        return tuple(n for n in self.nodes if isinstance(n, Bias))

    @property
    def repeats(self) -> tuple[Repeat, ...]:
        return tuple(n for n in self.nodes if isinstance(n, Repeat))

    def unrolled(self) -> "Program":
        """The same program with every ``Repeat`` replaced by its unrolled graph."""
        mapping = {}
        for node in self.nodes:
            if isinstance(node, Repeat):
                mapping[node] = node.xreplace(mapping).unrolled()
        return Program(self.output.xreplace(mapping), self.name, self.require_input) if mapping else self

    def __repr__(self):
        return f"Program({self.name!r}, {len(self.nodes)} nodes)"

    def _validate(self):
        if self.require_input and not self.inputs:
            raise ProgramError("the program output does not depend on any Input (pass "
                               "require_input=False for a NETSOR program on Gaussian initial vectors)")
        seen: dict[str, Node] = {}
        every = list(self.nodes)
        for rep in self.repeats:
            every.extend(_topological(rep.body))
        for node in every:
            if isinstance(node, (Weight, Bias, OutputBias)):
                key = f"{node.name}[{node.index if hasattr(node, 'index') else ''}]"
                other = seen.setdefault(key, node)
                if other != node:
                    raise ProgramError(
                        f"two different parameters are both called {node.name!r}: "
                        f"{_describe(other)} vs {_describe(node)}")
        for node in every:
            if isinstance(node, (Readout, MatMul)):
                continue
            for a in getattr(node, "operands", ()):
                if isinstance(a, Concat):
                    raise ProgramError(
                        f"{node.label()!r} reads the concatenation {a.label()!r}: only a matmul or "
                        "a readout may (its branches' coordinates have different laws)")
                if isinstance(a, Dropout):
                    raise ProgramError(
                        f"{node.label()!r} reads {a.label()!r}: only a matmul or a readout may "
                        "read a dropout (apply it right before a Dense layer)")
        _check_carries(self.output, frozenset())
        given = {inp.positions for inp in self.inputs} - {None}
        for node in self.nodes:
            axis = getattr(node, "positions", None)
            if axis is not None and axis not in given:
                raise ProgramError(
                    f"{node.label()!r} is indexed by positions {axis!r}, but no Input has them "
                    f"(a sequence input is Input(name, d, positions={axis!r}))")


def _describe(p) -> str:
    fields = [f for f in ("fan_out", "fan_in", "dim", "variance", "parametrization", "index")
              if hasattr(p, f)]
    return "(" + ", ".join(f"{f}={getattr(p, f)}" for f in fields) + ")"


def _children(node: Basic) -> Iterator[Basic]:
    if isinstance(node, Repeat):
        # The body is a template: its nodes are reached through the Repeat, not on their own.
        yield from (node.init,)
        return
    for a in node.args:
        if isinstance(a, Node):
            yield a
        elif isinstance(a, Tuple):
            yield from (x for x in a if isinstance(x, Node))


def _topological(root: Basic) -> list[Node]:
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if c not in seen)
    return order


def _check_carries(node: Basic, allowed: frozenset):
    for carry in node.atoms(Carry):
        if carry not in allowed and not _carry_bound(node, carry):
            raise ProgramError(f"Carry {carry.name!r} is used outside the body of its Repeat")


def _carry_bound(root: Basic, carry: Carry) -> bool:
    """True if every occurrence of ``carry`` under ``root`` is inside the body of its Repeat."""
    if root == carry:
        return False
    if isinstance(root, Scan):
        if carry in root.carries:
            return all(i is None or carry not in i.atoms(Carry) for i in root.inits)
        return all(_carry_bound(a, carry) for a in root.bodies + root.inits
                   if a is not None and carry in a.atoms(Carry))
    if isinstance(root, Repeat):
        if root.carry == carry:
            return root.init is None or carry not in root.init.atoms(Carry)
        return all(_carry_bound(a, carry) for a in (root.body, root.init)
                   if a is not None and carry in a.atoms(Carry))
    return all(_carry_bound(a, carry) for a in root.args if isinstance(a, Basic) and carry in a.atoms(Carry))
