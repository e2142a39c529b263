r"""Attention and LayerNorm over the tokens of a sequence, and the Transformer NTK.

Two IR nodes, derived by the pixel-pair engine (:mod:`symntk.convolution`; a sequence of T tokens
runs as a T x 1 image, every token-pair kernel C_{p,q}, Theta_{p,q} of two sequences xi, xi'):

* ``Attention(values, keys, queries=keys, mechanism="softmax", scale=1, skip=False)``:

  .. math::

      y_t = \sum_s a_{ts} v_s\ (+\, v_t),\qquad
      a_{ts} = \mathrm{mech}_s\big(\mathrm{scale}\cdot q_t\cdot k_s / n\big),

  mech = softmax over s, or the identity.  With the 1/n scaling of the logits (TP2 App. E.5,
  NTK4A's Transformer; Neural Tangents' ``GlobalSelfAttention(linear_scaling=True)``, Hron et al.
  2020) the logits are Moments (NETSOR-T+, TP2 App. B) with deterministic limits
  :math:`\Lambda_{ts} = \mathrm{scale}\,\mathbb E Z^{q_t(\xi)}Z^{k_s(\xi)}`, one matrix per
  sequence: :math:`\Lambda = \mathrm{scale}\, C^{k}(\xi, \xi)` when queries are the keys (tied),
  and 0 when they come from independent weights (then softmax attention is uniform).  The
  attention matrix :math:`\tilde A = \mathrm{mech}(\Lambda) (+ I)` is therefore a fixed linear
  map of each sequence, and the gradients through the logits vanish in the limit (they are linear
  in :math:`\mathbb E Z^{dy} Z^{v} = 0`, TP2 App. E.5), so

  .. math::

      C^y = \tilde A(\xi)\, C^v\, \tilde A(\xi')^\top,\qquad
      \Theta^y = \tilde A(\xi)\, \Theta^v\, \tilde A(\xi')^\top .

* ``LayerNorm(x)``: :math:`y = (x - \bar x)/\sqrt{\overline{(x-\bar x)^2} + \epsilon}` over the
  width at every token.  For a zero-mean x (a Gaussian, an attention of Gaussians, a residual sum
  of those) the centring vanishes in the limit and the Jacobian's projection term contributes
  nothing to the NTK (TP2 App. E.5), so with :math:`q_p = C^x_{p,p}(\xi,\xi)`

  .. math::

      C^y_{p,q} = C^x_{p,q}/\sqrt{(q_p+\epsilon)(q'_q+\epsilon)},\qquad
      \Theta^y_{p,q} = \Theta^x_{p,q}/\sqrt{(q_p+\epsilon)(q'_q+\epsilon)}
      \quad(\mathrm{Corr}(C)\text{ of TP2 App. E.5}).

With ``linear_scaling=False`` the logits are :math:`\mathrm{scale}\,q_t\cdot k_s/\sqrt n` from
independent query and key weights: Gaussian in the limit (Hron et al. 2020), derived for the
identity mechanism only (:func:`_rule_gaussian_attention`).

Token masks (1 on a token, 0 on padding): a padded token gets attention weight 0 as a key (the
softmax is normalised over the real tokens; Neural Tangents' masking of ``GlobalSelfAttention``)
and takes no part in pooling, in the compiled kernel and in the finite network alike.

The compiled kernel (:mod:`symntk.codegen.conv`) computes :math:`\tilde A(\xi)` and
:math:`1/\sqrt{q_p}` once per sequence in its pass with itself and stores them as per-sequence
tables.  ``transformer`` builds NTK4A's Transformer (TP2 App. E.5), ``nt_attention_network``
Neural Tangents' ``Dense -> GlobalSelfAttention -> activation -> GlobalAvgPool -> Dense(1)``.
The finite-width network (:mod:`symntk.finite`) runs the real attention (logits, softmax and
their gradients) and the real LayerNorm.
"""
from __future__ import annotations

import numpy as np
import sympy as sp
from sympy.core.symbol import Str

from . import convolution as _conv
from . import finite as _finite
from .codegen import conv as _cg
from .convolution import ConvStep, _family, _label, _tex
from .program import (WIDTH, Bias, Conv, Input, OutputBias, Pool, Program, ProgramError,
                      Readout, Vector, Weight, _expr, _str, _variance, nonlin)

__all__ = ["Attention", "LayerNorm", "transformer", "nt_attention_network", "MECHANISMS",
           "ntk4a_vectorised"]

#: Attention mechanisms: the map from logits to attention weights (Neural Tangents' names).
MECHANISMS = ("softmax", "identity")


def _positioned_1d(vec, what):
    if not isinstance(vec, Vector) or vec.positions is None:
        raise ProgramError(f"{what}: needs a vector indexed by token positions, got "
                           f"{getattr(vec, 'label', lambda: type(vec).__name__)()!r}")


class Attention(Vector):
    r"""Self-attention over the tokens of one sequence (see the module docstring):
    y_t = sum_s mech_s(scale q_t . k_s / n) v_s (+ v_t with ``skip``)."""

    def __new__(cls, values, keys, queries=None, mechanism: str = "softmax", scale=1,
                skip: bool = False, name: str = "", heads: int = 1, linear_scaling: bool = True):
        for v, what in ((values, "values"), (keys, "keys")):
            _positioned_1d(v, f"Attention {what}")
        queries = keys if queries is None else queries
        _positioned_1d(queries, "Attention queries")
        if len({values.positions, keys.positions, queries.positions}) != 1:
            raise ProgramError("Attention: values, keys and queries must be indexed by the same "
                               "positions")
        if sp.simplify(keys.dim - queries.dim) != 0:
            raise ProgramError(f"Attention: keys ({keys.dim}) and queries ({queries.dim}) must "
                               "have one dimension")
        mech = str(mechanism).lower()
        if mech not in MECHANISMS:
            raise ProgramError(f"unknown attention mechanism {mechanism!r}; expected one of "
                               f"{MECHANISMS}")
        if not isinstance(heads, (int, sp.Integer)) or int(heads) < 1:
            raise ProgramError(f"Attention heads must be a positive int, got {heads!r}")
        if not isinstance(linear_scaling, bool):
            raise ProgramError(f"Attention linear_scaling must be True (logits q.k / n) or False "
                               f"(q.k / sqrt(n)), got {linear_scaling!r}")
        return super().__new__(cls, values, keys, queries, Str(mech),
                               _expr(scale, "attention scale"), sp.Integer(1 if skip else 0),
                               Str(_str(name)), sp.Integer(int(heads)),
                               sp.Integer(1 if linear_scaling else 0))

    values = property(lambda self: self.args[0])
    keys = property(lambda self: self.args[1])
    queries = property(lambda self: self.args[2])
    mechanism = property(lambda self: self.args[3].name)
    scale = property(lambda self: self.args[4])
    skip = property(lambda self: bool(self.args[5]))
    name = property(lambda self: self.args[6].name or None)
    heads = property(lambda self: int(self.args[7]))
    linear_scaling = property(lambda self: bool(self.args[8]))
    dim = property(lambda self: self.args[0].dim)
    positions = property(lambda self: self.args[0].positions)

    @property
    def operands(self) -> tuple:
        return tuple(dict.fromkeys((self.values, self.keys, self.queries)))

    def named(self, name):
        return Attention(self.values, self.keys, self.queries, self.mechanism, self.scale,
                         self.skip, name, self.heads, self.linear_scaling)

    def label(self):
        return self.name or f"attn({self.values.label()})"


class LayerNorm(Vector):
    r"""y = (x - mean(x)) / sqrt(var(x) + eps) over the width, at every token (Ba et al. 2016)."""

    def __new__(cls, vec, eps=0, name: str = ""):
        if not isinstance(vec, Vector):
            raise ProgramError(f"LayerNorm of a {type(vec).__name__}: needs a vector")
        return super().__new__(cls, vec, _expr(eps, "LayerNorm eps"), Str(_str(name)))

    vector = property(lambda self: self.args[0])
    eps = property(lambda self: self.args[1])
    name = property(lambda self: self.args[2].name or None)
    dim = property(lambda self: self.args[0].dim)
    positions = property(lambda self: self.args[0].positions)

    @property
    def operands(self) -> tuple:
        return (self.vector,)

    def named(self, name):
        return LayerNorm(self.vector, self.eps, name)

    def label(self):
        return self.name or f"LN({self.vector.label()})"


# ============================================================================ engine rules
def _zero_mean(steps, r) -> bool:
    """The vector of step r has mean 0 over the width in the limit (E Z = 0)."""
    s = steps[r]
    if s.kind in ("conv", "bias", "layernorm"):
        return True
    if s.kind in ("affine", "attention", "gattention"):
        reads = s.reads if s.kind == "affine" else s.reads[:1]
        return all(_zero_mean(steps, q) for q in reads)
    return False


def _rule_layernorm(b, node: LayerNorm, rank: int):
    src = b.read(node.vector)
    if not _zero_mean(b.steps, src):
        raise NotImplementedError(
            f"LayerNorm {node.label()!r} of {node.vector.label()!r}, whose mean over the width "
            "does not vanish in the limit (e.g. a relu output): the centring term would enter the "
            "kernel; only LayerNorm of zero-mean vectors (Gaussians, attention, residual sums) "
            "is derived")
    s = b.steps[src]
    b.add(node, ConvStep("layernorm", node, reads=(src,), bias=node.eps, gaussian=False,
                         has_theta=s.has_theta, label=_label(node)))


def _tied(b, node: Attention) -> bool:
    """Queries are the keys (the same vector): logits scale C^k(xi, xi).  Independent weights:
    logits 0.  Anything else is not derived."""
    if node.queries == node.keys:
        return True
    q, k = b.step_of(node.queries), b.step_of(node.keys)
    if q.kind == "conv" and k.kind == "conv" and q.node.weight != k.node.weight:
        return False
    raise NotImplementedError(
        f"Attention {node.label()!r}: queries must be the keys (tied, Neural Tangents' "
        "linear_scaling) or come from a Dense/Conv weight of their own")


def _rule_gaussian_attention(b, node: Attention):
    r"""Logits :math:`G_{ts} = \mathrm{scale}\, q_t\cdot k_s/\sqrt n` (Neural Tangents'
    ``linear_scaling=False``): with independent query and key weights they converge to a
    Gaussian process, :math:`\mathbb E\, G_{ts}(\xi) G_{t's'}(\xi') = \mathrm{scale}^2
    C^q_{tt'} C^k_{ss'}`, independent of the values (Hron et al. 2020, "Infinite attention",
    Thm. 3; in the limit of infinitely many heads the output after W_O is Gaussian).  The identity
    mechanism y_t = sum_s G_ts v_s then has

    .. math::

        C^y_{tt'} = \mathrm{scale}^2\, C^q_{tt'} \textstyle\sum_{s,s'} C^k_{ss'} C^v_{ss'},\qquad
        \Theta^y_{tt'} = \mathrm{scale}^2\big(\Theta^q_{tt'} \textstyle\sum C^k C^v
        + C^q_{tt'} \sum_{s,s'} (\Theta^k_{ss'} C^v_{ss'} + C^k_{ss'}\Theta^v_{ss'})\big)

    (the gradients through queries, keys and values; their weights' own terms sit in
    :math:`\Theta^q, \Theta^k, \Theta^v`).  Sums over s, s' run over the real tokens."""
    if node.mechanism != "identity":
        raise NotImplementedError(
            f"Attention {node.label()!r}: {node.mechanism} of Gaussian logits (linear_scaling="
            "False, q.k / sqrt(n)) has no closed form: the kernel is an expectation of a "
            "product of softmaxes over the logits' Gaussian law, a T-dimensional integral with "
            "no known closed form (Hron et al. 2020; Neural Tangents refuses it too); use "
            "mechanism='identity' or linear_scaling=True")
    if node.skip:
        raise NotImplementedError(f"Attention {node.label()!r}: skip with Gaussian logits")
    parts = [b.step_of(v) for v in (node.queries, node.keys, node.values)]
    if any(p.kind != "conv" for p in parts) or \
            len({p.node.weight for p in parts}) != 3:
        raise NotImplementedError(
            f"Attention {node.label()!r} with Gaussian logits (linear_scaling=False): queries, "
            "keys and values must each be a Dense/Conv of a weight of its own (independent), "
            "as in Neural Tangents; tied queries and keys give logits q.q / sqrt(n) that diverge")
    reads = tuple(b.read(v) for v in (node.values, node.keys, node.queries))
    b.add(node, ConvStep("gattention", node, reads=reads, how=node.mechanism,
                         weight=node.scale, gaussian=False,
                         has_theta=any(b.steps[r].has_theta for r in reads),
                         label=_label(node)))


def _rule_attention(b, node: Attention, rank: int):
    if rank != 1:
        raise NotImplementedError("Attention over 2-D positions: tokens are 1-D positions")
    if not node.linear_scaling:
        return _rule_gaussian_attention(b, node)
    vals = b.read(node.values)
    tied = _tied(b, node)
    keys = b.read(node.keys)
    s = b.steps[vals]
    b.add(node, ConvStep("attention", node, reads=(vals, keys), how=node.mechanism,
                         coeffs=(sp.Integer(int(node.skip)), sp.Integer(int(tied))),
                         weight=node.scale, gaussian=s.gaussian, has_theta=s.has_theta,
                         label=_label(node)))


_conv.PIXEL_RULES[LayerNorm] = _rule_layernorm
_conv.PIXEL_RULES[Attention] = _rule_attention
_conv.MIXING_KINDS.add("attention")


# ============================================================================ equations
def _self_kernel(step, pair: str) -> sp.IndexedBase:
    """The kernel of one sequence with itself (printing), named like the step's family."""
    stem = r"\Sigma" if step.gaussian else "C"
    return sp.IndexedBase(sp.Symbol(rf"{stem}^{{({_tex(step.label)})}}_{{{pair}}}"))


def _eq_layernorm(steps, i, s):
    p, q = _conv.P_IDX, _conv.Q_IDX
    src = steps[s.reads[0]]
    Cs, Ts = _family("C", src, s.reads[0]), _family("T", src, s.reads[0])
    Sa, Sb = _self_kernel(src, r"\xi\xi"), _self_kernel(src, r"\xi'\xi'")
    norm = sp.sqrt((Sa[p, p] + s.bias) * (Sb[q, q] + s.bias))
    C, T = _family("C", s, i), _family("T", s, i)
    out = [(C[p, q], Cs[p, q] / norm, "LayerNorm: the correlation")]
    if s.has_theta:
        out.append((T[p, q], Ts[p, q] / norm, ""))
    return out


def _eq_attention(steps, i, s):
    p, q = _conv.P_IDX, _conv.Q_IDX
    r, r2 = sp.Symbol("r"), sp.Symbol("r'")
    Tn = sp.Symbol("T")
    vals, keys = steps[s.reads[0]], steps[s.reads[1]]
    A = sp.IndexedBase(sp.Symbol(rf"\tilde A^{{({_tex(s.label)})}}"))
    A2 = sp.IndexedBase(sp.Symbol(rf"\tilde A'^{{({_tex(s.label)})}}"))
    Ck = _self_kernel(keys, r"\xi\xi")
    lam = s.weight * Ck[p, r] if int(s.coeffs[1]) else sp.S.Zero
    if s.how == "softmax":
        a = sp.exp(lam) / sp.Sum(sp.exp(lam.xreplace({r: r2})), (r2, 1, Tn))
    else:
        a = lam
    eye = sp.KroneckerDelta(p, r) if int(s.coeffs[0]) else sp.S.Zero
    out = [(A[p, r], a + eye, f"{s.how} attention" + (" + skip" if eye != 0 else "") +
            ", one matrix per sequence")]
    C, T = _family("C", s, i), _family("T", s, i)
    for fam, lhs in (("C", C), ("T", T)):
        if fam == "T" and not s.has_theta:
            continue
        src = _family(fam, vals, s.reads[0])
        out.append((lhs[p, q], sp.Sum(sp.Sum(A[p, r] * src[r, r2] * A2[q, r2], (r2, 1, Tn)),
                                      (r, 1, Tn)), ""))
    return out


def _eq_gattention(steps, i, s):
    p, q = _conv.P_IDX, _conv.Q_IDX
    r, r2 = sp.Symbol("r"), sp.Symbol("r'")
    Tn = sp.Symbol("T")
    v, k, qq = (steps[j] for j in s.reads)
    fam = lambda f, j: _family(f, steps[j], j)        # noqa: E731
    Cv, Ck, Cq = (fam("C", j) for j in s.reads)
    C, T = _family("C", s, i), _family("T", s, i)
    ssum = lambda e: sp.Sum(sp.Sum(e, (r2, 1, Tn)), (r, 1, Tn))     # noqa: E731
    sc = s.weight ** 2
    out = [(C[p, q], sc * Cq[p, q] * ssum(Ck[r, r2] * Cv[r, r2]),
            "identity attention of Gaussian logits q.k/sqrt(n) (Hron et al. 2020)")]
    if s.has_theta:
        Tv, Tk, Tq = (fam("T", j) if steps[j].has_theta else sp.S.Zero for j in s.reads)
        tk = Tk[r, r2] if Tk != 0 else 0
        tv = Tv[r, r2] if Tv != 0 else 0
        tq = Tq[p, q] if Tq != 0 else 0
        out.append((T[p, q], sc * (tq * ssum(Ck[r, r2] * Cv[r, r2]) +
                                   Cq[p, q] * ssum(tk * Cv[r, r2] + Ck[r, r2] * tv)), ""))
    return out


_conv.STEP_EQUATIONS["layernorm"] = _eq_layernorm
_conv.STEP_EQUATIONS["gattention"] = _eq_gattention
_conv.STEP_EQUATIONS["attention"] = _eq_attention


# ============================================================================ code generation
class _LayerNormEmitter:
    scratch = ()
    width = 1

    @staticmethod
    def emit(out, i, s, steps, full, pr):
        src = s.reads[0]
        has_t = steps[src].has_theta
        eps = pr.doprint(sp.sympify(s.bias))
        idx_a, idx_b = ("i, j, i, j", "k, l, k, l") if full else ("i, j", "k, l")
        out(1, "if same:")
        out(2, f"for i in range(dims[{i}, 0]):")
        out(3, f"for j in range(dims[{i}, 1]):")
        out(4, f"ha{i}[i, j, 0] = 1.0 / math.sqrt(C{src}[{idx_a}] + {eps})")
        out(1, f"for i in range(dims[{i}, 0]):")
        out(2, f"for j in range(dims[{i}, 1]):")
        if full:
            out(3, f"for k in range(dims[{i}, 0]):")
            out(4, f"for l in range(dims[{i}, 1]):")
            out(5, f"r = ha{i}[i, j, 0] * hb{i}[k, l, 0]")
            out(5, f"C{i}[i, j, k, l] = C{src}[i, j, k, l] * r")
            out(5, f"T{i}[i, j, k, l] = " + (f"T{src}[i, j, k, l] * r" if has_t else "0.0"))
        else:
            out(3, f"r = ha{i}[i, j, 0] * hb{i}[i, j, 0]")
            out(3, f"C{i}[i, j] = C{src}[i, j] * r")
            out(3, f"T{i}[i, j] = " + (f"T{src}[i, j] * r" if has_t else "0.0"))


class _AttentionEmitter:
    scratch = ("M",)
    width = None            # one column per token: the sequence's T x T attention matrix
    masked = True           # padded keys (w1[r] = 0) get attention weight 0

    @staticmethod
    def emit(out, i, s, steps, full, pr):
        vals, keys = s.reads
        skip, tied = int(s.coeffs[0]), int(s.coeffs[1])
        scale = pr.doprint(sp.sympify(s.weight))
        out(1, f"P = dims[{i}, 0] * dims[{i}, 1]")
        out(1, "if same:")
        out(2, f"At = ha{i}.reshape((P, P))")
        out(2, f"lg = C{keys}.reshape((P, P))")
        out(2, "for p in range(P):")
        lam = f"{scale} * lg[p, r]" if tied else "0.0"
        # w1: this sequence's token weights (1 on a token, 0 on padding): the softmax runs over
        # the real keys, the identity drops the padded ones
        if s.how == "softmax":
            out(3, "mx = -np.inf")
            out(3, "for r in range(P):")
            out(4, "if w1[r] != 0.0:")
            out(5, f"mx = max(mx, {lam})")
            out(3, "tot = 0.0")
            out(3, "for r in range(P):")
            out(4, f"At[p, r] = math.exp({lam} - mx) if w1[r] != 0.0 else 0.0")
            out(4, "tot += At[p, r]")
            out(3, "for r in range(P):")
            out(4, "At[p, r] /= tot")
        else:
            out(3, "for r in range(P):")
            out(4, f"At[p, r] = {lam} * w1[r]")
        if skip:
            out(3, "At[p, p] += 1.0")
        out(1, f"A1 = ha{i}.reshape((P, P))")
        out(1, f"A2 = hb{i}.reshape((P, P))")
        out(1, f"M = M{i}.reshape((P, P))")
        fams = ("C", "T") if steps[vals].has_theta else ("C",)
        for fam in fams:
            # A1 X A2^T in two P^3 passes through the scratch M
            out(1, f"src = {fam}{vals}.reshape((P, P))")
            out(1, f"dst = {fam}{i}.reshape((P, P))")
            out(1, "for p in range(P):")
            out(2, "for r2 in range(P):")
            out(3, "acc = 0.0")
            out(3, "for r in range(P):")
            out(4, "acc += A1[p, r] * src[r, r2]")
            out(3, "M[p, r2] = acc")
            out(1, "for p in range(P):")
            out(2, "for q in range(P):")
            out(3, "acc = 0.0")
            out(3, "for r2 in range(P):")
            out(4, "acc += M[p, r2] * A2[q, r2]")
            out(3, "dst[p, q] = acc")
        if "T" not in fams:
            out(1, f"T{i}[:] = 0.0")


class _GaussianAttentionEmitter:
    """C^y = scale^2 C^q sum_{s,s'} w1 w2 C^k C^v (Theta likewise): no per-sequence table."""
    scratch = ()
    width = 1
    masked = True

    @staticmethod
    def emit(out, i, s, steps, full, pr):
        vals, keys, qs = s.reads
        sc = pr.doprint(sp.sympify(s.weight) ** 2)
        out(1, f"P = dims[{i}, 0] * dims[{i}, 1]")
        for nm, j in (("v", vals), ("k", keys), ("q", qs)):
            out(1, f"c{nm} = C{j}.reshape((P, P))")
            if steps[j].has_theta:
                out(1, f"t{nm} = T{j}.reshape((P, P))")
        tv, tk = steps[vals].has_theta, steps[keys].has_theta
        out(1, "skv = 0.0")
        out(1, "tkv = 0.0")
        out(1, "for r in range(P):")
        out(2, "if w1[r] != 0.0:")
        out(3, "for r2 in range(P):")
        out(4, "if w2[r2] != 0.0:")
        out(5, "skv += ck[r, r2] * cv[r, r2]")
        terms = ([] if not tk else ["tk[r, r2] * cv[r, r2]"]) + \
            ([] if not tv else ["ck[r, r2] * tv[r, r2]"])
        if terms:
            out(5, f"tkv += {' + '.join(terms)}")
        out(1, f"dst = C{i}.reshape((P, P))")
        out(1, f"dth = T{i}.reshape((P, P))")
        tq = "tq[p, q] * skv + " if steps[qs].has_theta else ""
        out(1, "for p in range(P):")
        out(2, "for q in range(P):")
        out(3, f"dst[p, q] = {sc} * cq[p, q] * skv")
        out(3, f"dth[p, q] = {sc} * ({tq}cq[p, q] * tkv)")


_cg.STEP_EMITTERS["layernorm"] = _LayerNormEmitter
_cg.STEP_EMITTERS["gattention"] = _GaussianAttentionEmitter
_cg.STEP_EMITTERS["attention"] = _AttentionEmitter


# ============================================================================ finite width
def _softmax(L):
    e = np.exp(L - L.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _split(x, H):
    """(N, T, n) -> (N, H, T, n / H): the channels of each head side by side."""
    N, T, n = x.shape
    if n % H:
        raise ValueError(f"width {n} is not a multiple of {H} attention heads")
    return x.reshape(N, T, H, n // H).transpose(0, 2, 1, 3)


def _merge(x):
    N, H, T, c = x.shape
    return x.transpose(0, 2, 1, 3).reshape(N, T, H * c)


def _attention_parts(net, node: Attention, env):
    """Per head h (channels h n/H .. (h+1) n/H - 1 of queries, keys and values):
    A_h = mech(scale Q_h K_h^T / (n / H)) (``linear_scaling``; in the limit every head has the
    same A), or mech(scale Q_h K_h^T / sqrt(n / H)) (Gaussian logits, a different A per head)."""
    H = node.heads
    V, K, Q = (_split(env[a], H) for a in (node.values, node.keys, node.queries))
    scale = _finite._number(node.scale, net._binding, f"scale of {node.label()}")
    m = K.shape[-1]
    m = m if node.linear_scaling else np.sqrt(m)      # logits q.k / m or q.k / sqrt(m)
    L = scale * (Q @ np.swapaxes(K, 2, 3)) / m
    keep = env.get(_finite._NODE_MASK)          # token mask (N, T): padded keys get weight 0
    if keep is not None:
        keep = keep[:, None, None, :]
        L = np.where(keep, L, -np.inf) if node.mechanism == "softmax" else L * keep
    A = _softmax(L) if node.mechanism == "softmax" else L
    return V, K, Q, scale, m, A


def _fwd_attention(net, node: Attention, env, n):
    if env[node.values].ndim != 3:
        raise NotImplementedError("the finite-width Attention runs over 1-D token positions")
    V, _, _, _, _, A = _attention_parts(net, node, env)
    y = _merge(A @ V)
    return y + env[node.values] if node.skip else y


def _bwd_attention(net, node: Attention, G, env, tape):
    """y = A V (+ V), A = mech(scale Q K^T / m) per head: dV = A^T G (+ G), dA = G V^T;
    softmax rows: dL = A * (dA - sum_s dA A); dQ = scale dL K / m, dK = scale dL^T Q / m."""
    V, K, Q, scale, m, A = _attention_parts(net, node, env)
    Gh = _split(G, node.heads)
    dV = _merge(np.swapaxes(A, 2, 3) @ Gh)
    tape.add(node.values, dV + G if node.skip else dV)
    dA = Gh @ np.swapaxes(V, 2, 3)
    if node.mechanism == "softmax":
        dL = A * (dA - (dA * A).sum(axis=-1, keepdims=True))   # 0 on padded keys (A = 0)
    else:
        keep = env.get(_finite._NODE_MASK)
        dL = dA if keep is None else dA * keep[:, None, None, :]
    tape.add(node.queries, _merge(scale * (dL @ K) / m))
    tape.add(node.keys, _merge(scale * (np.swapaxes(dL, 2, 3) @ Q) / m))


def _ln_parts(net, node: LayerNorm, env):
    x = env[node.vector]
    eps = _finite._number(node.eps, net._binding, f"eps of {node.label()}")
    xc = x - x.mean(axis=-1, keepdims=True)
    sd = np.sqrt((xc ** 2).mean(axis=-1, keepdims=True) + eps)
    return xc / sd, sd


def _fwd_layernorm(net, node: LayerNorm, env, n):
    return _ln_parts(net, node, env)[0]


def _bwd_layernorm(net, node: LayerNorm, G, env, tape):
    """dx = (G - mean(G) - y mean(G y)) / sd (the Jacobian of centring and scaling)."""
    y, sd = _ln_parts(net, node, env)
    g = (G - G.mean(axis=-1, keepdims=True) - y * (G * y).mean(axis=-1, keepdims=True)) / sd
    tape.add(node.vector, g)


_finite.TOKEN_MASKED.add(Attention)
_finite._FORWARD[Attention] = _fwd_attention
_finite._BACKWARD[Attention] = _bwd_attention
_finite._FORWARD[LayerNorm] = _fwd_layernorm
_finite._BACKWARD[LayerNorm] = _bwd_layernorm


# ============================================================================ builders
_A, _B = sp.symbols("a b", real=True)

def transformer(depth: int, activation="relu", sigma_u2=1, sigma_w2=1, sigma_v2=1,
                mechanism: str = "softmax", parametrization: str = "tp", input_dim=None,
                width=WIDTH) -> Program:
    r"""NTK4A's Transformer (TP2 App. E.5): for l = 1..depth, at every token i,

        k^l = U^l x^{l-1},  y^l = Attn(k^l) + k^l,  z^l = LN(y^l),
        h^l = W^{l2} phi(W^{l1} z^l),  x^l = LN(h^l + z^l),

    attention with queries = keys = values = k^l and logits k_i . k_j / n (softmax, temperature
    1), LayerNorm without eps, no biases; output f = (1/T) sum_i v . x^L_i / sqrt(n).
    U^1 ~ sigma_u2 / d, U^l, W^{l1}, W^{l2} ~ sigma_u2 / n, sigma_w2 / n, v ~ sigma_v2 (every
    variance a parameter: a number or a SymPy symbol).  ``parametrization="tp"`` (every entry
    trained, NTK factor 1) as NTK4A's notebook; ``"ntk"`` gives Neural Tangents' factors.
    """
    from .builders import D_IN
    if not isinstance(depth, int) or depth < 1:
        raise ProgramError(f"depth must be a positive int, got {depth!r}")
    su = _variance(sigma_u2, "sigma_u2")
    sw = _variance(sigma_w2, "sigma_w2")
    sv = _variance(sigma_v2, "sigma_v2")
    x = Input("x", input_dim if input_dim is not None else D_IN, positions="t")
    for l in range(1, depth + 1):
        U = Weight(f"U{l}", fan_out=width, fan_in=x.dim, variance=su,
                   parametrization=parametrization)
        k = Conv(U, x, (1,), name=f"k{l}")
        y = Attention(k, k, mechanism=mechanism, skip=True, name=f"y{l}")
        z = LayerNorm(y, name=f"z{l}")
        W1 = Weight(f"W{l}_1", fan_out=width, fan_in=width, variance=sw,
                    parametrization=parametrization)
        g = Conv(W1, z, (1,), name=f"g{l}")
        a = nonlin(activation, g, name=f"phi{l}")
        W2 = Weight(f"W{l}_2", fan_out=width, fan_in=width, variance=sw,
                    parametrization=parametrization)
        h = Conv(W2, a, (1,), name=f"h{l}")
        x = LayerNorm(nonlin(sp.Lambda((_A, _B), _A + _B), h, z, name=f"r{l}"), name=f"x{l}")
    v = Weight("v", fan_out=1, fan_in=width, variance=sv, parametrization=parametrization)
    return Program(Readout(v, Pool(x, "mean", name="mean")), name=f"transformer{depth}")


def nt_attention_network(mechanism: str = "softmax", activation="relu", W_std=1.0,
                         b_std=None, W_key_std=1.0, W_query_std=1.0, W_value_std=1.0,
                         W_out_std=1.0, attention_b_std=None, input_dim=None,
                         width=WIDTH, n_heads: int = 1, linear_scaling: bool = True) -> Program:
    r"""Neural Tangents' ``serial(Dense(n, W_std, b_std), GlobalSelfAttention(n, n, n, heads,
    linear_scaling=True, W_key_std, W_value_std, W_query_std, W_out_std, b_std=attention_b_std,
    attention_mechanism), activation, GlobalAvgPool(), Dense(1, W_std, b_std))`` over tokens, NTK
    parametrization (Hron et al. 2020, "Infinite attention").

    The attention is values :math:`V = W_V h`, keys :math:`K = W_K h` (variance W_key_std^2),
    queries tied to the keys scaled by W_query_std / W_key_std, logits
    :math:`W_{query}W_{key}\,h_t\cdot h_s/n` in the limit, output :math:`W_O\,\mathrm{Attn} + b`.
    ``n_heads`` splits keys, queries and values into heads of n / n_heads channels each (NT's
    ``n_chan_key = n_chan_val = n / n_heads``); the kernel does not depend on it (every head has
    the same limit), the finite network does.

    ``linear_scaling=False``: NT's standard attention, logits :math:`q_t\cdot k_s/\sqrt n` with
    queries :math:`W_Q h` from a weight of their own (variance W_query_std^2); the logits are
    Gaussian in the limit (Hron et al. 2020), only the identity mechanism has a closed form, and
    the query and key weights contribute to the NTK.  The limit is that of infinitely many heads
    as well: a finite network needs many heads (``n_heads``) to approach it.
    """
    from .builders import D_IN
    var = lambda s, what: _variance(sp.sympify(s) ** 2, what)    # noqa: E731
    x = Input("x", input_dim if input_dim is not None else D_IN, positions="t")
    W0 = Weight("W0", fan_out=width, fan_in=x.dim, variance=var(W_std, "W_std"))
    h = Conv(W0, x, (1,), name="dense")
    if b_std is not None:
        h = h + Bias("b0", dim=width, variance=var(b_std, "b_std"))
    WK = Weight("W_K", fan_out=width, fan_in=width, variance=var(W_key_std, "W_key_std"))
    WV = Weight("W_V", fan_out=width, fan_in=width, variance=var(W_value_std, "W_value_std"))
    WO = Weight("W_O", fan_out=width, fan_in=width, variance=var(W_out_std, "W_out_std"))
    keys = Conv(WK, h, (1,), name="keys")
    vals = Conv(WV, h, (1,), name="values")
    if linear_scaling:
        att = Attention(vals, keys, mechanism=mechanism,
                        scale=sp.sympify(W_query_std) / sp.sympify(W_key_std), name="attn",
                        heads=n_heads)
    else:
        WQ = Weight("W_Q", fan_out=width, fan_in=width,
                    variance=var(W_query_std, "W_query_std"))
        att = Attention(vals, keys, Conv(WQ, h, (1,), name="queries"), mechanism=mechanism,
                        name="attn", heads=n_heads, linear_scaling=False)
    o = Conv(WO, att, (1,), name="attn_out")
    if attention_b_std is not None:
        o = o + Bias("b_attn", dim=width, variance=var(attention_b_std, "attention_b_std"))
    a = nonlin(activation, o, name="act")
    v = Weight("v", fan_out=1, fan_in=width, variance=var(W_std, "W_std"))
    b = OutputBias("b_out", var(b_std, "b_std")) if b_std is not None else None
    return Program(Readout(v, Pool(a, "mean", name="gap"), b),
                   name=f"nt_attention_{mechanism}" + ("" if linear_scaling else "_sqrt"))


# ============================================================================ NumPy reference
def ntk4a_vectorised(X, depth: int, sigma_u2=1.0, sigma_w2=1.0, sigma_v2=1.0,
                     sigma_u_power: int = 1):
    r"""NNGP and NTK (M x M) of NTK4A's ReLU Transformer by TP2 App. E.5's vectorised formulas on
    (M, T, M, T) tensors, all sequences at once (the baseline the compiled kernel is timed
    against).  Backward: :math:`D^{x^{l-1}} = \sigma_u^2 D^{k^l}`; ``sigma_u_power=2`` gives
    NTK4A's notebook, which multiplies by :math:`(\sigma_u^2)^2` there."""
    X = np.asarray(X, dtype=np.float64)
    M, T, d = X.shape
    # the attention matrices are block diagonal (one T x T matrix per sequence): kept as
    # (M, T, T), so A C A'^T costs M^2 T^3, not (M T)^3
    def sandwich(A, C, B):                          # A C B^T per sequence pair
        return np.einsum("aij,ajbl,bkl->aibk", A, C, B, optimize=True)

    def isqrt_diag(C):
        return 1.0 / np.sqrt(np.einsum("aiai->ai", C))

    def conj(D, s):
        return s[:, :, None, None] * D * s[None, None, :, :]

    def relu_duals(C):
        q = np.einsum("aiai->ai", C)
        nrm = np.sqrt(q[:, :, None, None] * q[None, None, :, :])   # exact q on the diagonal
        c = np.clip(C / nrm, -1.0, 1.0)
        th = np.arccos(c)
        return nrm * (np.sqrt(1 - c * c) + (np.pi - th) * c) / (2 * np.pi), \
            (np.pi - th) / (2 * np.pi)

    Cx = [np.einsum("ais,bjs->aibj", X, X) / d]
    layers = []
    for _ in range(depth):
        Ck = sigma_u2 * Cx[-1]
        L = np.einsum("aiaj->aij", Ck)                 # each sequence's own logits
        E = np.exp(L - L.max(axis=2, keepdims=True))
        A = E / E.sum(axis=2, keepdims=True) + np.eye(T)
        At = A.transpose(0, 2, 1)
        Cy = sandwich(A, Ck, A)
        dz = isqrt_diag(Cy)
        Cz = conj(Cy, dz)
        Vg, dVg = relu_duals(sigma_w2 * Cz)
        S = sigma_w2 * Vg + Cz
        dx = isqrt_diag(S)
        Cx.append(conj(S, dx))
        layers.append((A, At, dz, Cz, Vg, dVg, dx))
    pooled = Cx[-1].sum(axis=(1, 3)) / T ** 2
    nngp, ntk = sigma_v2 * pooled, pooled.copy()
    Dx = np.full(Cx[-1].shape, sigma_v2 / T ** 2)
    for l in reversed(range(depth)):
        A, At, dz, Cz, Vg, dVg, dx = layers[l]
        Dh = conj(Dx, dx)
        Dg = sigma_w2 * Dh * dVg
        Dy = conj(sigma_w2 * Dg + Dh, dz)
        Dk = sandwich(At, Dy, At)
        ntk += (Dk * Cx[l] + Dg * Cz + Dh * Vg).sum(axis=(1, 3))
        Dx = sigma_u2 ** sigma_u_power * Dk
    return nngp, ntk
