"""The numeric form of a derivation (symntk.numerics): stable correlations near 1 and the
zero-variance limits, identical in the NumPy evaluator and the compiled kernel.

Oracles: the ReLU NNGP/NTK recursion of Jacot et al. (2018) / Arora et al. (2019, Eqs. 4-5) with
Cho & Saul's arc-cosine kernels, written here in mpmath at 50 digits from the papers (not from
symntk's equations), and the closed-form table's own plain rules.
"""
from __future__ import annotations

import functools

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symntk import derive, mlp
from symntk.gaussian import PAIR_RULES, SafePow, correlation_gap

SW, SB = sp.Symbol("sigma_w", positive=True), sp.Symbol("sigma_b", positive=True)
DEPTH = 10


# ============================================================================ the oracle
def relu_reference(x, y, depth, sw2, sb2, dps=50):
    """(nngp, ntk) of Neural Tangents' ``serial(Dense, Relu) x depth, Dense(1)`` at ``dps`` digits.

    Sigma^1 = sw2 x.y/d + sb2, Theta^1 = Sigma^1;  Sigma^{l+1} = sw2 V_relu(Sigma^l) + sb2,
    Theta^{l+1} = Sigma^{l+1} + sw2 V_step(Sigma^l) Theta^l (Jacot et al. 2018, Thm 1;
    Arora et al. 2019, Eq. 5), V from the arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009):
    V_relu = sqrt(q q')/(2 pi) (sin t + (pi - t) cos t), V_step = (pi - t)/(2 pi), t = acos(rho).
    At a zero variance rho = 0 (step(0) = 1/2).  The inputs are taken as exact binary numbers.
    """
    with mpmath.workdps(dps):
        x = [mpmath.mpf(float(v)) for v in x]
        y = [mpmath.mpf(float(v)) for v in y]
        d = len(x)
        sw2, sb2 = mpmath.mpf(sw2), mpmath.mpf(sb2)
        q1 = sw2 * mpmath.fsum(a * a for a in x) / d + sb2
        q2 = sw2 * mpmath.fsum(b * b for b in y) / d + sb2
        k = sw2 * mpmath.fsum(a * b for a, b in zip(x, y)) / d + sb2
        ntk = k
        for _ in range(depth):
            rho = k / mpmath.sqrt(q1 * q2) if q1 * q2 > 0 else mpmath.mpf(0)
            t = mpmath.acos(min(mpmath.mpf(1), max(mpmath.mpf(-1), rho)))
            v_relu = mpmath.sqrt(q1 * q2) / (2 * mpmath.pi) * (mpmath.sin(t) + (mpmath.pi - t) * mpmath.cos(t))
            v_step = (mpmath.pi - t) / (2 * mpmath.pi)
            k = sw2 * v_relu + sb2
            ntk = k + sw2 * v_step * ntk
            q1, q2 = sw2 * q1 / 2 + sb2, sw2 * q2 / 2 + sb2
        return float(k), float(ntk)


def reference_gram(X1, X2, depth, sw2, sb2):
    out = np.empty((2, len(X1), len(X2)))
    for i, x in enumerate(X1):
        for j, y in enumerate(X2):
            out[:, i, j] = relu_reference(x, y, depth, sw2, sb2)
    return out


def near_duplicates(X, scale, seed):
    """X plus perturbations of relative size ``scale`` in random directions."""
    P = np.random.default_rng(seed).normal(size=X.shape)
    P *= scale * np.linalg.norm(X, axis=1, keepdims=True) / np.linalg.norm(P, axis=1, keepdims=True)
    return X + P


# ======================================================================== session fixtures
@functools.lru_cache(maxsize=None)
def _relu(depth):
    d = derive(mlp(depth, "relu", weight_std=SW, bias_std=SB, input_dim=5))
    return d, d.compile()


@pytest.fixture(scope="session")
def relu10(kernel_cache):
    return _relu(DEPTH)


X = np.random.default_rng(0).normal(size=(4, 5))
PARAMS = [{"sigma_w": 1.0, "sigma_b": 0.0}, {"sigma_w": 2 ** 0.5, "sigma_b": 0.1 ** 0.5}]


# ============================================================== the closed-form table itself
@pytest.mark.parametrize("key", [k for k, e in PAIR_RULES.items() if e.stable or e.distance])
def test_stable_forms_equal_the_plain_rules(key):
    """``stable(S11, S22, 1 - c)`` is the rule, ``distance`` is ``V(S11) + V(S22) - 2 V(S11, S12,
    S22)``, at random points, in 30-digit arithmetic (any new entry is checked here)."""
    entry = PAIR_RULES[key]
    s11, s22, c = sp.symbols("s11 s22 c", positive=True)
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b, r = rng.uniform(0.1, 3.0), rng.uniform(0.1, 3.0), rng.uniform(-0.99, 0.99)
        at = {s11: sp.Float(a, 30), s22: sp.Float(b, 30), c: sp.Float(r, 30)}
        s12 = c * sp.sqrt(s11 * s22)
        plain = entry(s11, s12, s22, c).subs(at).evalf(30)
        if entry.stable:
            assert abs(entry.stable(s11, s22, 1 - c).subs(at).evalf(30) - plain) < 1e-25
        if entry.distance:
            dist = s11 + s22 - 2 * s12
            gap = correlation_gap(s11, s22, dist)
            want = (entry(s11, s11, s11, 1) + entry(s22, s22, s22, 1) - 2 * entry(s11, s12, s22, c))
            got = entry.distance(s11, s22, dist, gap)
            assert abs(got.subs(at).evalf(30) - want.subs(at).evalf(30)) < 1e-25


def test_correlation_gap_keeps_digits_and_defines_the_zero_variance_limit():
    """1 - c from the distance: exact 0 for identical Gaussians, full relative precision for
    near-identical ones (where 1 - S12/sqrt(S11 S22) is rounding noise), 1 at a zero variance."""
    def f(a, b, dist):
        return correlation_gap(*(sp.Float(str(x), 40) for x in (a, b, dist)))
    assert f(2.0, 2.0, 0.0) == 0
    with mpmath.workdps(40):                 # 1 - c for c = cos(1e-9) on (1, 1): 5e-19
        assert abs(float(f(1.0, 1.0, 2 * (1 - mpmath.cos(mpmath.mpf("1e-9"))))) / 5e-19 - 1) < 1e-12
    assert f(0.0, 3.0, 3.0) == 1 and f(3.0, 0.0, 3.0) == 1
    assert SafePow(sp.Integer(0), -sp.S.Half) == 0 and SafePow(sp.Integer(4), -sp.S.Half) == sp.S.Half


@pytest.mark.parametrize("depth", [2, 3])
def test_numeric_form_carries_distances_not_correlations(depth):
    """Every arc-cosine closed form of the ReLU recursion reads a gap computed from ``dist``
    companions, which start from ||xi - xi'||^2/d; no acos of a correlation is left (also in a
    loop-free derivation, whose last layer has no diagonal twins)."""
    d = derive(mlp(depth, "relu", bias_std=0.1, input_dim=2)).numeric()
    assert any(i.extra.get("distance") for i in d.inputs.values())
    rhs = [e.rhs for e in d.equations]
    assert not any(r.has(sp.acos) for r in rhs)
    assert sum(r.has(sp.asin) for r in rhs) >= 2 * depth - 1
    kinds = {i.kind for i in d.info.values()}
    assert {"dist", "gap"} <= kinds


# ======================================================================== near-duplicates
@pytest.mark.parametrize("params", PARAMS, ids=["no-bias", "bias"])
def test_identical_rows_cross_call_equals_diagonal(relu10, params):
    """ReLU depth 10: K(X, copy of X) computes k(x, x) by the pair equations; it equals the
    diagonal system's k(x, x) (the X2=None entries) to rounding, in both numeric paths.
    (Before the distances were carried: 1.5e-4 relative, from acos of a rounded c = 1.)"""
    d, k = relu10
    same, ref = k(X, X.copy(), params=params), k(X, params=params)
    ev = d.gram(X, X.copy(), params=params)
    for K, R in ((same.ntk, ref.ntk), (same.nngp, ref.nngp), (ev.ntk, ref.ntk), (ev.nngp, ref.nngp)):
        np.testing.assert_allclose(K, R, rtol=1e-13, atol=0)


@pytest.mark.parametrize("params", PARAMS, ids=["no-bias", "bias"])
def test_rows_1e9_apart_keep_their_digits(relu10, params):
    """ReLU depth 10, X2 = X1 + perturbations of relative size 1e-9: every entry of K(X1, X2)
    (compiled and evaluator) is within 1e-12 relative of the 50-digit recursion, and so is the
    X2=None diagonal; hence k(x, x + dx) - k(x, x) (~1e-9 relative) is resolved to ~1e-3."""
    d, k = relu10
    X2 = near_duplicates(X, 1e-9, seed=2)
    sw2, sb2 = params["sigma_w"] ** 2, params["sigma_b"] ** 2
    ref = reference_gram(X, X2, DEPTH, sw2, sb2)
    ref_diag = np.array([relu_reference(x, x, DEPTH, sw2, sb2) for x in X]).T
    K, ev, diag = k(X, X2, params=params), d.gram(X, X2, params=params), k(X, params=params)
    for got in (K, ev):
        np.testing.assert_allclose(got.nngp, ref[0], rtol=1e-12, atol=0)
        np.testing.assert_allclose(got.ntk, ref[1], rtol=1e-12, atol=0)
    np.testing.assert_allclose(np.diag(diag.ntk), ref_diag[1], rtol=1e-13, atol=0)
    true_gap = np.diag(ref[1]) - ref_diag[1]
    assert np.all(np.abs(true_gap) > 1e-10 * ref_diag[1])          # the inputs do differ
    np.testing.assert_allclose(np.diag(K.ntk) - np.diag(diag.ntk), true_gap, rtol=1e-2)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.sampled_from([0.0, 1e-15, 1e-12, 1e-9, 1e-6, 1e-3, 0.3]),
       sw=st.floats(0.5, 2.0), sb=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_property_close_pairs_match_the_high_precision_recursion(scale, sw, sb, seed, relu10):
    """Any distance between the inputs, any variances: the compiled kernel is within 1e-12
    relative of the 50-digit recursion (the acos form is off by up to ~1e-8 per layer)."""
    _, k = relu10
    X1 = np.random.default_rng(seed).normal(size=(2, 5))
    X2 = near_duplicates(X1, scale, seed + 1)
    K = k(X1, X2, params={"sigma_w": sw, "sigma_b": sb})
    ref = reference_gram(X1, X2, DEPTH, sw * sw, sb * sb)
    np.testing.assert_allclose(K.nngp, ref[0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(K.ntk, ref[1], rtol=1e-12, atol=0)


# ======================================================================== zero variance
def test_zero_norm_input_without_bias_evaluator_and_kernel_agree(relu10):
    """x = 0 and no biases: every variance of x is 0 and its correlations are 0/0.  The numeric
    form takes the closed-form table's limit (c = 0, SafePow) in both paths; the numbers equal the
    50-digit recursion, which takes rho = 0 there (E relu(0) relu(g) = 0, E step(0) step(g) = 1/4)."""
    d, k = relu10
    X0 = np.vstack([np.zeros(5), X[:2]])
    params = {"sigma_w": 2 ** 0.5, "sigma_b": 0.0}
    K, E = k(X0, params=params), d.gram(X0, params=params)
    ref = reference_gram(X0, X0, DEPTH, 2.0, 0.0)
    for got in (K, E):
        assert np.all(np.isfinite(got.ntk)) and np.all(np.isfinite(got.nngp))
        np.testing.assert_allclose(got.nngp, ref[0], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(got.ntk, ref[1], rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(K.ntk[0], 0.0)
    cross = k(X0, X[2:], params=params), d.gram(X0, X[2:], params=params)
    np.testing.assert_allclose(cross[0].ntk, cross[1].ntk, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("act", ["erf", "abs"])
def test_zero_norm_input_other_closed_forms(act, kernel_cache):
    """The same limit for an arcsine-law closed form (erf, TP2 Fact E.3) and a kinked one whose
    correlation enters through Stein-derived forms (abs): evaluator == compiled kernel."""
    d = derive(mlp(2, act, weight_std=1.5, input_dim=3))
    X0 = np.array([[0.0, 0.0, 0.0], [1.0, -0.5, 2.0], [0.3, 0.2, -0.1]])
    K, E = d.compile()(X0), d.gram(X0)
    assert np.all(np.isfinite(K.ntk)) and np.all(np.isfinite(E.ntk))
    np.testing.assert_allclose(K.ntk, E.ntk, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(K.nngp, E.nngp, rtol=1e-13, atol=1e-300)
