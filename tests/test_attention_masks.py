"""Masks in attention: sequences of different lengths passed as one padded batch.

A padded token (mask 0) is excluded from every attention as a key (weight 0; the softmax is
normalised over the real tokens) and from the pooling, so the kernel of a padded batch is the
kernel of the unpadded sequences.  The references below are written here, independently of the
engine, per pair of *unpadded* sequences of lengths (La, Lb) (which may differ):

* NTK4A's Transformer (TP2 App. E.5): forward kernels of the blocks (a, a), (b, b), (a, b),
  attention matrix A_a = softmax(sigma_u^2 C^x_aa) + I of each sequence, LayerNorm as the
  correlation, then the backward pass D^k = A_a^T D^y A_b;
* Neural Tangents' GlobalSelfAttention (linear_scaling=True, Hron et al. 2020):
  K -> W_OV^2 G_a K G_b^T + b^2, Theta -> W_OV^2 (G_a Theta G_b^T + 2 G_a K G_b^T) + b^2.

The programs are those of tests/test_transformer.py, so their compiled kernels are shared.
"""
import numpy as np
import pytest
import sympy as sp

import symntk
from symntk.attention import nt_attention_network, transformer
from symntk.finite import sample
from symntk.masks import prepare_tokens

D, T = 3, 6
L1, L2 = [6, 3, 4, 3], [5, 2, 6]                  # X1 and X2 hold different lengths
NT = dict(W_std=1.3, b_std=0.2, W_key_std=1.1, W_query_std=0.8, W_value_std=1.2,
          W_out_std=0.9, attention_b_std=0.3)
_SU, _SW, _SV = sp.symbols("su2 sw2 sv2")
PARAMS = {"su2": 2.0, "sw2": 1.5, "sv2": 0.7}


# ----------------------------------------------------------------------------- references
def _relu(C, qa, qb):
    """E relu(u) relu(v), E step(u) step(v) for the block C (La, Lb), variances qa, qb."""
    nrm = np.sqrt(np.outer(qa, qb))
    c = np.clip(C / nrm, -1.0, 1.0)
    th = np.arccos(c)
    return nrm * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def _softmax(L):
    E = np.exp(L - L.max(axis=1, keepdims=True))
    return E / E.sum(axis=1, keepdims=True)


def transformer_pair(xa, xb, depth, vu, vw, vv):
    """NNGP and NTK of NTK4A's ReLU Transformer for two unpadded sequences."""
    seq = {"a": xa, "b": xb}
    pairs = ("aa", "bb", "ab")
    Cx = {p: seq[p[0]] @ seq[p[1]].T / D for p in pairs}
    hist = []
    for _ in range(depth):
        Ck = {p: vu * Cx[p] for p in pairs}
        A = {s: _softmax(Ck[s + s]) + np.eye(len(seq[s])) for s in "ab"}
        Cy = {p: A[p[0]] @ Ck[p] @ A[p[1]].T for p in pairs}
        dz = {s: 1 / np.sqrt(np.diag(Cy[s + s])) for s in "ab"}
        Cz = {p: dz[p[0]][:, None] * Cy[p] * dz[p[1]][None] for p in pairs}
        q = {s: vw * np.diag(Cz[s + s]) for s in "ab"}
        duals = {p: _relu(vw * Cz[p], q[p[0]], q[p[1]]) for p in pairs}
        S = {p: vw * duals[p][0] + Cz[p] for p in pairs}
        dx = {s: 1 / np.sqrt(np.diag(S[s + s])) for s in "ab"}
        hist.append((Cx["ab"], A, dz, dx, Cz["ab"], *duals["ab"]))
        Cx = {p: dx[p[0]][:, None] * S[p] * dx[p[1]][None] for p in pairs}
    pooled = Cx["ab"].mean()
    nngp, ntk = vv * pooled, pooled
    Dx = np.full(Cx["ab"].shape, vv / Cx["ab"].size)
    for Cprev, A, dz, dx, Cz, Vg, dVg in reversed(hist):
        Dh = dx["a"][:, None] * Dx * dx["b"][None]
        Dg = vw * Dh * dVg
        Dy = dz["a"][:, None] * (vw * Dg + Dh) * dz["b"][None]
        Dk = A["a"].T @ Dy @ A["b"]
        ntk += (Dk * Cprev + Dg * Cz + Dh * Vg).sum()
        Dx = vu * Dk
    return nngp, ntk


def hron_pair(xa, xb, mechanism, W_std, b_std, W_key_std, W_query_std, W_value_std,
              W_out_std, attention_b_std):
    """Dense -> GlobalSelfAttention(linear_scaling) -> ReLU -> GAP -> Dense(1), NTK param."""
    seq = {"a": xa, "b": xb}
    pairs = ("aa", "bb", "ab")
    K = {p: W_std ** 2 * seq[p[0]] @ seq[p[1]].T / D + b_std ** 2 for p in pairs}
    G = {s: W_query_std * W_key_std * K[s + s] for s in "ab"}
    if mechanism == "softmax":
        G = {s: _softmax(g) for s, g in G.items()}
    ov2, ab2 = (W_value_std * W_out_std) ** 2, attention_b_std ** 2
    GKG = {p: G[p[0]] @ K[p] @ G[p[1]].T for p in pairs}
    Ka = {p: ov2 * GKG[p] + ab2 for p in pairs}
    Ta = ov2 * 3 * GKG["ab"] + ab2            # Theta of the dense layer is K: G K G' + 2 G K G'
    V, dV = _relu(Ka["ab"], np.diag(Ka["aa"]), np.diag(Ka["bb"]))
    nngp = W_std ** 2 * V.mean() + b_std ** 2
    return nngp, nngp + W_std ** 2 * (dV * Ta).mean()


# ----------------------------------------------------------------------------- data
def _padded(seed, lengths, front=()):
    """Sequences of the given lengths padded to T with garbage (large values), their masks and
    the unpadded sequences; rows in ``front`` put their padding before the tokens."""
    rng = np.random.default_rng(seed)
    X = 50 * rng.standard_normal((len(lengths), T, D))
    mask = np.zeros((len(lengths), T), dtype=bool)
    seqs = []
    for i, L in enumerate(lengths):
        pos = np.arange(T - L, T) if i in front else np.arange(L)
        X[i, pos] = rng.standard_normal((L, D))
        mask[i, pos] = True
        seqs.append(X[i, pos])
    return X, mask, seqs


@pytest.fixture(scope="module")
def data():
    return _padded(0, L1, front=(1,)), _padded(1, L2)


_CASES = {
    "transformer": (lambda: transformer(1, sigma_u2=_SU, sigma_w2=_SW, sigma_v2=_SV),
                    lambda a, b: transformer_pair(a, b, 1, *PARAMS.values()), PARAMS),
    "nt_softmax": (lambda: nt_attention_network("softmax", **NT),
                   lambda a, b: hron_pair(a, b, "softmax", **NT), None),
    "nt_identity": (lambda: nt_attention_network("identity", **NT),
                    lambda a, b: hron_pair(a, b, "identity", **NT), None),
}


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", sorted(_CASES))
def test_padded_kernel_equals_unpadded(case, data):
    """Every entry of the kernel of the padded batches X1 (lengths 6, 3, 4, 3; one row padded in
    front) and X2 (5, 2, 6) with their masks equals the kernel of the two unpadded sequences:
    to 1e-12 against the compiled kernel of the unpadded pair where the lengths agree (a kernel
    takes sequences of one length), and against the NumPy reference for every pair."""
    build, ref, params = _CASES[case]
    (X1, m1, s1), (X2, m2, s2) = data
    p = build()
    k = symntk.derive(p).compile()
    r12 = symntk.kernel(p, X1, X2, params=params, mask1=m1, mask2=m2)
    r11 = symntk.kernel(p, X1, params=params, mask1=m1)
    for rr, sb in ((r12, s2), (r11, s1)):
        for a, xa in enumerate(s1):
            for b, xb in enumerate(sb):
                nngp, ntk = ref(xa, xb)
                np.testing.assert_allclose([rr.nngp[a, b], rr.ntk[a, b]], [nngp, ntk],
                                           rtol=1e-11, atol=0, err_msg=f"{case} pair {a, b}")
                if len(xa) == len(xb):
                    # a sequence with itself: the symmetric call (exact at correlation 1)
                    u = k(xa[None], None if xb is xa else xb[None], params=params)
                    np.testing.assert_allclose([rr.nngp[a, b], rr.ntk[a, b]],
                                               [u.nngp[0, 0], u.ntk[0, 0]], rtol=1e-12, atol=0)
    # without the mask the padding (garbage) changes the kernel: the mask is what excludes it
    assert not np.allclose(k(X1, params=params).ntk, r11.ntk, rtol=1e-3)


@pytest.mark.parametrize("case", ["transformer", "nt_softmax"])
def test_finite_network_padded_equals_unpadded(case, data):
    """The finite network (width 16, 2 heads for NT's) given {x: X, 'mask': m}: the outputs and
    the empirical NTK of the padded batches equal those of the unpadded sequences."""
    (X1, m1, s1), (X2, m2, s2) = data
    build = {"transformer": lambda: transformer(1, sigma_u2=2.0),
             "nt_softmax": lambda: nt_attention_network("softmax", n_heads=2, **NT)}[case]
    net = sample(build(), 16, 0, None, D)
    f1 = net({"x": X1, "mask": m1})
    np.testing.assert_allclose(f1, [net(x[None])[0] for x in s1], rtol=1e-12, atol=1e-14)
    e = net.ntk({"x": X1, "mask": m1}, {"x": X2, "mask": m2})
    want = np.array([[net.ntk(a[None], b[None]).ntk[0, 0] for b in s2] for a in s1])
    np.testing.assert_allclose(e.ntk, want, rtol=1e-12, atol=1e-14)
    # the same through symntk.empirical_ntk(mask1=, mask2=) (a row padded in front included)
    e2 = symntk.empirical_ntk(net, X1, X2, mask1=m1, mask2=m2)
    np.testing.assert_allclose(e2.ntk, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e2.outputs1, f1, rtol=1e-12, atol=1e-14)


def test_bad_masks_are_refused(data):
    (X1, m1, _), (X2, m2, _) = data
    p = nt_attention_network("softmax", **NT)
    with pytest.raises(ValueError, match=r"mask1 must have shape \(N, T\) = \(4, 6\)"):
        symntk.kernel(p, X1, mask1=m1[:, :5])
    with pytest.raises(ValueError, match=r"mask2 must have shape \(N, T\) = \(3, 6\)"):
        symntk.kernel(p, X1, X2, mask1=m1, mask2=m1)
    with pytest.raises(ValueError, match="0/1"):
        symntk.kernel(p, X1, mask1=2 * m1.astype(int))
    empty = m1.copy()
    empty[2] = False
    with pytest.raises(ValueError, match="row 2 has no tokens"):
        symntk.kernel(p, X1, mask1=empty)
    with pytest.raises(ValueError, match="mask2 given without X2"):
        symntk.kernel(p, X1, mask1=m1, mask2=m2)
    net = sample(p, 8, 0, None, D)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, T\)"):
        net({"x": X1, "mask": m1.T})
    # a window over neighbouring tokens would read the padding (the driver's check, without
    # compiling a program for it)
    with pytest.raises(ValueError, match="filter 1"):
        prepare_tokens(X1[:, :, None, :], m1, "mask1", pointwise=False)
