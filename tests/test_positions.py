"""Derivations over positions (sequences): the recursion in (t, r), checked three ways.

1. Structure: the derivation is folded (its equations do not depend on the sequence length),
   and a weight shared over t is summed over every position pair (TP2 Eq. 12).
2. Closed forms: the NTK4A simple RNN (TP2 §6.2.1 Eq. 14, App. E.2) against the recursion
   written directly in NumPy here, from the paper, for sequences of different lengths.
3. Identities: a weight-tied RNN fed only at t = 1 has the NNGP of the untied MLP of the same
   depth (Yang 2019, TP0 App. D.6); symmetry and PSD of Gram matrices.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

import symntk
from reference_rnn import rnn_nngp_ntk
from symntk import (Bias, Input, Program, ProgramError, Readout, Weight, mlp, nonlin)
from symntk.program import Pool, scan

A = sp.Symbol("a", real=True)
ERF = sp.Lambda(A, sp.erf(A))


def simple_rnn(readout="mean", vw=1, vu=2, vb=sp.Rational(1, 5), vv=1, parametrization="tp",
               phi=ERF, d=3):
    """s^t = phi(W s^{t-1} + U xi^t + b), f = v . pool(s) / sqrt(n) (NTK4A's RNN)."""
    xi = Input("xi", d, positions="t")
    W = Weight("W", variance=vw, parametrization=parametrization)
    U = Weight("U", fan_in=d, variance=vu, parametrization=parametrization)
    b = Bias("b", variance=vb, parametrization=parametrization)
    s = scan(lambda prev: nonlin(phi, (W @ prev + U @ xi + b).named("h"), name="s"), "t", name="s")
    v = Weight("v", fan_out=1, variance=vv, parametrization=parametrization)
    return Program(Readout(v, Pool(s, readout)), name=f"rnn_{readout}")


# ----------------------------------------------------------------------------- the reference
def ntk4a_rnn(X1, X2, readout, activation="erf", vw=1.0, vu=2.0, vb=0.2, vv=1.0):
    """NNGP and NTK of the NTK4A simple RNN (TP convention), from TP2 App. E.2 written in NumPy
    without symntk (tests/reference_rnn.py)."""
    return rnn_nngp_ntk(X1, X2, activation=activation, var_w=vw, var_u=vu, var_b=vb, var_v=vv,
                        readout=readout)


@pytest.fixture(scope="module")
def rnn_derivations():
    return {how: symntk.derive(simple_rnn(how)) for how in ("mean", "last")}


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("how", ["mean", "last"])
def test_rnn_recursion_is_folded_in_t_and_r(rnn_derivations, how):
    d = rnn_derivations[how]
    families = [e for e in d.equations if isinstance(e.lhs, sp.Indexed)]
    two_index = [e for e in families if len(e.lhs.indices) == 2]
    assert two_index, "the cross kernels are a recursion in (t, r)"
    t, r = sp.symbols("t r", integer=True, positive=True)
    # forward: C^{s}[t-1, r-1] feeds Sigma[t, r]; backward: D^{h}[t+1, r+1] feeds D^{s}[t, r]
    reads = {ind.indices for e in families for ind in e.rhs.atoms(sp.Indexed)}
    assert (t - 1, r - 1) in reads and (t + 1, r + 1) in reads
    # one equation per family, whatever the lengths: no equation per position pair
    assert len(d.equations) == len({e.lhs.base if isinstance(e.lhs, sp.Indexed) else e.lhs
                                    for e in d.equations})
    assert set(d.ntk_terms) == {"W", "U", "b", "v"}
    assert d.parameters() == set()


def test_shared_weight_is_summed_over_position_pairs(rnn_derivations):
    term = rnn_derivations["mean"].ntk_terms["W"]
    assert isinstance(term, sp.Sum)
    assert {lim[0].name for lim in term.limits} == {"t", "r"}


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("how", ["mean", "last"])
def test_ntk4a_rnn_equals_the_paper_recursion(rnn_derivations, how):
    rng = np.random.default_rng(1)
    X1, X2 = rng.standard_normal((3, 4, 3)), rng.standard_normal((2, 6, 3))
    K = rnn_derivations[how].gram(X1, X2)
    nngp, ntk = ntk4a_rnn(X1, X2, how)
    np.testing.assert_allclose(K.nngp, nngp, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(K.ntk, ntk, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("how", ["mean", "last"])
def test_diagonal_system_equals_the_pair_recursion(rnn_derivations, how):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((3, 5, 3))
    K = rnn_derivations[how].gram(X)            # diagonal from the same-input system
    nngp, ntk = ntk4a_rnn(X, X, how)
    np.testing.assert_allclose(K.ntk, ntk, rtol=1e-10)
    np.testing.assert_allclose(K.nngp, nngp, rtol=1e-10)


def test_ntk_parametrization_scales_each_term_by_its_variance():
    """Jacot/NT convention = TP convention with each weight term times sigma^2 (TP2 §4)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2, 3, 3))
    tp = symntk.derive(simple_rnn("last", parametrization="tp")).gram(X, X)
    ntk = symntk.derive(simple_rnn("last", parametrization="ntk")).gram(X, X)
    for name, var in [("W", 1), ("U", 2), ("b", 0.2), ("v", 1)]:
        np.testing.assert_allclose(ntk.ntk_terms[name], var * tp.ntk_terms[name], rtol=1e-12)
    np.testing.assert_allclose(ntk.nngp, tp.nngp, rtol=1e-13)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("T", [1, 2, 4])
def test_tied_rnn_fed_once_has_the_untied_mlp_nngp(T):
    """Input only at t = 1: s^t is layer t of an MLP whose hidden weights are all W; its forward
    kernels equal the untied MLP's (TP0 App. D.6)."""
    d = 3
    relu = sp.Lambda(A, sp.Max(0, A))
    prog = simple_rnn("last", vw=2, vu=2, vb=sp.Rational(1, 10), vv=2, phi=relu,
                      parametrization="ntk", d=d)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, d))
    X = np.zeros((3, T, d))
    X[:, 0] = x
    K = symntk.derive(prog).gram(X)
    ref = mlp(T, "relu", weight_std=np.sqrt(2), bias_std=np.sqrt(0.1), input_dim=d,
              readout_bias=False)
    Kmlp = symntk.derive(ref).gram(x)
    np.testing.assert_allclose(K.nngp, Kmlp.nngp, rtol=1e-10)


@settings(deadline=None, max_examples=8)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(["mean", "last"]),
       st.integers(0, 10 ** 6))
def test_rnn_gram_is_symmetric_psd(T, n, how, seed):
    d = symntk.derive(simple_rnn(how))
    X = np.random.default_rng(seed).standard_normal((n + 1, T, 3))
    K = d.gram(X)
    for M in (K.ntk, K.nngp):
        np.testing.assert_allclose(M, M.T, rtol=1e-12, atol=1e-15)
        assert np.linalg.eigvalsh(M).min() > -1e-10 * np.abs(M).max()


def test_exact_mode_on_a_bp_like_rnn_is_gia(rnn_derivations):
    ex = symntk.derive(simple_rnn("mean"), mode="exact")
    assert ex.mode == "exact"
    X = np.random.default_rng(5).standard_normal((2, 3, 3))
    np.testing.assert_allclose(ex.gram(X).ntk, rnn_derivations["mean"].gram(X).ntk, rtol=1e-13)
    assert symntk.gia_check(simple_rnn("mean")).holds


# ----------------------------------------------------------------------------- bad input
def test_bad_sequence_inputs_are_named(rnn_derivations):
    d = rnn_derivations["last"]
    with pytest.raises(ValueError, match=r"shape \(N, T, d\)"):
        d.gram(np.ones((2, 3)))
    X = np.ones((2, 3, 3))
    X[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN.*sequence 1, token 2"):
        d.gram(X)
    with pytest.raises(ValueError, match="T = 0"):
        d.gram(np.ones((2, 0, 3)))
    with pytest.raises(ValueError, match="dimension 4"):
        d.gram(np.ones((2, 3, 4)))


def test_positioned_programs_are_validated():
    xi = Input("xi", 3, positions="t")
    x = Input("x", 3)
    W = Weight("W")
    U = Weight("U", fan_in=3)
    with pytest.raises(ProgramError, match="pool it first"):
        Readout(Weight("v", fan_out=1), nonlin("relu", U @ xi))
    with pytest.raises(ProgramError, match="no positions to pool"):
        Pool(U @ x)
    with pytest.raises(ProgramError, match="different positions"):
        (U @ xi) + (U @ Input("y", 3, positions="u"))
    with pytest.raises(ProgramError, match="must be indexed by the positions"):
        scan(lambda prev: U @ x, "t")
    with pytest.raises(ProgramError, match="no Input has them"):
        Program(Readout(Weight("v", fan_out=1), Pool(scan(lambda prev: W @ prev + U @ x, "t"))))
    with pytest.raises(ProgramError, match="position-free"):
        scan(lambda prev: W @ prev + U @ xi, "t", init=U @ xi)


# ----------------------------------------------------------------------------- compiled kernels
@pytest.fixture(scope="module")
def compiled_rnns(rnn_derivations):
    return {how: d.compile() for how, d in rnn_derivations.items()}


@pytest.mark.parametrize("how", ["mean", "last"])
def test_compiled_rnn_equals_the_reference(rnn_derivations, compiled_rnns, how):
    rng = np.random.default_rng(6)
    X1, X2 = rng.standard_normal((4, 3, 3)), rng.standard_normal((3, 5, 3))
    k, d = compiled_rnns[how], rnn_derivations[how]
    for A, B in ((X1, X2), (X1, None)):
        K, R = k(A, B), d.gram(A, B)
        np.testing.assert_allclose(K.ntk, R.ntk, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(K.nngp, R.nngp, rtol=1e-12, atol=1e-15)
        for name in R.ntk_terms:
            np.testing.assert_allclose(K.ntk_terms[name], R.ntk_terms[name], rtol=1e-12,
                                       atol=1e-15)


def test_compiled_relu_rnn_and_kernel_entry_point():
    relu = sp.Lambda(A, sp.Max(0, A))
    prog = simple_rnn("mean", vw=2, vu=1, vb=0, phi=relu, parametrization="ntk")
    rng = np.random.default_rng(7)
    X1, X2 = rng.standard_normal((3, 4, 3)), rng.standard_normal((2, 2, 3))
    K = symntk.kernel(prog, X1, X2)
    R = symntk.derive(prog).gram(X1, X2)
    np.testing.assert_allclose(K.ntk, R.ntk, rtol=1e-12)
    np.testing.assert_allclose(K.nngp, R.nngp, rtol=1e-12)


def test_compiled_kernel_refuses_bad_sequences(compiled_rnns):
    with pytest.raises(ValueError, match=r"shape \(N, T, d\)"):
        compiled_rnns["mean"](np.ones((2, 3)))
    with pytest.raises(ValueError, match="T = 0"):
        compiled_rnns["mean"](np.ones((2, 0, 3)))


# ----------------------------------------------------------------------------- printing
def test_rnn_latex_reads_like_tp2_eq14(rnn_derivations):
    tex = rnn_derivations["mean"].latex()
    assert r"C^{s}(\xi^{t - 1},\xi'^{r - 1})" in tex        # the recursion in (t, r)
    assert r"D^{h}(\xi^{t + 1},\xi'^{r + 1})" in tex        # backward from the end
    assert r"\Sigma^{0}(\xi^{t},\xi'^{r}) &= \frac{\xi^{t\top}\xi'^{r}}{d}" in tex
    assert r"V_{\mathrm{erf}}" in tex
    expanded = rnn_derivations["last"].latex(expand=True)
    assert r"\frac{{\xi^{t}}^{\top}\xi'^{r}}{d}" in expanded
    assert r"C^{s}(\xi^{T},\xi'^{\bar{T}})" in expanded


# ----------------------------------------------------------------------------- finite width
# The derived kernel against the same program sampled at width 4096 (the referee's exact
# empirical NTK), Neural Tangents' parametrization, sequences of unequal lengths.
@pytest.mark.slow
@pytest.mark.parametrize("program", [
    lambda: symntk.rnn("erf", weight_std=1.2, input_std=1.0, bias_std=0.3, readout="mean",
                       input_dim=3),
    lambda: symntk.rnn("relu", weight_std=1.2, input_std=1.0, bias_std=0.3, readout="last",
                       input_dim=3),
    lambda: symntk.stacked_rnn(2, "relu", weight_std=1.0, input_std=1.2, readout="mean",
                               input_dim=3),
], ids=["erf-mean", "relu-last", "stacked-relu-mean"])
def test_derived_rnn_kernel_is_the_wide_network_mean(program):
    prog = program()
    rng = np.random.default_rng(8)
    X1, X2 = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 3, 3))
    K = symntk.kernel(prog, X1, X2)
    mc = symntk.monte_carlo(prog, X1, X2, width=4096, n_samples=4, seed=11)
    # (the NNGP, an average of f f' over networks, needs far more samples than the NTK, which
    # concentrates in every network; it is held against the paper's recursion above)
    assert np.all(np.abs(mc.ntk_mean - K.ntk) <= 3 * mc.ntk_sem + 1e-12), (mc.ntk_mean, K.ntk)


# ----------------------------------------------------------------------------- bags of tokens
# A position-wise network with no recurrence, pooled: x^t = phi(W_L ... phi(W_1 xi^t + b_1) ...),
# f = v . pool(x) / sqrt(n) + b_out.  Its first layer is a base Gaussian whose covariance reads
# the token kernel directly (no LinComb in between, unlike an RNN's W s^{t-1} + U xi^t).
BAG_VARIANCES = {"W": sp.Rational(3, 2), "b": sp.Rational(1, 10), "v": sp.Rational(13, 10),
                 "b_out": sp.Rational(1, 5)}


def bag_of_tokens(phi: str, depth: int, bias: bool, how: str, d: int = 3) -> Program:
    from symntk.program import WIDTH, OutputBias
    x = Input("xi", d, positions="t")
    for layer in range(depth):
        W = Weight(f"W{layer}", fan_in=d if layer == 0 else WIDTH, variance=BAG_VARIANCES["W"])
        h = W @ x
        if bias:
            h = h + Bias(f"b{layer}", variance=BAG_VARIANCES["b"])
        x = nonlin(phi, h)
    v = Weight("v", fan_out=1, variance=BAG_VARIANCES["v"])
    b_out = OutputBias("b_out", BAG_VARIANCES["b_out"]) if bias else None
    return Program(Readout(v, Pool(x, how), b_out), name=f"bag_{phi}_{depth}_{bias}_{how}")


def _dual(phi, S, q1, q2):
    """E[phi(u) phi(v)] and E[phi'(u) phi'(v)] for (u, v) ~ N(0, [[q1, S], [S, q2]]): the arc-cosine
    kernel of degree 1 and 0 for relu (Cho & Saul 2009), Williams (1997) for erf."""
    if phi == "relu":
        c = np.clip(S / np.sqrt(q1 * q2), -1.0, 1.0)
        theta = np.arccos(c)
        return (np.sqrt(q1 * q2) * (np.sin(theta) + (np.pi - theta) * c) / (2 * np.pi),
                (np.pi - theta) / (2 * np.pi))
    a, b = 1 + 2 * q1, 1 + 2 * q2
    return 2 / np.pi * np.arcsin(2 * S / np.sqrt(a * b)), 4 / np.pi / np.sqrt(a * b - 4 * S ** 2)


def bag_reference(X1, X2, phi, depth, bias, how):
    """NNGP and NTK of ``bag_of_tokens`` (NTK parametrization), written from the MLP recursion
    (Jacot et al. 2018 Thm 1; Lee et al. 2019 Eq. 13) over the tokens of both sequences: the
    readout of a linear pooling a^T x is sigma_v^2 a^T Phi a' (+ sigma_{b_out}^2) for the NNGP
    and adds sigma_v^2 a^T (Phi' * Theta) a' for the NTK."""
    sw, sb, sv, so = (float(BAG_VARIANCES[k]) if bias or k in "Wv" else 0.0
                      for k in ("W", "b", "v", "b_out"))
    nngp = np.zeros((len(X1), len(X2)))
    ntk = np.zeros_like(nngp)
    for i, x in enumerate(X1):
        for j, y in enumerate(X2):
            T, Tb = len(x), len(y)
            Z = np.concatenate([x, y])
            Sigma = sw * Z @ Z.T / Z.shape[1] + sb
            Theta = Sigma.copy()
            for layer in range(depth):
                q = np.diag(Sigma)
                Phi, dPhi = _dual(phi, Sigma, q[:, None], q[None, :])
                if layer < depth - 1:
                    Sigma = sw * Phi + sb
                    Theta = Sigma + sw * dPhi * Theta
            a = np.full(T, 1 / T) if how == "mean" else np.eye(T)[-1]
            b = np.full(Tb, 1 / Tb) if how == "mean" else np.eye(Tb)[-1]
            nngp[i, j] = sv * a @ Phi[:T, T:] @ b + so
            ntk[i, j] = nngp[i, j] + sv * a @ (dPhi * Theta)[:T, T:] @ b
    return nngp, ntk


# every level of each factor, and every pair of levels of two factors, in six programs
BAGS = [("relu", 1, False, "mean"), ("relu", 1, True, "last"), ("relu", 2, True, "mean"),
        ("relu", 2, False, "last"), ("erf", 1, False, "last"), ("erf", 2, True, "mean")]


# compiled too (a cold Numba compile is ~15 s here): the programs without biases, whose first
# layer's variance the pairs stage reads straight from the token kernel
COMPILED_BAGS = [("relu", 1, False, "mean"), ("relu", 2, False, "last"), ("erf", 1, False, "last")]


@pytest.fixture(scope="module")
def bags():
    out = {}
    for case in BAGS:
        d = symntk.derive(bag_of_tokens(*case))
        out[case] = (d, d.compile() if case in COMPILED_BAGS else None)
    return out


@pytest.mark.parametrize("case", BAGS, ids=["-".join(map(str, c)) for c in BAGS])
def test_bag_of_tokens_equals_the_mlp_recursion(bags, case):
    d, k = bags[case]
    rng = np.random.default_rng(9)
    X1, X2 = rng.standard_normal((3, 2, 3)), rng.standard_normal((2, 3, 3))
    nngp, ntk = bag_reference(X1, X2, *case)
    compiled = [] if k is None else [k]
    for K in [d.gram(X1, X2)] + [c(X1, X2) for c in compiled]:
        np.testing.assert_allclose(K.nngp, nngp, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(K.ntk, ntk, rtol=1e-12, atol=1e-15)
    # X2 = X1: the diagonal comes from the same-input system, whose (t, r) families meet each
    # token with itself at t = r.  There the relu closed form sees a correlation of 1 up to
    # rounding, and sqrt(1 - c^2) vs acos(c) turn one ulp into sqrt(eps) ~ 1e-8 of that pair;
    # a second relu layer takes the square root again (eps^(1/4)).
    nngp, ntk = bag_reference(X1, X1, *case)
    off = ~np.eye(len(X1), dtype=bool)
    on_diagonal = 1e-12 if case[0] == "erf" else (1e-8 if case[1] == 1 else 1e-4)
    for K in [d.gram(X1)] + [c(X1) for c in compiled]:
        for got, want in ((K.nngp, nngp), (K.ntk, ntk)):
            np.testing.assert_allclose(got[off], want[off], rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(np.diag(got), np.diag(want), rtol=on_diagonal)


def test_bag_of_tokens_ntk_is_the_wide_network_mean(bags):
    """The derived NTK of the bias-free relu bag (the failing case of a pooled position-wise
    network) against the exact empirical NTK of the same program sampled at width 512: mean over
    seeds within a few standard errors."""
    from symntk.finite import empirical_ntk
    case = ("relu", 1, False, "mean")
    prog, (d, _) = bag_of_tokens(*case), bags[case]
    rng = np.random.default_rng(10)
    X1, X2 = rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 4, 3))
    K = d.gram(X1, X2).ntk
    draws = np.array([empirical_ntk(prog, X1, X2, width=512, seed=s).ntk for s in range(12)])
    mean, sem = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - K) <= 4 * sem), (mean, K, sem)
    # and the draws do fluctuate at this width (the check is not vacuous)
    assert np.all(sem > 1e-4 * np.abs(K))
