"""Compiled kernels (symntk.codegen, symntk.kernels): the generated Numba code against oracles.

Oracles, each independent of the code under test:
* the derivation's own equations substituted with SymPy at 30 digits, expectations without a
  closed form by mpmath quadrature (``symntk.gaussian.numeric_expectation``): :func:`oracle`;
* the textbook Jacot / Neural Tangents MLP recursion (TP2 Eqs. 6, 8, 9) in mpmath;
* closed forms: TP2 App. E.1 and the He-initialised ReLU MLP;
* structural identities: symmetry, PSD, the diagonal system.

Every compiled kernel is built once per session (Numba's first call compiles) into a fresh
cache directory, so the whole file also exercises the cold-cache path.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import mpmath
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings, strategies as st

import symntk
from symntk import codegen, kernels, quadrature
from symntk.activations import ACTIVATIONS
from symntk.builders import mlp
from symntk.codegen import NumbaPrinter, SafePow
from symntk.derivation import derive
from symntk.equations import Loop
from symntk.gaussian import GaussianExpectation, numeric_expectation

X_PAIR = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
#: rows: generic, generic, the zero vector, a small vector anti-correlated with row 0
X_TEST = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5], [0.0, 0.0, 0.0], [-0.4, -0.9, 0.3]])
SW, SB = sp.Symbol("sigma_w", positive=True), sp.Symbol("sigma_b", positive=True)


# ======================================================================== session fixtures
# ``kernel_cache`` (the session's private, cold $SYMNTK_CACHE_DIR) lives in conftest.py.


@functools.lru_cache(maxsize=None)
def _build(act, depth, weight_std, bias_std, parametrization, rule="polar"):
    d = derive(mlp(depth, act, weight_std=weight_std, bias_std=bias_std,
                   parametrization=parametrization, input_dim=3))
    return d, d.compile(rule=rule)


@pytest.fixture(scope="session")
def build(kernel_cache):
    """``build(act, depth, weight_std, bias_std, parametrization)`` -> (derivation, kernel),
    compiled once per session."""
    return _build


# ============================================================================== the oracle
def oracle(derivation, x1, x2, params=None, dps=30):
    """(nngp, ntk) of one pair by substituting the equations with SymPy at ``dps`` digits.

    Gaussian expectations without a closed form: mpmath quadrature split at the kinks
    (``numeric_expectation``, ~1e-13 absolute).  For x1 == x2 pass ``derivation.diagonal``
    (the pair equations need c = 1 exactly).
    """
    d = derivation.reduced()
    # a zero input is the limit of a tiny one (the closed forms divide 0/0 at exactly zero)
    xs = [[sp.Float(float(v), dps) for v in np.ravel(x)] if np.any(x) else
          [sp.Float(k + 1, dps) * sp.Float("1e-25", dps) for k in range(np.size(x))]
          for x in (x1, x2)]
    dim = len(xs[0])
    vals = {s: sum(a * b for a, b in zip(xs[i.copies[0]], xs[i.copies[1]])) / dim
            for s, i in d.inputs.items()}
    consts = {}
    for s in d.parameters():
        for k, v in (params or {}).items():
            if str(k) == str(s):
                consts[s] = sp.Float(v, dps)

    def value(expr, idx):
        expr = sp.sympify(expr).xreplace(idx).xreplace(consts)
        for su in expr.atoms(sp.Sum):
            (l, lo, hi), = su.limits
            expr = expr.xreplace({su: sum(value(su.function, {l: sp.Integer(v)})
                                          for v in range(int(lo), int(hi) + 1))})
        expr = expr.xreplace({ind: vals[(ind.base.label, int(ind.indices[0]))]
                              for ind in expr.atoms(sp.Indexed)})
        expr = expr.xreplace({s: v for s, v in vals.items() if not isinstance(s, tuple)})
        nodes = expr.atoms(GaussianExpectation)
        expr = expr.xreplace({g: sp.Float(numeric_expectation(g, prec=64), dps) for g in nodes})
        return sp.N(expr, dps)

    for step in d.steps:
        if isinstance(step, Loop):
            ls = range(int(step.start), int(step.stop) + 1)
            for lv in (ls if step.direction > 0 else reversed(ls)):
                idx = {step.index: sp.Integer(lv)}
                for q in step.equations:
                    key = (q.lhs.base.label, int(q.lhs.indices[0].xreplace(idx)))
                    vals[key] = value(q.rhs, idx)
        else:
            key = (step.lhs.base.label, int(step.lhs.indices[0])) \
                if isinstance(step.lhs, sp.Indexed) else step.lhs
            vals[key] = value(step.rhs, {})
    nngp = None if d.nngp is None else float(value(d.nngp, {}))
    return nngp, float(value(d.ntk, {}))


def _close(got, want, rtol, scale):
    return abs(got - want) <= rtol * max(abs(want), 1e-3 * scale)


# ============================================================== every activation of the registry
#: Parameters for the parametrised constructors; weight_std where the default would overflow.
SPECS = {"leaky_relu": "leaky_relu(0.2)", "monomial": "monomial(3)",
         "polynomial": "polynomial(0.5, 1, -0.3)"}
WEIGHT_STD = {"exp": 0.5, "monomial": 0.8}
#: Each activation runs two configurations; together they cover depths 1..5, with and without
#: bias, both parametrizations (the 20 combinations, over 16 activations x 2), and each
#: activation sees two depths, both bias settings and both parametrizations.
_ORDER = sorted(ACTIVATIONS)
_NAMES = [n for n in _ORDER if n != "step"]
_BP = [(0.3, "ntk"), (0.3, "tp"), (None, "tp"), (None, "ntk")]


def _combo(k):
    return (1 + (k % 5 + k // 5) % 5,) + _BP[k // 5]


def _configs(name):
    a = _NAMES.index(name)
    return [_combo(a), _combo((a + 10) % 20)]


def test_configs_cover_every_combination():
    combos = {(dp, b is not None, p) for n in _NAMES for dp, b, p in _configs(n)}
    assert combos == {(dp, b, p) for dp in range(1, 6) for b in (True, False)
                      for p in ("ntk", "tp")}


@pytest.mark.parametrize("name", _ORDER)
def test_registry_matches_high_precision(name, build):
    """Compiled NNGP/NTK = the derivation at 30 digits, to 1e-12 relative, off the diagonal
    (pair system, incl. a zero input and a negative correlation) and on it (diagonal system).

    Quadrature activations (tanh, sigmoid, softplus, swish/silu) reach the same 1e-12 with the
    default polar rule at these variances (<= ~3.5); see test_tanh_accuracy_vs_variance for
    where that stops."""
    spec = SPECS.get(name, name)
    quad = name in ("tanh", "sigmoid", "softplus", "swish", "silu")
    # step jumps (derivative 0 almost everywhere): one configuration, outside the coverage count
    for depth, bias, par in ([(2, 0.3, "ntk")] if name == "step" else _configs(name)):
        d, k = build(spec, depth, WEIGHT_STD.get(name, 1.2), bias, par)
        r = k(X_TEST)
        scale = np.abs(r.ntk).max()
        pairs = [(0, 3)] if quad else [(0, 1), (0, 3), (1, 2)]    # mpmath 2-D quadrature: slow
        for i, j in pairs + [(1, 1)]:
            nngp, ntk = oracle(d if i != j else d.diagonal, X_TEST[i], X_TEST[j])
            assert _close(r.ntk[i, j], ntk, 1e-12, scale), (name, depth, bias, par, i, j)
            assert _close(r.nngp[i, j], nngp, 1e-12, np.abs(r.nngp).max()), (name, i, j)


def test_kinked_user_activation_polar_rule_is_exact():
    """relu + tanh has no closed form: the 2-D quadrature must split at the kink u = 0.  The polar
    rule does (1e-12); tensor Gauss-Hermite converges like 1/n there (Neural Tangents' warning
    for non-smooth phi)."""
    act = "relu(x) + tanh(x)"
    d, k = _build(act, 2, 1.1, 0.1, "ntk")
    _, kh = _build(act, 2, 1.1, 0.1, "ntk", "hermite")
    r, rh = k(X_TEST), kh(X_TEST)
    nngp, ntk = oracle(d, X_TEST[0], X_TEST[1])
    assert r.ntk[0, 1] == pytest.approx(ntk, rel=1e-12)
    assert r.nngp[0, 1] == pytest.approx(nngp, rel=1e-12)
    assert abs(rh.ntk[0, 1] / ntk - 1) > 1e-4           # what splitting buys
    assert rh.ntk[0, 1] == pytest.approx(ntk, rel=3e-2)   # the hermite path still works


def test_tanh_accuracy_vs_variance():
    """Documented accuracy of the default polar rule for E tanh(u) tanh(v) (kernels docstring):
    ~1e-13 up to variance 2, ~1e-10 at variance 6."""
    rr, rw, at, aw = quadrature.polar_rule(32, 24)
    u1, u2 = sp.symbols("u_1 u_2", real=True)
    for var, tol in [(0.5, 1e-13), (2.0, 1e-12), (6.0, 1e-9)]:
        for c in (0.3, 0.99):
            S = sp.Matrix([[var, c * var * 0.9], [c * var * 0.9, 0.81 * var]])
            want = float(numeric_expectation(GaussianExpectation(sp.tanh(u1) * sp.tanh(u2),
                                                                 (u1, u2), S), prec=64))
            got = _polar_numpy(np.tanh, np.sqrt(var), 0.9 * np.sqrt(var), c, rr, rw, at, aw)
            assert abs(got / want - 1) < tol, (var, c, got, want)


def _polar_numpy(f, s1, s2, c, rr, rw, at, aw):
    """The generated polar rule, in NumPy, for f(u1) f(u2)."""
    r = np.sqrt(1 - c * c)
    ta = np.arctan2(-c, r)
    tot = 0.0
    for lo, ln in [(ta, np.pi / 2 - ta), (np.pi / 2, ta + np.pi / 2)]:
        th = lo + ln * at
        e1, e2 = s1 * np.cos(th), s2 * (c * np.cos(th) + r * np.sin(th))
        U1, U2 = np.outer(rr, e1), np.outer(rr, e2)
        F = f(U1) * f(U2) + f(-U1) * f(-U2)
        tot += np.sum(np.outer(rw, ln * aw) * F)
    return tot / (2 * np.pi)


def test_other_architectures(kernel_cache):
    """Residual (means, non-Gaussian skip sums) and tied (unrolled, cross-layer) programs."""
    X = np.random.default_rng(4).normal(size=(5, 3))
    d = derive(symntk.residual_mlp(2, "tanh", weight_std=1.2, bias_std=0.3, input_dim=3))
    r = d.compile()(X)
    for i, j in [(0, 1), (2, 2)]:
        nngp, ntk = oracle(d if i != j else d.diagonal, X[i], X[j])
        assert r.ntk[i, j] == pytest.approx(ntk, rel=1e-12)
        assert r.nngp[i, j] == pytest.approx(nngp, rel=1e-12)
    d = derive(symntk.tied_mlp(3, "relu", weight_std=1.2, bias_std=0.3, input_dim=3))
    assert d.unrolled_repeats
    r, ref = d.compile()(X), d.gram(X)
    np.testing.assert_allclose(r.ntk, ref.ntk, rtol=1e-13)
    np.testing.assert_allclose(r.nngp, ref.nngp, rtol=1e-13)


# ======================================================================= closed-form values
@pytest.mark.parametrize("L,expected", [(1, [6.666667, 0.0621634, 4.666667]),
                                        (2, [10.0, 1.1560405, 7.0]),
                                        (3, [13.33333, 2.2517982, 9.33333])])
def test_he_relu_no_bias(L, expected, build):
    """He-initialised ReLU MLP: no biases, sigma_w^2 = 2 everywhere (Jacot / NT convention)."""
    _, k = build("relu", L, sp.sqrt(2), None, "ntk")
    K = k(X_PAIR).ntk
    assert [K[0, 0], K[0, 1], K[1, 1]] == pytest.approx(expected, rel=2e-6)
    q = X_PAIR @ X_PAIR.T / 3
    assert K[0, 0] == pytest.approx(2 * (L + 1) * q[0, 0], rel=1e-14)    # exact diagonal
    if L == 2:                                   # TP convention: omega ~ N(0, 2) trained directly
        _, ktp = build("relu", L, sp.sqrt(2), None, "tp")
        assert ktp(X_PAIR).ntk[1, 1] == pytest.approx((L + 1) * q[1, 1], rel=1e-14)


def test_tp2_appendix_e1(kernel_cache):
    """TP2 App. E.1 closed form: Theta(x, x) = 3/4 |x|^2/m + 7/4 (no readout bias)."""
    k = derive(mlp(2, "relu", weight_std=1, bias_std=1, readout_bias=False, input_dim=3)).compile()
    X = np.vstack([[1.0, 2.0, 0.0], np.random.default_rng(0).normal(size=(4, 3))])
    q = np.einsum("ij,ij->i", X, X) / 3
    assert k(X).ntk.diagonal() == pytest.approx(0.75 * q + 1.75, rel=1e-14)
    assert k(X[:1]).ntk[0, 0] == pytest.approx(3.0, rel=1e-15)


def _jacot(depth, V, Vdot, sw2, sb2, q1, q2, c):
    """Jacot et al. 2018 / Neural Tangents (TP2 Eqs. 6, 8, 9): Sigma^1 = sw2 x.x'/d + sb2,
    Sigma^{l+1} = sw2 V(Sigma^l) + sb2, Theta^{l+1} = Sigma^{l+1} + sw2 Theta^l dSigma^l,
    readout Dense(1) with bias.  Written here independently, in mpmath."""
    S = [sw2 * q1 + sb2, sw2 * c + sb2, sw2 * q2 + sb2]
    theta = S[1]
    for _ in range(depth):
        nxt = [sw2 * V(S[0], S[0], S[0]) + sb2, sw2 * V(S[0], S[1], S[2]) + sb2,
               sw2 * V(S[2], S[2], S[2]) + sb2]
        theta = nxt[1] + sw2 * theta * Vdot(S[0], S[1], S[2])
        S = nxt
    return S[1], theta


def _relu_V(a, s, b):
    c = min(mpmath.mpf(1), s / mpmath.sqrt(a * b))
    return mpmath.sqrt(a * b) / (2 * mpmath.pi) * (mpmath.sqrt(1 - c * c)
                                                    + (mpmath.pi - mpmath.acos(c)) * c)


def _relu_Vdot(a, s, b):
    return (mpmath.pi - mpmath.acos(min(mpmath.mpf(1), s / mpmath.sqrt(a * b)))) / (2 * mpmath.pi)


def _erf_V(a, s, b):
    return 2 / mpmath.pi * mpmath.asin(2 * s / mpmath.sqrt((1 + 2 * a) * (1 + 2 * b)))


def _erf_Vdot(a, s, b):
    return 4 / mpmath.pi / mpmath.sqrt((1 + 2 * a) * (1 + 2 * b) - 4 * s * s)


@pytest.mark.parametrize("act,V,Vdot", [("relu", _relu_V, _relu_Vdot),
                                        ("erf", _erf_V, _erf_Vdot)])
def test_neural_tangents_conventions(act, V, Vdot, build):
    """The compiled MLP equals the Jacot/NT recursion (readout Dense(1) with its own bias)
    for symbolic variances bound at call time."""
    _, k = build(act, 4, SW, SB, "ntk")
    sw, sb = 1.3, 0.4
    X = np.random.default_rng(3).normal(size=(5, 3))
    r = k(X, params={"sigma_w": sw, "sigma_b": sb})
    with mpmath.workdps(30):
        for i, j in [(0, 1), (2, 4), (3, 3)]:
            q1, q2, c = (mpmath.mpf(float(v)) for v in (X[i] @ X[i] / 3, X[j] @ X[j] / 3,
                                                        X[i] @ X[j] / 3))
            nngp, ntk = _jacot(4, V, Vdot, mpmath.mpf(sw) ** 2, mpmath.mpf(sb) ** 2, q1, q2, c)
            assert r.ntk[i, j] == pytest.approx(float(ntk), rel=1e-13)
            assert r.nngp[i, j] == pytest.approx(float(nngp), rel=1e-13)


# ================================================================== API, drivers, reference
def test_agrees_with_numpy_reference_and_terms(build):
    d, k = build("erf", 3, 1.3, 0.2, "ntk")
    rng = np.random.default_rng(5)
    X1, X2 = rng.normal(size=(7, 3)), rng.normal(size=(4, 3))
    r, ref = k(X1, X2, terms=True), d.gram(X1, X2)
    np.testing.assert_allclose(r.ntk, ref.ntk, rtol=1e-13)
    np.testing.assert_allclose(r.nngp, ref.nngp, rtol=1e-13)
    assert set(r.ntk_terms) == set(ref.ntk_terms)
    for name in r.ntk_terms:
        np.testing.assert_allclose(r.ntk_terms[name], ref.ntk_terms[name], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sum(r.ntk_terms.values()), r.ntk, rtol=1e-13)
    assert k(X1, X2).ntk_terms == {}                       # terms cost memory: opt-in
    rs = k(X1, terms=True)                                 # symmetric path: mirrored terms
    for name, T in rs.ntk_terms.items():
        np.testing.assert_array_equal(T, T.T)
    np.testing.assert_allclose(sum(rs.ntk_terms.values()), rs.ntk, rtol=1e-13)


def test_one_call_shortcut_and_compile_api(build):
    prog = mlp(2, "relu", weight_std=1.4, bias_std=0.1, input_dim=3)
    X = np.random.default_rng(6).normal(size=(6, 3))
    r = symntk.kernel(prog, X)
    d = derive(prog)
    k = symntk.compile(d)
    np.testing.assert_array_equal(r.ntk, k(X).ntk)
    assert isinstance(d.compile(), kernels.CompiledKernel)
    assert "def pairs" in k.source and "prange" in k.source
    assert k.path and os.path.exists(k.path)
    with pytest.raises(TypeError, match="Derivation"):
        symntk.compile(prog)


def test_blocks_and_max_memory(build):
    _, k = build("relu", 3, 1.4, 0.1, "ntk")
    X = np.random.default_rng(7).normal(size=(50, 3))
    full = k(X)
    blocked = k(X, block_rows=3)
    blocked2 = k(X, X[:20], block_rows=7)
    np.testing.assert_allclose(full.ntk, blocked.ntk, rtol=1e-15)      # BLAS blocks may differ
    np.testing.assert_allclose(k(X, X[:20]).ntk, blocked2.ntk, rtol=1e-15)  # in the last bit
    with pytest.raises(MemoryError, match="output matrices.*need 40000 bytes"):
        k(X, max_memory=10_000)
    assert k(X, max_memory=10_000_000).ntk.shape == (50, 50)


def test_peak_memory_near_the_two_outputs(build):
    """Never an (N1, N2, n_symbols) array: the peak is the two outputs plus O(N) tables."""
    _, k = build("relu", 3, 1.4, 0.1, "ntk")
    X = np.random.default_rng(8).normal(size=(700, 3))
    k(X[:10])
    tracemalloc.start()
    r = k(X)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    outputs = r.ntk.nbytes + r.nngp.nbytes
    assert peak <= 1.1 * outputs + 200_000, (peak, outputs)


def test_loops_stay_loops():
    """The generated text does not grow with depth: a repeated block stays a loop."""
    sizes = [len(codegen.generate(derive(mlp(L, "relu", bias_std=0.1))).source)
             for L in (6, 20, 60)]
    assert max(sizes) - min(sizes) < 200
    src = codegen.generate(derive(mlp(20, "tanh", bias_std=0.1))).source
    assert "for l in range(" in src and "prange" in src


def test_params_are_arguments_not_constants(build):
    """Variances are call-time arguments: one module, many hyper-parameters."""
    d, k = build("relu", 3, SW, SB, "ntk")
    assert [str(p) for p in k.generated.params] == ["sigma_b", "sigma_w"]
    X = X_PAIR
    a = k(X, params={"sigma_w": 1.1, "sigma_b": 0.3}).ntk
    b = k(X, params={SW: 1.7, SB: 0.0}).ntk
    np.testing.assert_allclose(a, d.gram(X, params={"sigma_w": 1.1, "sigma_b": 0.3}).ntk,
                               rtol=1e-13)
    np.testing.assert_allclose(b, d.gram(X, params={"sigma_w": 1.7, "sigma_b": 0.0}).ntk,
                               rtol=1e-13)
    with pytest.raises(ValueError, match="sigma_b"):
        k(X, params={"sigma_w": 1.0})


# ================================================================== numerics that never lie
def test_zero_norm_input_relu_without_bias(build):
    """h = W x = 0 for x = 0: every kernel entry with that input is 0 (not NaN)."""
    _, k = build("relu", 3, sp.sqrt(2), None, "ntk")
    X = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    r = k(X)
    assert np.all(np.isfinite(r.ntk)) and np.all(np.isfinite(r.nngp))
    assert r.ntk[0, 0] == 0 and r.ntk[0, 1] == 0 and r.nngp[0, 1] == 0
    assert np.all(np.isfinite(k(X, X[::-1]).ntk))


def test_correlation_one_is_clipped(build):
    """x and a copy of x: c = 1 up to rounding, acos/sqrt see it clipped (no NaN).

    The pair formulas lose digits there (sqrt(1 - c^2) turns a 1e-16 error in c into 1e-8, and
    each deeper layer takes the square root again: ~1e-4 at depth 3).  That is why X2 = None
    takes the diagonal from the diagonal system, which is exact."""
    _, k = build("relu", 3, 1.4, 0.1, "ntk")
    X = np.random.default_rng(9).normal(size=(20, 3)) * 3
    cross = k(X, X.copy()).ntk
    assert np.all(np.isfinite(cross))
    exact = k(X, diagonal=True).ntk
    np.testing.assert_allclose(cross.diagonal(), exact, rtol=1e-3)
    np.testing.assert_array_equal(k(X).ntk.diagonal(), exact)
    # depth 1 in closed form (TP2 Eqs. 6, 8, 9 with V(q, q, q) = q/2, dSigma = 1/2):
    # Theta(x, x) = sw2 (sw2 q + sb2) + sb2
    _, k1 = build("relu", 1, 1.4, 0.1, "ntk")
    q = np.einsum("ij,ij->i", X, X) / 3
    np.testing.assert_allclose(k1(X).ntk.diagonal(), 1.96 * (1.96 * q + 0.01) + 0.01,
                               rtol=1e-14)


@pytest.mark.parametrize("bad,msg", [
    (np.array([[1.0, np.nan, 0.0]]), "NaN or inf.*row 0, column 1"),
    (np.array([[1.0, 0.0, np.inf]]), "NaN or inf"),
    (np.ones((2, 4)), "4 features.*dimension is 3"),
    (np.ones((2, 3, 1)), "shape \\(N, d\\)"),
    (np.ones((0, 3)), "empty"),
])
def test_bad_inputs_are_rejected(bad, msg, build):
    _, k = build("relu", 3, 1.4, 0.1, "ntk")
    with pytest.raises(ValueError, match=msg):
        k(bad)
    with pytest.raises(ValueError, match=msg.replace("X1", "X2")):
        k(X_PAIR, bad)


def test_feature_mismatch_with_symbolic_dimension(kernel_cache):
    k = derive(mlp(1, "erf")).compile()
    with pytest.raises(ValueError, match="X1 has 3 features but X2 has 2"):
        k(np.ones((2, 3)), np.ones((2, 2)))
    assert k(np.ones((2, 5))).ntk.shape == (2, 2)          # d bound from the data


def test_overflow_is_reported(kernel_cache):
    k = derive(mlp(4, "exp", weight_std=2.0, input_dim=3)).compile()
    with pytest.warns(RuntimeWarning, match="not finite"):
        k(X_TEST * 3)


# ====================================================================== properties
#: (shared with the tests above: each compiles once per session)
KERNELS = [("relu", 3), ("relu", 4), ("erf", 4), ("tanh", 2)]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(KERNELS), sw=st.floats(0.5, 2.0), sb=st.floats(0.0, 1.0),
       n=st.integers(1, 9), scale=st.floats(0.01, 5.0), zero=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_properties(which, sw, sb, n, scale, zero, seed, build):
    """Symmetric, PSD, diagonal = the diagonal system, K(X1, X2) = K(X2, X1)^T, finite at a
    zero input; random inputs, depths and hyper-parameters."""
    act, depth = which
    d, k = build(act, depth, SW, SB, "ntk")
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)) * scale
    if zero:
        X[0] = 0.0
    params = {"sigma_w": sw, "sigma_b": sb}
    r = k(X, params=params)
    for K in (r.nngp, r.ntk):
        assert np.all(np.isfinite(K))
        np.testing.assert_array_equal(K, K.T)
        assert np.linalg.eigvalsh(K).min() >= -1e-10 * max(np.abs(K).max(), 1e-300)
    diag = k(X, params=params, diagonal=True)
    np.testing.assert_array_equal(r.ntk.diagonal(), diag.ntk)
    np.testing.assert_array_equal(r.nngp.diagonal(), diag.nngp)
    if act != "tanh":            # the diagonal system by the NumPy evaluator (closed forms)
        ref = symntk.evaluate.gram(d, X, params=params, diagonal=True).ntk
        ok = np.isfinite(ref)    # (the evaluator divides 0/0 at a zero variance: NaN)
        np.testing.assert_allclose(diag.ntk[ok], ref[ok], rtol=1e-13, atol=1e-300)
    Y = rng.normal(size=(3, 3))
    KXY = k(X, Y, params=params).ntk
    tol = 1e-12 if act == "tanh" else 1e-14      # quadrature: u1, u2 swap roles in the rule
    np.testing.assert_allclose(KXY, k(Y, X, params=params).ntk.T, rtol=tol,
                               atol=tol * np.abs(KXY).max())


# ============================================================================ the cache
_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    import symntk
    d = symntk.derive(symntk.mlp(2, "relu", weight_std=1.4, bias_std=0.1, input_dim=3))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        k = d.compile()
        ntk = k(np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])).ntk
    print(json.dumps({"stats": k.cache_stats(), "cached": k.cached, "ntk": ntk.tolist(),
                      "warnings": [str(x.message) for x in w]}))
""")


def _run(cache):
    env = dict(os.environ, SYMNTK_CACHE_DIR=str(cache))
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(symntk.__file__)),
                                        env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_cache_and_damage_degrades(tmp_path):
    first = _run(tmp_path)
    assert first["cached"] and all(s["cache_misses"] == 1 for s in first["stats"].values())
    second = _run(tmp_path)
    assert all(s == {"cache_hits": 1, "cache_misses": 0} for s in second["stats"].values())
    assert second["ntk"] == first["ntk"] and not second["warnings"]
    # damage Numba's index files: a warning, an uncached compile, the same numbers
    for f in (tmp_path / "__pycache__").iterdir():
        f.write_bytes(b"garbage")
    third = _run(tmp_path)
    assert not third["cached"] and third["ntk"] == first["ntk"]
    assert any("cache unusable" in w for w in third["warnings"])


def test_unwritable_cache_dir_degrades_with_a_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SYMNTK_CACHE_DIR", str(blocker / "cache"))
    d = derive(mlp(1, "relu", weight_std=1.3, input_dim=3))
    with pytest.warns(codegen.CacheWarning, match="cache unusable"):
        k = d.compile()
    assert not k.cached and k.path is None
    np.testing.assert_allclose(k(X_PAIR).ntk, d.gram(X_PAIR).ntk, rtol=1e-14)


def test_damaged_module_file_is_replaced(build, kernel_cache):
    _, k = build("relu", 3, 1.4, 0.1, "ntk")
    with open(k.path, "w") as fh:
        fh.write("this is not the generated module")
    with pytest.warns(codegen.CacheWarning, match="replacing a damaged kernel module"):
        codegen.load_module(k.generated)
    with open(k.path) as fh:
        assert fh.read() == k.source


def test_module_name_is_content_addressed(kernel_cache):
    a = codegen.generate(derive(mlp(2, "relu", input_dim=3)))
    codegen.load_module(a)                       # the module file exists now
    b = codegen.generate(derive(mlp(2, "relu", input_dim=3)))
    c = codegen.generate(derive(mlp(2, "erf", input_dim=3)))
    assert a.source == b.source and a.key == b.key and a.key != c.key
    assert b.from_manifest and not a.from_manifest       # a warm start skips generation
    assert (b.params, b.table_width, b.term_names) == (a.params, a.table_width, a.term_names)
    assert "fastmath" not in a.source and "cache=CACHE" in a.source
    path = os.path.join(str(kernel_cache), codegen.MODULE_PREFIX + a.key + ".py")
    with open(path, "a") as fh:                  # a damaged module: the manifest is not trusted
        fh.write("# edited\n")
    assert not codegen.generate(derive(mlp(2, "relu", input_dim=3))).from_manifest


def test_cli_cache_info_and_clear(tmp_path, monkeypatch, capsys):
    from symntk.cli import main
    monkeypatch.setenv("SYMNTK_CACHE_DIR", str(tmp_path))
    (tmp_path / "symntk_kernel_0123.py").write_text("# a module")
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "modules:     1" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 files" in capsys.readouterr().out
    assert not list(tmp_path.glob("symntk_kernel_*"))


# ========================================================================= printer and rules
def test_printer_golden_strings():
    """The printer's numerical guards (clipping, default branches), as the exact text the
    kernels contain."""
    x, y = sp.symbols("x y", real=True)
    p = NumbaPrinter()
    assert p.doprint(sp.acos(x)) == "_acos(x)"               # clipped, vectorisable helper
    assert p.doprint(sp.asin(x / 2)) == "_asin((0.5)*x)"
    assert p.doprint(sp.sqrt(1 - x ** 2)) == "math.sqrt(max(0.0, 1.0 - (x*x)))"
    assert p.doprint(sp.Max(0, x, y)) == "max(max(0.0, x), y)"
    assert p.doprint(sp.Heaviside(x)) == "(1.0 if x > 0.0 else (0.0 if x < 0.0 else 0.5))"
    assert p.doprint(sp.Piecewise((x, x > 1), (y, x < -1))) == \
        "(x if (x > 1.0) else (y if (x < -1.0) else math.nan))"
    assert p.doprint(SafePow(x, -sp.S.Half)) == "(1.0 / math.sqrt(x) if x > 0.0 else 0.0)"
    assert p.doprint(sp.Rational(169, 100) * x) == "(1.69)*x"
    assert p.doprint(1 / (1 + sp.exp(-x)) ** 2) == "(1.0 / ((1.0 + math.exp(-x))**2))"
    assert p.doprint(sp.exp(y) / x ** 2) == "math.exp(y)/(x*x)"


def test_acos_asin_helpers(kernel_cache):
    """The generated ``_acos``/``_asin`` (polynomials, so LLVM vectorises the pair loops):
    coefficients reproducible, clipped into [-1, 1], within 2 ulp of the true functions."""
    assert codegen.asin_coefficients() == pytest.approx(codegen.ASIN_COEFFS, rel=1e-15, abs=1e-17)
    mod = symntk.compile(derive(mlp(1, "relu", input_dim=3))).module
    src = codegen.helpers_source()
    assert "min(1.0, max(-1.0, x))" in src
    xs = np.concatenate([np.linspace(-1, 1, 2001), [0.5, -0.5, 0.5 + 1e-16, 1 - 1e-16, -1 + 1e-16,
                                                    1e-300, -1e-8, 0.0, 1.0 + 1e-15, -1.5]])
    with mpmath.workdps(40):
        for x in xs:
            xc = min(1.0, max(-1.0, x))
            a, b = float(mpmath.acos(xc)), float(mpmath.asin(xc))
            assert abs(mod._acos(x) - a) <= 2 * np.spacing(abs(a)) + 1e-300, x
            assert abs(mod._asin(x) - b) <= 2 * np.spacing(abs(b)) + 1e-300, x


def test_quadrature_rules():
    rr, rw, at, aw = quadrature.polar_rule(32, 24)
    for k in (0, 1, 4, 11):                   # int_0^inf r^k r exp(-r^2/2) dr = 2^{k/2} (k/2)!
        assert np.sum(rw * rr ** k) == pytest.approx(2 ** (k / 2) * float(sp.gamma(k / 2 + 1)),
                                                     rel=1e-14)
    assert np.sum(aw) == pytest.approx(1, rel=1e-15) and 0 < at.min() < at.max() < 1
    hr, hw = quadrature.half_rule(48)
    assert np.sum(hw) == pytest.approx(0.5, rel=1e-14)
    assert np.sum(hw * hr ** 2) == pytest.approx(0.5, rel=1e-14)           # E z^2 on z > 0
    with pytest.raises(ValueError, match="order"):
        symntk.compile(derive(mlp(1, "relu")), radial_order=0)
