r"""Convolutional networks: the pixel-pair recursion of the CNTK, derived node by node.

Pixels are positions (``Input("x", C, positions=("h", "w"))``, data (N, H, W, C); a 1-D signal
``positions="t"``, data (N, T, C)).  A ``Conv`` shares one matrix per filter offset k across
positions, so at infinite width (channels -> infinity) every vector x of the program has, for two
images xi, xi' and two pixels p, q, the kernels (Novak et al. 2019, Eqs. 3-5; Arora et al. 2019,
Eqs. 7-10; Garriga-Alonso et al. 2019)

.. math::

    C^{x}_{p,q} = \mathbb E\, Z^{x_p(\xi)} Z^{x_q(\xi')},\qquad
    \Theta^{x}_{p,q} = \text{the NTK of the network up to } x .

Each node kind has one rule, written once with an index over pixel pairs (p, q) and one over
filter offsets k (the ``PIXEL_RULES`` table):

* input: :math:`C_{p,q} = \xi_p\cdot\xi'_q / C` (Neural Tangents' input kernel per pixel pair);
* ``Conv`` W (fan-in :math:`n|F|`, stride s, padding offset o):
  :math:`\Sigma_{p,q} = \frac{\sigma_W^2}{|F|}\sum_{k\in F} C^{x}_{sp+k-o,\,sq+k-o}`, reading 0
  outside the image (SAME), wrapping around (CIRCULAR);
  :math:`\Theta_{p,q} = \frac{a_W}{|F|}\sum_k C^x_{\dots} + \frac{\sigma_W^2}{|F|}\sum_k\Theta^x_{\dots}`
  with the parametrization's factor :math:`a_W` (:mod:`symntk.parametrization`: sigma^2 for NTK
  parametrization, the fan-in for standard);
* an affine ``Nonlin`` :math:`\sum_i c_i g_i` of independent Gaussians (a Conv plus a Bias):
  :math:`\Sigma = \sum_i c_i^2\Sigma^{g_i}` and :math:`\Theta = \sum_i c_i^2\Theta^{g_i}`
  (a bias has :math:`\Sigma = \sigma_b^2`, :math:`\Theta = a_b`);
* :math:`y = \phi(h)`, h Gaussian: :math:`C^y_{p,q} = \mathbb E\,\phi(u)\phi(v)` and
  :math:`\Theta^y_{p,q} = \mathbb E\,\phi'(u)\phi'(v)\,\Theta^h_{p,q}` with
  :math:`(u, v)\sim\mathcal N(0, [[\Sigma^h_{p,p}(\xi,\xi), \Sigma^h_{p,q}],
  [\Sigma^h_{p,q}, \Sigma^h_{q,q}(\xi',\xi')]])`, in closed form from
  :mod:`symntk.gaussian` (TP2 Facts E.2, E.3);
* ``AvgPool``: :math:`C_{p,q} = |F|^{-2}\sum_{k,k'\in F} C^x_{sp+k-o,\,sq+k'-o}` (two offsets: the
  pooling has no weights to tie them), and the same for :math:`\Theta`;
* ``Pool(x, "mean")`` (global average pooling): :math:`P^{-2}\sum_{p,q}`; ``Pool(x, "flatten")``:
  :math:`P^{-1}\sum_p` of the same-pixel entries only; ``Pool(x, "sum")``: :math:`\sum_{p,q}`;
* ``Aggregate`` (a fixed linear map over positions, given per example: a graph's normalised
  adjacency :math:`\hat A`): :math:`C_{p,q} = \sum_{s,t}\hat A_{p,s} C^x_{s,t}\hat A'_{q,t}`, i.e.
  :math:`C = \hat A C^x \hat A'^\top`, and the same for :math:`\Theta` (no weights; Du et al.
  2019, Eqs. 4-5; Neural Tangents' ``Aggregate``);
* the readout v (+ b): :math:`K = \sigma_v^2 C + \sigma_{b}^2`,
  :math:`\Theta = a_v C + \sigma_v^2\Theta + a_b`.

The NTK is accumulated forward, layer by layer, as in Neural Tangents and Arora et al. 2019
(Eq. 8): for a program whose every weight is used once this is the sum over parameters of TP2
Eq. 12, each term a product of a forward kernel and a backward one folded into
:math:`\Theta`.

A flatten readout reads only same-pixel entries, and a Conv maps same-pixel pairs to same-pixel
pairs (one offset k for both images), so without ``AvgPool`` such programs need only the
:math:`P` diagonal entries per image pair (``mode="diagonal"``); otherwise all :math:`P^2`
(``mode="full"``).  The compiled kernel (:mod:`symntk.codegen.conv`) keeps these per image pair in
per-thread scratch, never an :math:`N^2 P^2` array.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from .activations import partial_derivative
from .gaussian import GaussianExpectation, expect
from .parametrization import bias_factor, weight_factor
from .program import (Aggregate, AvgPool, Bias, Conv, Input, Node, Nonlin, OutputBias, Pool, Program,
                      Readout, Vector, Weight)

__all__ = ["ConvStep", "ConvDerivation", "derive_conv", "is_convolutional", "PIXEL_RULES",
           "STEP_EQUATIONS", "Q1", "Q2", "S12", "Q"]

#: Variables of the closed forms: per-image variances and the cross covariance of one pixel pair.
Q1, Q2, S12, Q = (sp.Symbol(n, real=True) for n in ("q_1", "q_2", "s", "q"))
_U1, _U2 = sp.symbols("u_1 u_2", real=True)

#: Pixel indices of the two images and filter offsets (multi-indices: one entry per axis).
P_IDX, Q_IDX = sp.Symbol("p"), sp.Symbol("q")
K_IDX, K2_IDX = sp.Symbol("k"), sp.Symbol("k'")


def is_convolutional(program: Program) -> bool:
    """True if the program convolves (a ``Conv`` or ``AvgPool``) or reads an image input."""
    return any(isinstance(n, (Conv, AvgPool, Aggregate)) for n in program.nodes) or any(
        len(getattr(i, "position_axes", ())) > 1 for i in program.inputs)


@dataclass(frozen=True)
class ConvStep:
    """One node's pixel-pair kernels: how they are computed from earlier steps.

    ``kind``: "input" | "conv" | "affine" | "bias" | "phi" | "avgpool" | "pool" | "mix".
    ``reads``: indices of the steps read (with ``coeffs`` for "affine").
    ``window``/``strides``/``padding``: per axis (two axes: a 1-D program runs as H x 1 images).
    ``C``/``dC`` ("phi"): the closed forms E phi(u) phi(v), E phi'(u) phi'(v) in (q_1, s, q_2);
    ``C_same``/``dC_same`` the same at one pixel of one image, in q (exact diagonals).
    ``weight``/``weight_factor`` ("conv"): sigma_W^2 and the NTK factor a_W; ``bias``/
    ``bias_factor`` ("bias"): sigma_b^2 and a_b.  ``gaussian``: the vector is Gaussian.
    ``how``/``self_loops`` ("mix"): the aggregation's normalisation ("sum" | "mean") and whether
    the identity is added to the adjacency; ("pool"): the pooling.
    """
    kind: str
    node: Node
    reads: tuple = ()
    coeffs: tuple = ()
    window: tuple = (1, 1)
    strides: tuple = (1, 1)
    padding: str = "VALID"
    how: str = ""
    weight: sp.Expr = sp.S.Zero
    weight_factor: sp.Expr = sp.S.Zero
    bias: sp.Expr = sp.S.Zero
    bias_factor: sp.Expr = sp.S.Zero
    C: sp.Expr | None = None
    dC: sp.Expr | None = None
    C_same: sp.Expr | None = None
    dC_same: sp.Expr | None = None
    gaussian: bool = False
    has_theta: bool = True
    label: str = ""
    self_loops: bool = False


@dataclass(frozen=True, repr=False)
class ConvDerivation:
    """The derived CNTK of a convolutional program: steps in evaluation order, the readout, and
    the NNGP and NTK as expressions in the pooled kernels ``C_pool`` and ``Theta_pool``."""
    program: Program
    mode: str
    steps: tuple
    rank: int                         # number of position axes of the input (1 or 2)
    spatial: str                      # "full" (all pixel pairs) or "diagonal" (same pixel only)
    pooled: int                       # index of the Pool step the readout reads
    nngp: sp.Expr
    ntk: sp.Expr
    ntk_terms: dict = field(default_factory=dict)
    equations: tuple = ()             # (lhs, rhs, note) for printing

    C_POOL = sp.Symbol("C_pool", real=True)
    THETA_POOL = sp.Symbol("Theta_pool", real=True)

    def __repr__(self):
        kinds = [s.kind for s in self.steps]
        return (f"<ConvDerivation of {self.program.name!r}: {len(kinds)} steps "
                f"({', '.join(kinds)}), {self.spatial} pixel pairs>")

    def parameters(self) -> set:
        """Free model symbols (variances, widths) that must be bound to get numbers."""
        free = set(self.nngp.free_symbols) | set(self.ntk.free_symbols)
        for s in self.steps:
            for e in (s.weight, s.weight_factor, s.bias, s.bias_factor, s.C, s.dC, s.C_same,
                      s.dC_same, *s.coeffs):
                if e is not None:
                    free |= sp.sympify(e).free_symbols
        return free - {Q1, Q2, S12, Q, self.C_POOL, self.THETA_POOL}

    # -- printing and numbers
    def latex(self, environment: str = "align*") -> str:
        from .latex import conv_latex
        return conv_latex(self, environment)

    def _repr_latex_(self) -> str:
        return "$\\displaystyle " + self.latex(environment="aligned") + "$"

    def __str__(self) -> str:
        return "\n".join(f"{sp.sstr(l)} = {sp.sstr(r)}" for l, r, _ in self.equations)

    def compile(self, **options):
        """The Numba kernel (cached on disk): ``k = d.compile(); k(X1, X2=None, params=None)``."""
        from .codegen.conv import compile_conv
        return compile_conv(self, **options)

    def kernel_function(self, stacklevel: int = 2):
        return self.compile()

    def gram(self, X1, X2=None, params=None, diagonal: bool = False):
        """NNGP and NTK Gram matrices (by the compiled kernel)."""
        return self.compile()(X1, X2, params=params, diagonal=diagonal)


# ============================================================================ the rule table
class _Builder:
    def __init__(self, program: Program):
        self.program = program
        self.steps: list[ConvStep] = []
        self.index: dict[Node, int] = {}
        self.eqs: list = []

    def add(self, node, step: ConvStep) -> int:
        self.steps.append(step)
        self.index[node] = len(self.steps) - 1
        return self.index[node]

    def read(self, node) -> int:
        if node not in self.index:
            raise NotImplementedError(f"{type(node).__name__} {node.label()!r} is not derived "
                                      "over pixel positions")
        return self.index[node]

    def step_of(self, node) -> ConvStep:
        return self.steps[self.read(node)]


def _axes2(values: tuple, rank: int, fill: int) -> tuple:
    """Per-axis values for the two axes the kernel runs on (a 1-D program is H x 1)."""
    return tuple(values) + (fill,) * (2 - rank)


def _rule_input(b: _Builder, node: Input, rank: int):
    b.add(node, ConvStep("input", node, gaussian=False, has_theta=False, label=node.name))


def _rule_conv(b: _Builder, node: Conv, rank: int):
    src = b.read(node.vector)
    w = node.weight
    b.add(node, ConvStep(
        "conv", node, reads=(src,), window=_axes2(node.filter_shape, rank, 1),
        strides=_axes2(node.strides, rank, 1), padding=node.padding, weight=w.variance,
        weight_factor=weight_factor(w.parametrization, w.variance, w.fan_in), gaussian=True,
        label=_label(node)))


def _rule_avgpool(b: _Builder, node: AvgPool, rank: int):
    src = b.read(node.vector)
    b.add(node, ConvStep(
        "avgpool", node, reads=(src,), window=_axes2(node.filter_shape, rank, 1),
        strides=_axes2(node.strides, rank, 1), padding=node.padding,
        gaussian=b.steps[src].gaussian, has_theta=b.steps[src].has_theta, label=_label(node)))


def _rule_bias(b: _Builder, node: Bias, rank: int):
    b.add(node, ConvStep("bias", node, bias=node.variance,
                         bias_factor=bias_factor(node.parametrization, node.variance),
                         gaussian=True, label=node.name))


def _rule_nonlin(b: _Builder, node: Nonlin, rank: int):
    args = node.inputs
    if any(not isinstance(a, Vector) for a in args):
        raise NotImplementedError(f"Nonlin {node.label()!r} reads a Moment: not derived over "
                                  "pixel positions")
    reads = [b.read(a) for a in args]
    if not all(b.steps[r].gaussian for r in reads) and not _independent_sum(b, node, reads):
        raise NotImplementedError(
            f"Nonlin {node.label()!r} reads a non-Gaussian vector: only phi(h) and linear "
            "combinations of Gaussians (Conv outputs, biases) are derived over pixel positions")
    expr, vars_ = node.phi.expr, node.phi.variables
    poly = sp.Poly(expr, *vars_) if expr.is_polynomial(*vars_) else None
    if poly is not None and poly.total_degree() <= 1 and poly.coeff_monomial(1) == 0:
        coeffs = tuple(sp.sympify(poly.coeff_monomial(v)) for v in vars_)
        blocks = [_block(b, r) for r in reads]
        if len(set(blocks)) != len(blocks):
            raise NotImplementedError(f"Nonlin {node.label()!r} adds two vectors of one weight")
        if not any(b.steps[r].kind != "bias" for r in reads):
            raise NotImplementedError(f"Nonlin {node.label()!r} is a sum of biases only")
        b.add(node, ConvStep("affine", node, reads=tuple(reads), coeffs=coeffs,
                             gaussian=all(b.steps[r].gaussian for r in reads),
                             label=_label(node)))
        return
    if len(args) != 1 or b.steps[reads[0]].kind == "bias":
        raise NotImplementedError(
            f"Nonlin {node.label()!r}: over pixel positions a nonlinearity is applied to one "
            "positioned Gaussian vector (write phi(h) with h = conv + bias as its own node)")
    x = vars_[0]
    phi = expr
    dphi = partial_derivative(phi, x, f"the nonlinearity of {node.label()!r}:")
    C, dC, Cs, dCs = _closed_forms(phi, dphi, x, node)
    src = b.steps[reads[0]]
    b.add(node, ConvStep("phi", node, reads=tuple(reads), C=C, dC=dC, C_same=Cs, dC_same=dCs,
                         gaussian=False, has_theta=src.has_theta, label=_label(node)))


def _block(b: _Builder, r: int):
    """The independent Gaussian family a step belongs to: its weight (a Conv, or a fixed map of
    one, which stays in that weight's family), or the bias itself."""
    s = b.steps[r]
    while s.kind == "mix":
        s = b.steps[s.reads[0]]
    return s.node.weight if s.kind == "conv" else s.node


def _rule_aggregate(b: _Builder, node: Aggregate, rank: int):
    src = b.read(node.vector)
    b.add(node, ConvStep("mix", node, reads=(src,), how=node.how, self_loops=node.self_loops,
                         gaussian=b.steps[src].gaussian, has_theta=b.steps[src].has_theta,
                         label=_label(node)))

def _independent_sum(b: _Builder, node: Nonlin, reads) -> bool:
    r"""A residual sum :math:`\sum_i c_i x_i` with one non-Gaussian summand z and the others
    fresh Gaussians :math:`W y` (Conv outputs, biases) whose weights z does not depend on: the
    cross covariances vanish (Z^{Wy} is independent of every vector not built from W, TP1
    Thm 5.4), so C and Theta add with weights :math:`c_i^2` like the affine rule's."""
    expr, vars_ = node.phi.expr, node.phi.variables
    if not expr.is_polynomial(*vars_) or sp.Poly(expr, *vars_).total_degree() > 1:
        return False
    odd = [r for r in reads if not b.steps[r].gaussian]
    if len(odd) != 1 or b.steps[odd[0]].kind == "input":
        return False
    z = b.steps[odd[0]].node
    for r in reads:
        s = b.steps[r]
        if r == odd[0]:
            continue
        if s.kind not in ("conv", "bias"):
            return False
        if z.has(s.node.weight if s.kind == "conv" else s.node):
            return False
    return True


def _closed_forms(phi, dphi, x, node):
    """E phi(u) phi(v), E phi'(u) phi'(v) for a pixel pair of two images, and the same at one
    pixel of one image (one variance: exact where the pair form loses digits at c = 1)."""
    cov = sp.Matrix([[Q1, S12], [S12, Q2]])
    f1, f2 = phi.xreplace({x: _U1}), phi.xreplace({x: _U2})
    d1, d2 = dphi.xreplace({x: _U1}), dphi.xreplace({x: _U2})
    C = expect(f1 * f2, (_U1, _U2), cov)
    dC = expect(d1 * d2, (_U1, _U2), cov)
    Cs = expect(f1 ** 2, (_U1,), sp.Matrix([[Q]]))
    dCs = expect(d1 ** 2, (_U1,), sp.Matrix([[Q]]))
    # sqrt(1 - s^2/(q_1 q_2)) as sqrt((1 - c)(1 + c)) with the c = s/sqrt(q_1 q_2) that acos
    # reads: sin and acos of one rounded c stay consistent, so near c = 1 (two positions with the
    # same features: a graph's symmetric nodes) the dual loses O(theta^3), not O(sqrt(eps)) that
    # the next layer's acos would amplify to O(eps^(1/4))
    c = S12 * Q1 ** sp.Rational(-1, 2) * Q2 ** sp.Rational(-1, 2)
    one_minus = {1 - S12 ** 2 / (Q1 * Q2): sp.Mul(1 - c, 1 + c, evaluate=False)}
    C, dC = C.xreplace(one_minus), dC.xreplace(one_minus)
    for e in (C, dC, Cs, dCs):
        if e.has(GaussianExpectation):
            raise NotImplementedError(
                f"the nonlinearity of {node.label()!r} has no closed-form dual "
                f"({sp.sstr(phi)}): the convolutional kernel uses closed forms only so far")
    return C, dC, Cs, dCs


def _rule_pool(b: _Builder, node: Pool, rank: int):
    src = b.read(node.vector)
    if node.how == "last":
        raise NotImplementedError("Pool(x, 'last') of an image: use 'mean' (global average "
                                  "pooling) or 'flatten'")
    b.add(node, ConvStep("pool", node, reads=(src,), how=node.how,
                         gaussian=b.steps[src].gaussian, has_theta=b.steps[src].has_theta,
                         label=_label(node)))


#: One rule per node kind: rule(builder, node, rank) appends the node's step.
PIXEL_RULES = {
    Input: _rule_input,
    Conv: _rule_conv,
    AvgPool: _rule_avgpool,
    Bias: _rule_bias,
    Nonlin: _rule_nonlin,
    Pool: _rule_pool,
    Aggregate: _rule_aggregate,
}


#: Step kinds that mix positions (every pair (p, q) reads other pairs): they need all P^2 pairs.
MIXING_KINDS: set = {"mix"}

#: Equations of step kinds added by other modules: kind -> fn(steps, i, step) -> [(lhs, rhs, note)].
STEP_EQUATIONS: dict = {}


def _label(node) -> str:
    name = node.name if getattr(node, "name", None) else None
    return name or type(node).__name__.lower()


# ============================================================================ derive
def derive_conv(program: Program, mode: str = "gia") -> ConvDerivation:
    """The CNTK of a convolutional program (see the module docstring).

    Every weight is used once (a feedforward CNN), so the program is BP-like and GIA and exact
    modes agree (TP2 Thm 7.2); both are accepted.
    """
    if mode not in ("gia", "exact"):
        raise ValueError(f"mode must be 'gia' or 'exact', got {mode!r}")
    if program.repeats:
        program = program.unrolled()
    inputs = program.inputs
    if len(inputs) != 1 or inputs[0].positions is None:
        raise NotImplementedError("a convolutional program has one positioned Input (an image "
                                  "(N, H, W, C) or a signal (N, T, C))")
    rank = len(inputs[0].position_axes)
    if rank > 2:
        raise NotImplementedError(f"{rank}-D convolutions: only 1-D and 2-D positions so far")
    out = program.output
    if not isinstance(out, Readout):
        raise NotImplementedError("a convolutional program is read out by a trained Readout "
                                  "of a pooled vector (Pool(x, 'mean') or Pool(x, 'flatten'))")
    weights = [n for n in program.nodes if isinstance(n, Conv)]
    ws = [c.weight for c in weights]
    if len(set(ws)) != len(ws):
        raise NotImplementedError("a Conv weight used twice (tied filters) is not derived over "
                                  "pixel positions")
    b = _Builder(program)
    for node in program.nodes:
        if isinstance(node, (Readout, OutputBias, Weight)):
            continue            # parameters enter through the nodes that use them
        rule = PIXEL_RULES.get(type(node))
        if rule is None:
            raise NotImplementedError(f"{type(node).__name__} {node.label()!r} has no rule over "
                                      "pixel positions")
        rule(b, node, rank)
    pooled = b.read(out.vector)
    if b.steps[pooled].kind != "pool":
        raise NotImplementedError("the readout of a convolutional program reads Pool(x, 'mean') "
                                  "or Pool(x, 'flatten')")
    if not b.steps[pooled].has_theta:
        raise NotImplementedError("the readout reads the input directly: no hidden layer")
    spatial = "diagonal" if (b.steps[pooled].how == "flatten" and not any(
        s.kind == "avgpool" or s.kind in MIXING_KINDS for s in b.steps)) else "full"
    v = out.weight
    a_v = weight_factor(v.parametrization, v.variance, v.fan_in)
    Cp, Tp = ConvDerivation.C_POOL, ConvDerivation.THETA_POOL
    nngp = v.variance * Cp
    terms = {v.name: a_v * Cp}
    if out.bias is not None:
        nngp = nngp + out.bias.variance
        terms[out.bias.name] = bias_factor(out.bias.parametrization, out.bias.variance)
    ntk = sp.Add(*terms.values()) + v.variance * Tp
    eqs = _equations(b.steps, rank, pooled, nngp, ntk)
    return ConvDerivation(program, mode, tuple(b.steps), rank, spatial, pooled, nngp, ntk,
                          terms, tuple(eqs))


# ============================================================================ equations
class FilterSum(sp.Expr):
    r"""``sum_{k in F} body``: a sum over the offsets of a filter or pooling window (printing)."""

    def __new__(cls, body, index, window):
        return super().__new__(cls, sp.sympify(body), index, sp.Tuple(*window))

    def _latex(self, printer):
        body, index, window = self.args
        dims = r"\times".join(str(w) for w in window)
        return r"\sum_{%s \in [%s]} %s" % (printer._print(index), dims,
                                            printer.parenthesize(body, 60))

    def _sympystr(self, printer):
        body, index, window = self.args
        return f"sum_{{{index} in {'x'.join(map(str, window))}}} {printer._print(body)}"


def _family(kind: str, step: ConvStep, k: int) -> sp.IndexedBase:
    stem = {"C": r"\Sigma" if step.gaussian else "C", "T": r"\Theta"}[kind]
    return sp.IndexedBase(sp.Symbol(f"{stem}^{{({_tex(step.label)})}}"))


def _tex(label: str) -> str:
    return label.replace("_", r"\_")


def _equations(steps, rank, pooled, nngp, ntk) -> list:
    """(lhs, rhs, note) per step: the recursion over pixel pairs written once per layer."""
    eqs = []
    p, q, k, k2 = P_IDX, Q_IDX, K_IDX, K2_IDX
    for i, s in enumerate(steps):
        C, T = _family("C", s, i), _family("T", s, i)
        if s.kind == "input":
            chans = sp.Symbol("C_{in}")
            eqs.append((C[p, q], sp.Symbol(r"\xi_{p}") * sp.Symbol(r"\xi'_{q}") / chans,
                        "input kernel per pixel pair"))
        elif s.kind == "conv":
            src = steps[s.reads[0]]
            Cs, Ts = _family("C", src, s.reads[0]), _family("T", src, s.reads[0])
            sp_, sq_ = _tap(p, k, s), _tap(q, k, s)
            win = s.window[:rank]
            F = sp.Integer(int(sp.prod(win)))
            eqs.append((C[p, q], s.weight / F * FilterSum(Cs[sp_, sq_], k, win),
                        f"{s.padding} padding"))
            rhs = s.weight_factor / F * FilterSum(Cs[sp_, sq_], k, win)
            if src.has_theta:
                rhs = rhs + s.weight / F * FilterSum(Ts[sp_, sq_], k, win)
            eqs.append((T[p, q], rhs, ""))
        elif s.kind == "bias":
            continue
        elif s.kind == "affine":
            c_rhs, t_rhs = sp.S.Zero, sp.S.Zero
            for r, c in zip(s.reads, s.coeffs):
                src = steps[r]
                if src.kind == "bias":
                    c_rhs += c ** 2 * src.bias
                    t_rhs += c ** 2 * src.bias_factor
                else:
                    c_rhs += c ** 2 * _family("C", src, r)[p, q]
                    t_rhs += c ** 2 * _family("T", src, r)[p, q]
            eqs.append((C[p, q], c_rhs, ""))
            eqs.append((T[p, q], t_rhs, ""))
        elif s.kind == "phi":
            src = steps[s.reads[0]]
            Sg = _family("C", src, s.reads[0])
            Sa = sp.IndexedBase(sp.Symbol(rf"\Sigma^{{({_tex(src.label)})}}_{{\xi\xi}}"))
            Sb = sp.IndexedBase(sp.Symbol(rf"\Sigma^{{({_tex(src.label)})}}_{{\xi'\xi'}}"))
            sub = {Q1: Sa[p, p], Q2: Sb[q, q], S12: Sg[p, q]}
            eqs.append((C[p, q], s.C.xreplace(sub), ""))
            dname = sp.Symbol(rf"\dot C^{{({_tex(s.label)})}}")
            eqs.append((sp.IndexedBase(dname)[p, q], s.dC.xreplace(sub), ""))
            eqs.append((T[p, q], sp.IndexedBase(dname)[p, q] *
                        _family("T", src, s.reads[0])[p, q], ""))
        elif s.kind == "avgpool":
            src = steps[s.reads[0]]
            win = s.window[:rank]
            F = sp.Integer(int(sp.prod(win)))
            for fam in ("C", "T"):
                lhs = (C if fam == "C" else T)[p, q]
                srcf = _family(fam, src, s.reads[0])
                eqs.append((lhs, FilterSum(FilterSum(srcf[_tap(p, k, s), _tap(q, k2, s)], k2, win),
                                           k, win) / F ** 2, "" if fam == "T" else
                            f"{s.padding} padding"))
        elif s.kind in STEP_EQUATIONS:
            eqs.extend(STEP_EQUATIONS[s.kind](steps, i, s))
        elif s.kind == "pool":
            src = steps[s.reads[0]]
            Pn = sp.Symbol("P")
            for fam, lhs in (("C", ConvDerivation.C_POOL), ("T", ConvDerivation.THETA_POOL)):
                srcf = _family(fam, src, s.reads[0])
                if s.how == "mean":
                    rhs = sp.Sum(sp.Sum(srcf[p, q], (q, 1, Pn)), (p, 1, Pn)) / Pn ** 2
                elif s.how == "sum":
                    rhs = sp.Sum(sp.Sum(srcf[p, q], (q, 1, Pn)), (p, 1, Pn))
                else:
                    rhs = sp.Sum(srcf[p, p], (p, 1, Pn)) / Pn
                note = {"mean": "global average pooling", "sum": "sum pooling",
                        "flatten": "flatten: same pixels only"}[s.how]
                eqs.append((lhs, rhs, note if fam == "C" else ""))
        elif s.kind == "mix":
            src = steps[s.reads[0]]
            A1 = sp.IndexedBase(sp.Symbol(r"\hat A"))
            A2 = sp.IndexedBase(sp.Symbol(r"\hat A'"))
            u, v = sp.Symbol("u"), sp.Symbol("v")
            Pn = sp.Symbol("P")
            norm = ("A + I" if s.self_loops else "A") + (
                ", rows divided by the degree" if s.how == "mean" else "")
            for fam, lhs in (("C", C[p, q]), ("T", T[p, q])):
                if fam == "T" and not s.has_theta:
                    continue
                srcf = _family(fam, src, s.reads[0])
                rhs = sp.Sum(sp.Sum(A1[p, u] * srcf[u, v] * A2[q, v], (v, 1, Pn)), (u, 1, Pn))
                eqs.append((lhs, rhs, f"aggregation: hat A = {norm}" if fam == "C" else ""))
    eqs.append((sp.Symbol("K"), nngp, "NNGP"))
    eqs.append((sp.Symbol(r"\Theta"), ntk, "NTK"))
    return eqs


def _tap(p, k, s: ConvStep):
    """The input pixel s p + k - o read by output pixel p at offset k (o: the padding offset)."""
    stride = s.strides[0] if len(set(s.strides)) == 1 else sp.Symbol("s")
    o = sp.Symbol("o") if s.padding != "VALID" else 0
    return stride * p + k - o
