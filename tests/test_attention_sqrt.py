"""Attention with Gaussian logits q.k / sqrt(n) (Neural Tangents' ``linear_scaling=False``).

The reference is Hron et al. (2020, "Infinite attention") for the identity mechanism, written
here in NumPy, per pair of sequences (a, b), for Neural Tangents' network
Dense -> GlobalSelfAttention(identity, linear_scaling=False) -> ReLU -> GAP -> Dense(1) in NTK
parametrization: with K, Theta the Dense layer's kernels (La x Lb),
s = (W_Q W_K W_V W_O)^2,

    K_attn     = s * <K, K> * K + b^2,
    Theta_attn = s * (2 <K, Theta> K + <K, K> (Theta + 4 K)) + b^2,

<A, B> the sum over all token pairs of A * B; the 4 K counts the gradients of the query, key,
value and output weights (the query and key weights contribute, unlike with linear scaling).
"""
import numpy as np
import pytest

import symntk
from symntk.attention import Attention, nt_attention_network
from symntk.program import Conv, Input, Pool, Program, ProgramError, Readout, Weight

D = 3
NT = dict(W_std=1.3, b_std=0.2, W_key_std=1.1, W_query_std=0.8, W_value_std=1.2,
          W_out_std=0.9, attention_b_std=0.3)


def _relu(C, qa, qb):
    nrm = np.sqrt(np.outer(qa, qb))
    c = np.clip(C / nrm, -1.0, 1.0)
    th = np.arccos(c)
    return nrm * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def hron_identity_sqrt(xa, xb, W_std, b_std, W_key_std, W_query_std, W_value_std, W_out_std,
                       attention_b_std, qk_terms=True):
    """(NNGP, NTK) of two unpadded sequences; ``qk_terms=False`` drops the query and key
    weights' NTK terms (4 K -> 2 K), a wrong kernel the finite network must tell apart."""
    seq = {"a": xa, "b": xb}
    K = {p: W_std ** 2 * seq[p[0]] @ seq[p[1]].T / D + b_std ** 2 for p in ("aa", "bb", "ab")}
    Th = K["ab"]                                     # the first Dense: Theta = K
    s = (W_query_std * W_key_std * W_value_std * W_out_std) ** 2
    b2 = attention_b_std ** 2
    KK = {p: (k * k).sum() for p, k in K.items()}
    Ka = {p: s * KK[p] * K[p] + b2 for p in K}
    Ta = s * (2 * (K["ab"] * Th).sum() * K["ab"] +
              KK["ab"] * (Th + (4 if qk_terms else 2) * K["ab"])) + b2
    V, dV = _relu(Ka["ab"], np.diag(Ka["aa"]), np.diag(Ka["bb"]))
    nngp = W_std ** 2 * V.mean() + b_std ** 2
    return nngp, nngp + W_std ** 2 * (dV * Ta).mean()


def _ref(X1, X2, **kw):
    R = np.array([[hron_identity_sqrt(a, b, **kw) for b in X2] for a in X1])
    return R[..., 0], R[..., 1]


def test_identity_gaussian_logits_match_hron():
    """The compiled kernel equals Hron et al.'s formulas to 1e-10, for one batch, and for a
    second batch of other lengths padded with a mask (the sums over token pairs see the real
    tokens only)."""
    rng = np.random.default_rng(3)
    X1 = rng.standard_normal((3, 4, D))
    p = nt_attention_network("identity", linear_scaling=False, **NT)
    d = symntk.derive(p)
    assert "Gaussian logits" in d.latex()
    r = d.compile()(X1)
    nngp, ntk = _ref(X1, X1, **NT)
    np.testing.assert_allclose(r.nngp, nngp, rtol=1e-10, atol=0)
    np.testing.assert_allclose(r.ntk, ntk, rtol=1e-10, atol=0)
    lengths = [2, 4, 3]
    X2 = rng.standard_normal((3, 4, D))
    m2 = np.arange(4)[None] < np.array(lengths)[:, None]
    r = symntk.kernel(p, X1, X2, mask2=m2)
    nngp, ntk = _ref(X1, [x[:L] for x, L in zip(X2, lengths)], **NT)
    np.testing.assert_allclose(r.nngp, nngp, rtol=1e-10, atol=0)
    np.testing.assert_allclose(r.ntk, ntk, rtol=1e-10, atol=0)


def test_identity_gaussian_logits_finite_width_within_three_standard_errors():
    """The finite network (logits q.k / sqrt(n / heads) per head, independent query and key
    weights) at width 512 with 32 heads, 8 seeds: NNGP and NTK within 3 standard errors of the
    formulas, and the NTK without the query/key terms is not."""
    X = np.random.default_rng(3).standard_normal((2, 3, D))
    p = nt_attention_network("identity", linear_scaling=False, n_heads=32, **NT)
    mc = symntk.monte_carlo(p, X, width=512, n_samples=8, seed=0)
    nngp, ntk = _ref(X, X, **NT)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 3 * mc.ntk_sem), (mc.ntk_mean, ntk, mc.ntk_sem)
    assert np.all(np.abs(mc.nngp_mean - nngp) <= 3 * mc.nngp_sem)
    _, wrong = _ref(X, X, qk_terms=False, **NT)
    assert np.any(np.abs(mc.ntk_mean - wrong) > 3 * mc.ntk_sem)


def test_softmax_and_tied_gaussian_logits_are_refused():
    p = nt_attention_network("softmax", linear_scaling=False, **NT)
    with pytest.raises(NotImplementedError, match="no closed form"):
        symntk.derive(p)
    x = Input("x", D, positions="t")
    h = Conv(Weight("W", fan_in=D), x, (1,))
    k = Conv(Weight("WK"), h, (1,))
    tied = Attention(h, k, k, mechanism="identity", linear_scaling=False)
    with pytest.raises(NotImplementedError, match="weight of its own"):
        symntk.derive(Program(Readout(Weight("v", fan_out=1), Pool(tied, "mean"))))
    with pytest.raises(ProgramError, match="linear_scaling"):
        Attention(h, k, mechanism="identity", linear_scaling="no")
