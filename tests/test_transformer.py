"""Attention, LayerNorm over tokens and the Transformer NTK (symntk.attention).

References are written here, independently of the engine, in NumPy:

* NTK4A's Transformer (TP2 App. E.5): the vectorised backward formulas on 4-tensors
  (M, T, M, T), with D^{x^{l-1}} = sigma_u^2 D^{k^l} (NTK4A's notebook has sigma_u^4 there);
* Neural Tangents' GlobalSelfAttention with linear_scaling=True (Hron et al. 2020): the
  attention G = mech(W_Q W_K K_self) of each sequence, K -> W_OV^2 G K G'^T + b^2 and
  Theta -> W_OV^2 (G Theta G'^T + 2 G K G'^T) + b^2.
"""
import numpy as np
import pytest
import sympy as sp

import symntk
from symntk.attention import Attention, LayerNorm, nt_attention_network, transformer
from symntk.program import Conv, Input, Pool, Program, Readout, Weight


# ----------------------------------------------------------------------------- references
def _vrelu(C):
    """E relu(u) relu(v) and E step(u) step(v) for the 4-tensor C (M, T, M, T)."""
    M, T = C.shape[:2]
    d = np.einsum("aiai->ai", C)
    nrm = np.sqrt(np.einsum("ai,bj->aibj", d, d))
    c = np.clip(C / nrm, -1.0, 1.0)
    th = np.arccos(c)
    return nrm * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def _dot(A, B):
    return np.einsum("aibj,bjck->aick", A, B)


def ntk4a_reference(X, depth, vu=1.0, vw=1.0, vv=1.0, vu_power=1, attention=True):
    """TP2 App. E.5's vectorised Transformer kernels (NNGP, NTK), M x M.  ``vu_power=2``
    reproduces NTK4A's notebook (D^x = vu^2 D^k with vu the variance); ``attention=False``
    drops the attention (y = k)."""
    M, T, d = X.shape
    I = np.einsum("ab,ij->aibj", np.eye(M), np.eye(T))
    same = np.einsum("ab,ij->aibj", np.eye(M), np.ones((T, T)))

    def diag_isqrt(C):
        return 1.0 / np.sqrt(np.einsum("aiai->ai", C))

    def scale(D, s):                      # Diag(s) D Diag(s)
        return np.einsum("ai,aibj,bj->aibj", s, D, s)

    Cx = [np.einsum("ais,bjs->aibj", X, X) / d]
    fw = []
    for _ in range(depth):
        Ck = vu * Cx[-1]
        L = np.where(same > 0, Ck, -1e300)
        A = np.exp(L - L.max(axis=3, keepdims=True))
        A = A / A.sum(axis=3, keepdims=True)
        A = np.where(same > 0, A, 0.0) if attention else 0.0 * I
        AI = A + I
        AIt = np.einsum("aibj->bjai", AI)
        Cy = _dot(_dot(AI, Ck), AIt)
        dz = diag_isqrt(Cy)
        Cz = scale(Cy, dz)
        Cg = vw * Cz
        Vg, dVg = _vrelu(Cg)
        Ch = vw * Vg
        dx = diag_isqrt(Ch + Cz)
        Cx.append(scale(Ch + Cz, dx))
        fw.append(dict(AI=AI, AIt=AIt, dz=dz, Cz=Cz, Vg=Vg, dVg=dVg, dx=dx))
    ntk = np.einsum("aibj->ab", Cx[-1]) / T ** 2
    nngp = vv * ntk
    Dx = np.full(Cx[-1].shape, vv / T ** 2)
    for l in reversed(range(depth)):
        f = fw[l]
        Dh = scale(Dx, f["dx"])
        Dg = vw * Dh * f["dVg"]
        Dz = vw * Dg + Dh
        Dy = scale(Dz, f["dz"])
        Dk = _dot(_dot(f["AIt"], Dy), f["AI"])
        ntk = ntk + np.einsum("aibj->ab", Dk * Cx[l] + Dg * f["Cz"] + Dh * f["Vg"])
        Dx = vu ** vu_power * Dk
    return nngp, ntk


def hron_reference(X, mechanism, W_std, b_std, qk, ov, attn_b=0.0):
    """Dense -> GlobalSelfAttention(linear_scaling) -> ReLU -> GAP -> Dense(1), NTK param."""
    M, T, d = X.shape
    K = W_std ** 2 * np.einsum("ais,bjs->aibj", X, X) / d + b_std ** 2
    Th = K.copy()                                     # Dense from the input: Theta = K
    G = []
    for a in range(M):
        L = qk * K[a, :, a, :]
        if mechanism == "softmax":
            E = np.exp(L - L.max(axis=1, keepdims=True))
            G.append(E / E.sum(axis=1, keepdims=True))
        else:
            G.append(L)
    G = np.array(G)
    GKG = np.einsum("ait,atbs,bjs->aibj", G, K, G)
    GTG = np.einsum("ait,atbs,bjs->aibj", G, Th, G)
    Ka = ov ** 2 * GKG + attn_b ** 2
    Ta = ov ** 2 * (GTG + 2 * GKG) + attn_b ** 2
    V, dV = _vrelu(Ka)
    Tr = dV * Ta
    pool = lambda C: np.einsum("aibj->ab", C) / T ** 2     # noqa: E731
    nngp = W_std ** 2 * pool(V) + b_std ** 2
    ntk = nngp + W_std ** 2 * pool(Tr)
    return nngp, ntk


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def seqs():
    return np.random.default_rng(3).standard_normal((4, 5, 3))


_SU, _SW, _SV = sp.symbols("su2 sw2 sv2")


# ----------------------------------------------------------------------------- NTK4A
# Compiling is the cost of these tests: one kernel per depth, every variance a parameter, and
# each compiled kernel serves every check that needs its depth (one test per depth, so xdist
# never compiles it twice).
def _check_formulas(k, X, depth):
    """The compiled kernel equals TP2 App. E.5's formulas (sigma_u^2 correct) to 1e-10, at
    sigma_u^2 = 1 and 2."""
    for vu, vw, vv in ((1.0, 1.0, 1.0), (2.0, 1.5, 0.7)):
        r = k(X, params={"su2": vu, "sw2": vw, "sv2": vv})
        nngp, ntk = ntk4a_reference(X, depth, vu, vw, vv)
        np.testing.assert_allclose(r.nngp, nngp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r.ntk, ntk, rtol=1e-10, atol=1e-12)


def test_ntk4a_depth_1_and_attention_over_one_token(seqs):
    """Depth 1 against the formulas; and at T = 1 softmax attention over one token is the
    identity, so y = Attn(k) + k = 2k and LN(2k) = LN(k): the Transformer is the same network
    without attention (A = 0 in the reference) -- but not at T = 2."""
    k = symntk.derive(transformer(1, sigma_u2=_SU, sigma_w2=_SW, sigma_v2=_SV)).compile()
    _check_formulas(k, seqs, 1)
    X = np.random.default_rng(1).standard_normal((3, 1, 3))
    params = {"su2": 2.0, "sw2": 1.5, "sv2": 0.7}
    r = k(X, params=params)
    nngp, ntk = ntk4a_reference(X, 1, 2.0, 1.5, 0.7, attention=False)
    np.testing.assert_allclose(r.nngp, nngp, rtol=1e-10)
    np.testing.assert_allclose(r.ntk, ntk, rtol=1e-10)
    X2 = np.random.default_rng(2).standard_normal((3, 2, 3))        # two tokens: it matters
    _, ntk2 = ntk4a_reference(X2, 1, 2.0, 1.5, 0.7, attention=False)
    assert not np.allclose(k(X2, params=params).ntk, ntk2, rtol=1e-3)


def test_ntk4a_depth_2_cross_gram_diagonal_and_exact_mode(seqs):
    """Depth 2 against the formulas; X2 given, diagonal only; exact mode equals GIA (the Simple
    GIA Check holds: the readout is independent and no weight is used transposed)."""
    p = transformer(2, sigma_u2=_SU, sigma_w2=_SW, sigma_v2=_SV)
    k = symntk.derive(p).compile()
    _check_formulas(k, seqs, 2)
    params = {"su2": 2.0, "sw2": 1.0, "sv2": 1.0}
    full = k(seqs, params=params)
    cross = k(seqs[:2], seqs[2:], params=params)
    np.testing.assert_allclose(cross.ntk, full.ntk[:2, 2:], rtol=1e-12)
    np.testing.assert_allclose(k(seqs, diagonal=True, params=params).ntk, np.diag(full.ntk),
                               rtol=1e-12)
    assert symntk.gia_check(p).holds
    exact = symntk.derive(p, mode="exact")
    assert exact.steps == symntk.derive(p, mode="gia").steps
    np.testing.assert_array_equal(exact.compile()(seqs, params=params).ntk, full.ntk)


def test_ntk4a_vu_squared_differs_at_sigma_u2_2(seqs):
    """NTK4A's sigma_u^4 in D^x changes the depth-2 NTK at sigma_u^2 = 2 (not at 1)."""
    _, good = ntk4a_reference(seqs, 2, 2.0)
    _, bug = ntk4a_reference(seqs, 2, 2.0, vu_power=2)
    assert np.max(np.abs(bug / good - 1)) > 0.05
    _, good1 = ntk4a_reference(seqs, 2, 1.0)
    _, bug1 = ntk4a_reference(seqs, 2, 1.0, vu_power=2)
    np.testing.assert_allclose(bug1, good1, rtol=1e-14)


# ----------------------------------------------------------------------------- finite width
@pytest.mark.parametrize("depth,vu", [(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0)])
def test_finite_width_transformer_within_three_standard_errors(depth, vu):
    """The empirical NTK and E f f' of the real network (softmax logits k.k/n, LayerNorm with
    centring, NTK4A's parametrization) at width 4096, over 4 seeds, lie within 3 standard errors
    of the formulas; at depth 2 and sigma_u^2 = 2 NTK4A's sigma_u^4 kernel does not."""
    X = np.random.default_rng(3).standard_normal((2, 3, 3))
    mc = symntk.monte_carlo(transformer(depth, sigma_u2=vu), X, width=4096, n_samples=4,
                            seed=0)
    nngp, ntk = ntk4a_reference(X, depth, vu)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 3 * mc.ntk_sem), (mc.ntk_mean, ntk, mc.ntk_sem)
    if depth == 2 and vu == 2.0:
        _, bug = ntk4a_reference(X, depth, vu, vu_power=2)
        assert np.any(np.abs(mc.ntk_mean - bug) > 3 * mc.ntk_sem)


# ----------------------------------------------------------------------------- LayerNorm
def _ln_program(sw=1.0):
    x = Input("x", 3, positions="t")
    h = Conv(Weight("W", fan_in=3, variance=sw), x, (1,))
    v = Weight("v", fan_out=1, variance=1.3)
    return Program(Readout(v, Pool(LayerNorm(h), "mean")))


def test_layernorm_after_dense_is_the_correlation(seqs):
    """LN(W x): C = K/sqrt(q q'), Theta likewise (NTK param: Theta of W x is sigma^2 x.x'/d)."""
    sw, sv = 2.0, 1.3
    r = symntk.derive(_ln_program(sw)).compile()(seqs)
    K = sw * np.einsum("ais,bjs->aibj", seqs, seqs) / 3
    q = np.einsum("aiai->ai", K)
    C = K / np.sqrt(np.einsum("ai,bj->aibj", q, q))
    T = seqs.shape[1]
    pool = np.einsum("aibj->ab", C) / T ** 2
    np.testing.assert_allclose(r.nngp, sv * pool, rtol=1e-12)
    np.testing.assert_allclose(r.ntk, sv * pool + sv * pool, rtol=1e-12)


def test_layernorm_of_relu_is_refused():
    x = Input("x", 3, positions="t")
    a = symntk.nonlin("relu", Conv(Weight("W", fan_in=3), x, (1,)))
    p = Program(Readout(Weight("v", fan_out=1), Pool(LayerNorm(a), "mean")))
    with pytest.raises(NotImplementedError, match="mean over the width"):
        symntk.derive(p)


# ----------------------------------------------------------------------------- Neural Tangents
@pytest.mark.parametrize("mechanism", ["softmax", "identity"])
def test_nt_global_self_attention_matches_hron(seqs, mechanism):
    W_std, b_std, wq, wk, wv, wo, ab = 1.3, 0.2, 0.8, 1.1, 1.2, 0.9, 0.3
    p = nt_attention_network(mechanism, W_std=W_std, b_std=b_std, W_key_std=wk,
                             W_query_std=wq, W_value_std=wv, W_out_std=wo, attention_b_std=ab)
    r = symntk.derive(p).compile()(seqs)
    nngp, ntk = hron_reference(seqs, mechanism, W_std, b_std, wq * wk, wv * wo, ab)
    np.testing.assert_allclose(r.nngp, nngp, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r.ntk, ntk, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mechanism,heads", [("softmax", 4), ("identity", 1)])
def test_nt_attention_finite_width_within_three_standard_errors(mechanism, heads):
    """The finite network built like NT's (keys W_K h, queries the keys scaled by W_Q / W_K,
    logits q.k / (n / heads) per head, values, W_O, biases) agrees with Hron et al.'s kernels
    at width 1024 (the kernel does not depend on the number of heads)."""
    X = np.random.default_rng(3).standard_normal((2, 3, 3))
    p = nt_attention_network(mechanism, W_std=1.3, b_std=0.2, W_key_std=1.1, W_query_std=0.8,
                             W_value_std=1.2, W_out_std=0.9, attention_b_std=0.3,
                             n_heads=heads)
    mc = symntk.monte_carlo(p, X, width=1024, n_samples=6, seed=0)
    nngp, ntk = hron_reference(X, mechanism, 1.3, 0.2, 0.8 * 1.1, 1.2 * 0.9, 0.3)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 3 * mc.ntk_sem)
    assert np.all(np.abs(mc.nngp_mean - nngp) <= 3 * mc.nngp_sem)


def test_finite_gradients_through_attention_and_layernorm():
    """The finite network's gradients (through softmax logits, heads and LayerNorm) equal
    central finite differences."""
    X = np.random.default_rng(3).standard_normal((2, 3, 3))
    nets = [symntk.sample(transformer(2, sigma_u2=2), 32, seed=1, input_dim=3),
            symntk.sample(nt_attention_network(n_heads=4, b_std=0.1), 32, seed=1, input_dim=3)]
    for net, names in zip(nets, (["U1", "U2", "W1_1"], ["W0", "W_K", "W_V"])):
        grads = net.gradients(X)
        for name in names:
            W = net.parameters[name].copy()
            E = np.zeros_like(W)
            E[3, 1] = 1e-6
            fd = (net.with_parameters({name: W + E})(X) -
                  net.with_parameters({name: W - E})(X)) / 2e-6
            np.testing.assert_allclose(grads[name][:, 3, 1], fd, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- printing, errors
def test_latex_shows_attention_and_layernorm():
    tex = symntk.derive(transformer(1)).latex()
    assert r"\tilde A^{(y1)}" in tex and "softmax attention + skip" in tex
    assert "LayerNorm: the correlation" in tex


def test_independent_queries_give_zero_logits():
    """Queries and keys from independent weights: q_t . k_s / n -> 0, uniform softmax."""
    x = Input("x", 3, positions="t")
    h = Conv(Weight("W", fan_in=3), x, (1,))
    q, k = Conv(Weight("WQ"), h, (1,)), Conv(Weight("WK"), h, (1,))
    p = Program(Readout(Weight("v", fan_out=1), Pool(Attention(h, k, q), "mean")))
    step = [s for s in symntk.derive(p).steps if s.kind == "attention"][0]
    assert step.coeffs[1] == 0
    q2 = symntk.nonlin("relu", h)
    with pytest.raises(NotImplementedError, match="queries must be the keys"):
        symntk.derive(Program(Readout(Weight("v", fan_out=1), Pool(Attention(h, k, q2), "mean"))))
