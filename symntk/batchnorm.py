r"""BatchNorm networks: NNGP and NTK of pairs of batches (TP2 App. E.4, Eqs. 36-39).

A :class:`~symntk.program.BatchNorm` node normalises each neuron over the members of a batch, so
the output for one example depends on its whole batch and the kernels are functions of *pairs of
batches*: same batch (B x B) or two batches (B1 x B2, of any sizes).  For the chain

    h^1 = W^1 xi,  x^l = relu(BN(h^l)),  h^{l+1} = W^{l+1} x^l,  f = v^T x^L / sqrt(n) (+ b)

the derivation is a recursion over layers (TP2 App. E.4.1, with the NTK accumulated forward as in
Neural Tangents):

.. math::

    \Sigma^{h^1} = \sigma_{W^1}^2\,\frac{\xi^\top\bar\xi}{d},\quad
    \Theta^{h^1} = a_{W^1}\,\frac{\xi^\top\bar\xi}{d},\qquad
    \Sigma^{x^l} = \mathcal V(\Sigma^{h^l}),\quad
    \Theta^{x^l} = \mathcal J_{\Sigma^{h^l}}(\Theta^{h^l}),

    \Sigma^{h^{l+1}} = \sigma_{W^{l+1}}^2\Sigma^{x^l},\quad
    \Theta^{h^{l+1}} = a_{W^{l+1}}\Sigma^{x^l} + \sigma_{W^{l+1}}^2\Theta^{x^l},\qquad
    K = \sigma_v^2\Sigma^{x^L} + \sigma_b^2,\quad \Theta = a_v\Sigma^{x^L} + \sigma_v^2\Theta^{x^L} + a_b,

where every matrix is a block over batch members, :math:`\mathcal V` is the batch V-transform
of relu o BN (Eq. 36 same batch, Eq. 37 two batches) and :math:`\mathcal J(\Theta) =
\mathbb E[J\,G\Theta\bar G\,\bar J^\top]` the adjoint of the backward map (Eqs. 38, 39); ``a``
is the parametrization's NTK factor (:mod:`symntk.parametrization`).  The integrals are in
:mod:`symntk.batchnorm_quadrature`.  A bias added before a BatchNorm is removed by the centring
(no effect, no gradient), so :func:`batchnorm_mlp` has none.

Where the NTK does not exist: with epsilon = 0 the Jacobian of the normalisation is of order
1/sigma, and E 1/sigma^2 is infinite when the centred batch spans 2 dimensions (B = 3); for
B = 2 the normalised pair is +-(1, -1), so relu o BN is piecewise constant and its Jacobian is 0
almost everywhere.  For B <= 5 the fourth moment of the Jacobian is infinite, so the empirical
NTK of a finite network does not concentrate at the usual width^-1/2 rate (:func:`check_monte_carlo`).
Near two copies of one batch the cross NTK is Hoelder-1/2 in the cross covariance (the arccos of
E step(u) step(v) at correlation 1): identical batches are computed as one batch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import sympy as sp

from . import batchnorm_quadrature as bq
from .builders import D_IN, _check_arguments, _readout, _variance
from .parametrization import bias_factor, weight_factor
from .program import (WIDTH, BatchNorm, Embedding, Input, MatMul, Program, Readout,
                      Weight)
from .result import KernelResult, check_inputs

__all__ = ["batchnorm_mlp", "derive_batchnorm", "is_batch_coupled", "BatchNormDerivation",
           "BatchNormLayer", "BatchSizeWarning", "check_monte_carlo", "MIN_CONCENTRATING_BATCH"]

#: Smallest batch size whose empirical NTK has a finite variance (E 1/sigma^4 < inf needs B - 1 > 4).
MIN_CONCENTRATING_BATCH = 6

_RELU = sp.Lambda(sp.Symbol("x", real=True), sp.Max(0, sp.Symbol("x", real=True)))


class BatchSizeWarning(UserWarning):
    """A Monte Carlo estimate of a BatchNorm network's NTK at a batch size where it does not
    concentrate."""


def batchnorm_mlp(depth: int, activation="relu", weight_std=1.0, bias_std=None, epsilon=0,
                  parametrization="ntk", input_dim=D_IN, readout_bias=True) -> Program:
    """The BatchNorm-ReLU network of TP2 App. E.4 / NTK4A ``Batchnorm-NTK``:
    h^1 = W^1 xi, x^l = phi(BN(h^l)) over the batch, h^l = W^l x^{l-1} (l = 2..depth),
    f = v^T x^depth / sqrt(n) (+ b_out when ``bias_std`` is given and ``readout_bias``).

    No hidden biases: the batch centring removes them.  ``epsilon`` is BatchNorm's variance
    offset (>= 0).  NTK4A's network is ``batchnorm_mlp(depth, parametrization="tp")`` (its
    unscaled weights give the same forward pass and gradients: BN is scale invariant)."""
    _check_arguments(depth, weight_std, bias_std, readout_bias)
    var = _variance(weight_std, "weight_std")
    xi = Input("xi", input_dim)
    x, fan_in = xi, input_dim
    for l in range(1, depth + 1):
        W = Weight(f"W{l}", fan_out=WIDTH, fan_in=fan_in, variance=var,
                   parametrization=parametrization)
        x = BatchNorm((W @ x).named(f"h{l}"), activation, epsilon, name=f"x{l}")
        fan_in = WIDTH
    return Program(_readout(x, weight_std, bias_std, parametrization, readout_bias),
                   name=f"batchnorm_mlp{depth}")


def is_batch_coupled(program: Program) -> bool:
    """True if some node couples the examples of a batch (a ``BatchNorm``)."""
    return any(isinstance(n, BatchNorm) for n in program.nodes)


@dataclass(frozen=True)
class BatchNormLayer:
    """One ``W @ x -> phi(BN(.))`` block: the weight's variance and NTK factor, epsilon, phi."""
    weight: Weight
    variance: sp.Expr
    factor: sp.Expr
    epsilon: sp.Expr
    phi: sp.Lambda
    node: BatchNorm


@dataclass(frozen=True, repr=False)
class BatchNormDerivation:
    """The derived recursion of a BatchNorm chain (module docstring); ``gram``/``kernel_function``
    evaluate it for a pair of batches, ``latex()`` prints it."""
    program: Program
    mode: str
    layers: tuple
    input: Input
    readout_variance: sp.Expr
    readout_factor: sp.Expr
    bias_variance: sp.Expr
    bias_factor: sp.Expr
    tol: float = bq.TOL

    def __repr__(self):
        return f"<BatchNormDerivation of {self.program.name!r}: {len(self.layers)} BatchNorm layers>"

    def parameters(self) -> set:
        free = set()
        for e in (self.readout_variance, self.readout_factor, self.bias_variance, self.bias_factor):
            free |= sp.sympify(e).free_symbols
        for layer in self.layers:
            for e in (layer.variance, layer.factor, layer.epsilon):
                free |= sp.sympify(e).free_symbols
        return free

    # -- printing
    def latex(self, environment: str = "align*") -> str:
        return _latex(self, environment)

    def _repr_latex_(self) -> str:
        return "$\\displaystyle " + self.latex(environment="aligned") + "$"

    def __str__(self) -> str:
        return self.latex()

    # -- numbers
    def kernel_function(self, stacklevel: int = 2):
        return self.gram

    def compile(self, **options):
        """No code generation: the batch maps are vectorised NumPy quadrature."""
        return self.gram

    def gram(self, X1, X2=None, params=None, diagonal: bool = False) -> KernelResult:
        """NNGP and NTK for the batch X1 (B x B) or between batches X1 and X2 (B1 x B2), each
        example normalised with the statistics of its own batch."""
        if diagonal:
            raise ValueError("BatchNorm kernels couple the batch: diagonal=True is not supported")
        return _evaluate(self, X1, X2, params)


def _number(expr, params, what: str) -> float:
    expr = sp.sympify(expr)
    if params:
        expr = expr.subs({s: params[s.name] for s in expr.free_symbols if s.name in params})
    if expr.free_symbols:
        raise ValueError(f"{what} depends on unbound symbols {sorted(map(str, expr.free_symbols))};"
                         " pass params={name: value}")
    return float(expr)


def derive_batchnorm(program: Program, mode: str = "gia") -> BatchNormDerivation:
    """Recognise the chain Embedding -> BN -> (MatMul -> BN)* -> Readout and derive its
    recursion (module docstring).  Other programs with a BatchNorm: NotImplementedError."""
    out = program.output
    if not isinstance(out, Readout) or type(out) is not Readout:
        raise NotImplementedError("BatchNorm kernels are derived for a trained Readout only")
    layers = []
    x = out.vector
    while True:
        if not isinstance(x, BatchNorm):
            raise NotImplementedError(
                f"BatchNorm kernels are derived for chains W @ x -> BatchNorm -> ... -> Readout; "
                f"{x.label()!r} ({type(x).__name__}) is not a BatchNorm")
        if x.phi.expr.xreplace({x.phi.variables[0]: _RELU.variables[0]}) != _RELU.expr:
            raise NotImplementedError(
                f"BatchNorm {x.label()!r} uses phi = {x.phi.expr}: only relu (through its closed "
                "inner form, TP2 Eqs. 36-39) is implemented")
        h = x.vector
        if not isinstance(h, (MatMul, Embedding)) or (isinstance(h, MatMul) and h.transposed):
            raise NotImplementedError(
                f"the input of BatchNorm {x.label()!r} must be W @ x (got {type(h).__name__} "
                f"{h.label()!r}); a bias before a BatchNorm is removed by the centring: drop it")
        W = h.weight
        layers.append(BatchNormLayer(W, W.variance, weight_factor(W.parametrization, W.variance,
                                                                  W.fan_in), x.epsilon, x.phi, x))
        if isinstance(h, Embedding):
            inp = h.input
            break
        x = h.vector
    weights = [layer.weight for layer in layers] + [out.weight]
    if len(set(weights)) != len(weights):
        raise NotImplementedError("BatchNorm chains with shared (tied) weights are not derived")
    v, b = out.weight, out.bias
    return BatchNormDerivation(
        program, mode, tuple(reversed(layers)), inp, v.variance,
        weight_factor(v.parametrization, v.variance, v.fan_in),
        b.variance if b is not None else sp.S.Zero,
        bias_factor(b.parametrization, b.variance) if b is not None else sp.S.Zero)


# ------------------------------------------------------------------ evaluation
def _check_batch(X, name: str) -> None:
    if X.shape[0] < 2:
        raise ValueError(f"{name} is a batch of {X.shape[0]} example: BatchNorm needs a batch of "
                         "at least 2 (the statistics of one example are undefined)")


def _check_variance(Sigma, eps: float, name: str, layer: int) -> None:
    B = Sigma.shape[0]
    G = np.eye(B) - 1.0 / B
    spread = np.trace(G @ Sigma @ G)
    if eps == 0 and spread <= 1e-14 * max(1.0, np.abs(Sigma).max()) * B:
        raise ValueError(f"{name}: zero variance over the batch at BatchNorm layer {layer} "
                         "(all examples of the batch are identical, or identical after the "
                         "layer) and epsilon = 0: the normalisation is undefined")


def _ntk_exists(B: int, eps: float, name: str):
    """None: the usual integral; 0: the Jacobian vanishes a.e. (B = 2, eps = 0); B = 3, eps = 0:
    an error (infinite NTK)."""
    if eps > 0 or B >= 4:
        return None
    if B == 2:
        return 0.0
    raise ValueError(f"{name} has B = 3 and epsilon = 0: the NTK of relu(BN(.)) is infinite "
                     "(E 1/sigma^2 diverges when the centred batch spans 2 dimensions); use "
                     "B >= 4 or epsilon > 0")


def _evaluate(d: BatchNormDerivation, X1, X2, params) -> KernelResult:
    dim = d.input.dim
    X1 = check_inputs(X1, "X1", dim)
    _check_batch(X1, "X1")
    same = X2 is None
    if not same:
        X2 = check_inputs(X2, "X2", dim)
        _check_batch(X2, "X2")
        if X2.shape[1] != X1.shape[1]:
            raise ValueError(f"X1 has {X1.shape[1]} features but X2 has {X2.shape[1]}")
    if not same and X2.shape == X1.shape and np.array_equal(X1, X2):
        # the same batch twice: the cross-batch kernel is the same-batch one.  (Computed by the
        # two-batch integrals it would agree only to sqrt(quadrature error) from the second
        # layer on: at coinciding batches the NTK is Hoelder-1/2 in the cross covariance, through
        # the arccos of E step(u) step(v) at correlation 1.)
        same = True
    D = X1.shape[1]
    S11 = X1 @ X1.T / D
    S22 = X2 @ X2.T / D if not same else None
    S12 = X1 @ X2.T / D if not same else None
    # pre-activation kernels and the NTK of h^1
    T = None
    for k, layer in enumerate(d.layers, start=1):
        var = _number(layer.variance, params, f"variance of {layer.weight.label()}")
        a = _number(layer.factor, params, f"NTK factor of {layer.weight.label()}")
        eps = _number(layer.epsilon, params, f"epsilon of {layer.node.label()}")
        if eps < 0:
            raise ValueError(f"epsilon of {layer.node.label()} must be >= 0, got {eps}")
        h11 = var * S11
        if same:
            Th = a * S11 + (var * T if T is not None else 0.0)
            _check_variance(h11, eps, "X1", k)
            S11 = bq.forward_single(h11, eps, d.tol).value
            zero = _ntk_exists(h11.shape[0], eps, "X1")
            T = np.zeros_like(Th) if zero == 0.0 else bq.ntk_single(h11, Th, eps, d.tol).value
        else:
            h22, h12 = var * S22, var * S12
            Th = a * S12 + (var * T if T is not None else 0.0)
            _check_variance(h11, eps, "X1", k)
            _check_variance(h22, eps, "X2", k)
            z1 = _ntk_exists(h11.shape[0], eps, "X1")
            z2 = _ntk_exists(h22.shape[0], eps, "X2")
            S12n = bq.forward_cross(h12, h11, h22, eps, d.tol).value
            T = (np.zeros_like(Th) if 0.0 in (z1, z2)
                 else bq.ntk_cross(h12, h11, h22, Th, eps, d.tol).value)
            if k < len(d.layers):
                S11 = bq.forward_single(h11, eps, d.tol).value
                S22 = bq.forward_single(h22, eps, d.tol).value
            S12 = S12n
    Sx = S11 if same else S12
    sv = _number(d.readout_variance, params, "readout variance")
    av = _number(d.readout_factor, params, "readout NTK factor")
    sb = _number(d.bias_variance, params, "output bias variance")
    ab = _number(d.bias_factor, params, "output bias NTK factor")
    nngp = sv * Sx + sb
    ntk = av * Sx + sv * T + ab
    return KernelResult(nngp, ntk, {})


# ------------------------------------------------------------------ Monte Carlo guard
def check_monte_carlo(program: Program, X1, X2=None) -> None:
    """Warn when a Monte Carlo estimate of a BatchNorm network's NTK is asked where it does not
    concentrate: the Jacobian of the normalisation carries 1/sigma factors, and with epsilon = 0
    E 1/sigma^4 is infinite unless the centred batch spans more than 4 dimensions (B >= 6, and
    an input dimension >= 5 for the first layer), so the empirical NTK has infinite variance and
    its mean over seeds does not settle at the width^-1/2 rate (standard errors are
    meaningless).  epsilon > 0 bounds 1/sigma by 1/sqrt(epsilon)."""
    nodes = [n for n in program.nodes if isinstance(n, BatchNorm)]
    if not nodes:
        return
    if all(n.epsilon.is_number and n.epsilon > 0 for n in nodes):
        return
    for name, X in (("X1", X1), ("X2", X2)):
        if X is None:
            continue
        X = np.asarray(X, dtype=np.float64)
        B = X.shape[0]
        centred = X - X.mean(axis=0, keepdims=True)
        sv = np.linalg.svd(centred, compute_uv=False)
        rank = int((sv > 1e-10 * max(sv.max(), 1e-300)).sum()) if sv.size else 0
        if B < MIN_CONCENTRATING_BATCH or rank < MIN_CONCENTRATING_BATCH - 1:
            why = (f"a batch of size {B} <= 5" if B < MIN_CONCENTRATING_BATCH else
                   f"a batch whose centred inputs span only {rank} <= 4 dimensions")
            warnings.warn(
                f"BatchNorm network (epsilon = 0) with {why} ({name}): the empirical NTK has "
                "1/sigma^2 factors whose fourth moment is infinite, so it does not concentrate "
                "(infinite variance over seeds; standard errors and the width^-1/2 rate are not "
                "reliable); use batches of at least 6 spanning >= 5 input dimensions, or "
                "epsilon > 0", BatchSizeWarning, stacklevel=3)
            return


# ------------------------------------------------------------------ LaTeX
def _latex(d: BatchNormDerivation, environment: str) -> str:
    lx = sp.latex
    L = len(d.layers)
    lines = []
    first = d.layers[0]
    lines.append(r"\Sigma^{h^{1}} &= %s\,\frac{\xi^\top\bar\xi}{%s}" % (lx(first.variance),
                                                                         lx(d.input.dim)))
    lines.append(r"\Theta^{h^{1}} &= %s\,\frac{\xi^\top\bar\xi}{%s}" % (lx(first.factor),
                                                                        lx(d.input.dim)))
    for k, layer in enumerate(d.layers, start=1):
        eps = lx(layer.epsilon)
        e1 = r"e^{-uB%s}" % ("(" + eps + ")") if layer.epsilon != 0 else ""
        lines.append(
            r"\Sigma^{x^{%d}}_{\text{same batch}} &= B\int_0^\infty\frac{%s V_{\mathrm{relu}}(K)}"
            r"{\sqrt{\det(I+2uC^{%d})}}\,du,\quad K = C^{%d}(I+2uC^{%d})^{-1}"
            % (k, e1, k, k, k))
        lines.append(
            r"\Theta^{x^{%d}}_{\text{same batch}} &= B\int_0^\infty\frac{%s}"
            r"{\sqrt{\det(I+2uC^{%d})}}\big[A\circ V_{\mathrm{step}}(K) - u(P+P^\top)"
            r" + \tfrac{u^2}{2}Q\big]du" % (k, e1, k))
        lines.append(
            r"\Sigma^{x^{%d}}_{\text{two batches}} &= \sqrt{B\bar B}\,\pi^{-1}\!\int_0^\infty\!\!\int_0^\infty"
            r"\frac{e^{-%s(Bs+\bar Bt)}}{\sqrt{st\,\det(I+2D\,C^{%d})}}\,V_{\mathrm{relu}}(\Pi)_{12}"
            r"\,ds\,dt,\quad C^{%d} = G\,\Sigma^{h^{%d}}\bar G,\ "
            r"\Pi = C^{%d}(I+2DC^{%d})^{-1},\ D = sI_B\oplus tI_{\bar B}"
            % (k, "(" + eps + ")" if layer.epsilon != 0 else "0", k, k, k, k, k))
        lines.append(
            r"\Theta^{x^{%d}}_{\text{two batches}} &= \sqrt{B\bar B}\,\pi^{-1}\!\int_0^\infty\!\!\int_0^\infty"
            r"\frac{e^{-%s(Bs+\bar Bt)}}{\sqrt{st\,\det(I+2DC^{%d})}}\big[A\circ V_{\mathrm{step}}"
            r"(\Pi)_{12} - 2tP - 2sP' + 4st\,Q\big]ds\,dt,\quad A = G\,\Theta^{h^{%d}}\bar G"
            % (k, "(" + eps + ")" if layer.epsilon != 0 else "0", k, k))
        if k < L:
            nxt = d.layers[k]
            lines.append(r"\Sigma^{h^{%d}} &= %s\,\Sigma^{x^{%d}}" % (k + 1, lx(nxt.variance), k))
            lines.append(r"\Theta^{h^{%d}} &= %s\,\Sigma^{x^{%d}} + %s\,\Theta^{x^{%d}}"
                         % (k + 1, lx(nxt.factor), k, lx(nxt.variance), k))
    bias = (" + " + lx(d.bias_variance)) if d.bias_variance != 0 else ""
    abias = (" + " + lx(d.bias_factor)) if d.bias_factor != 0 else ""
    lines.append(r"K &= %s\,\Sigma^{x^{%d}}%s" % (lx(d.readout_variance), L, bias))
    lines.append(r"\Theta &= %s\,\Sigma^{x^{%d}} + %s\,\Theta^{x^{%d}}%s"
                 % (lx(d.readout_factor), L, lx(d.readout_variance), L, abias))
    body = " \\\\\n".join(lines)
    return "\\begin{%s}\n%s\n\\end{%s}" % (environment, body, environment)
