"""Exact mode (Zhat + Zdot), the Simple GIA Check, and GIA vs exact (TP3 Box 1, Thm 2.10; TP2 §5
Condition 1, §6.3)."""
import inspect
import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings, strategies as st

import symntk
from symntk import builders, derive, examples as E, expectation, gia_check
from symntk.program import PARAMETRIZATIONS

X1 = np.array([[1.0], [0.5]])


# ---------------------------------------------------------------- the Zdot calculus (TP3 §2-3)
def test_ata_v():
    """x = A^T A v: E Z^v Z^x = 1, E (Z^x)^2 = 2 exactly; GIA says 0 and 1 (TP3 Ex. 2.5, 2.8)."""
    p = E.ata_v()
    v, x = p.nodes[[n.label() for n in p.nodes].index("v")], p.output.vector
    assert expectation(p, lambda Z, dZ: Z(v) * Z(x), "exact") == 1
    assert expectation(p, lambda Z, dZ: Z(x) ** 2, "exact") == 2
    assert expectation(p, lambda Z, dZ: Z(v) * Z(x), "gia") == 0
    assert expectation(p, lambda Z, dZ: Z(x) ** 2, "gia") == 1


def test_semicircle_catalan_numbers():
    """A = W + W^T: E Z^{z^0} Z^{z^t} = 1, 0, 1, 0, 2, 0, 5, 0, 14 (TP3 §3)."""
    p, z = E.semicircle(8)
    moments = [expectation(p, lambda Z, dZ, t=t: Z(z[0]) * Z(z[t]), "exact") for t in range(9)]
    assert moments == [1, 0, 1, 0, 2, 0, 5, 0, 14]


# ---------------------------------------------------------------- GIA counterexamples
def test_gradient_statistics_tp2_section_6_3():
    p = E.tp2_section_6_3()
    x1 = next(n for n in p.nodes if getattr(n, "name", None) == "x1")
    mean = lambda mode: expectation(p, lambda Z, dZ: dZ(x1), mode, x=[0.0])
    second = lambda mode: expectation(p, lambda Z, dZ: dZ(x1) ** 2, mode, x=[0.0])
    assert (mean("exact"), second("exact")) == (2, 8)
    assert (mean("gia"), second("gia")) == (0, 4)


def test_square_readout_ntk():
    """Fixed all-ones readout (TP2 Condition 1 fails): exact Theta = 3 c^2, GIA 2 c^2 with
    c = xi.xi'/d (symbolically)."""
    p = E.square_readout()
    exact, gia = derive(p, mode="exact"), derive(p, mode="gia")
    c = sp.Symbol("c")
    sub = lambda d: _substitute(d, c)
    assert sp.simplify(sub(exact) - 3 * c ** 2) == 0
    assert sp.simplify(sub(gia) - 2 * c ** 2) == 0
    np.testing.assert_allclose(exact.gram(X1).ntk, [[3, 0.75], [0.75, 0.1875]], rtol=1e-14)
    np.testing.assert_allclose(gia.gram(X1).ntk, [[2, 0.5], [0.5, 0.125]], rtol=1e-14)


def test_trained_readout_makes_gia_exact():
    p = E.trained_readout_square()
    assert gia_check(p).holds
    np.testing.assert_allclose(derive(p, mode="exact").gram(X1).ntk,
                               derive(p, mode="gia").gram(X1).ntk, rtol=1e-14)


def _substitute(d, c):
    """The NTK as an expression in the input kernels (every kernel named c)."""
    values = {s: c for s in d.inputs}
    for eq in d.reduced().equations:
        values[eq.lhs] = eq.rhs.xreplace(values)
    return d.reduced().ntk.xreplace(values)


@pytest.mark.parametrize("build", [E.tied_readout_embedding, E.mean_pooled_readout])
def test_relu_counterexamples_differ_from_gia(build):
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    exact, gia = derive(build("relu"), mode="exact"), derive(build("relu"), mode="gia")
    assert np.abs(exact.gram(X).ntk - gia.gram(X).ntk).max() > 0.1
    assert not gia_check(build("relu")).holds


def test_odd_activation_has_no_zdot():
    """phi = erf: phi'' is odd, E phi''(h) = 0, so Zdot vanishes although the check fails."""
    p = E.mean_pooled_readout("erf")
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    assert not gia_check(p).holds
    np.testing.assert_allclose(derive(p, mode="exact").gram(X).ntk,
                               derive(p, mode="gia").gram(X).ntk, rtol=1e-12)


# ---------------------------------------------------------------- BP-like: exact == GIA
#: builders of one-vector-per-example networks, (depth, activation, ...): every such builder
VECTOR_BUILDERS = [k for k in builders.__all__
                   if list(inspect.signature(getattr(builders, k)).parameters)[:2]
                   == ["depth", "activation"] and getattr(builders, k)(1).inputs[0].positions is None]

programs = st.builds(
    lambda kind, depth, act, sb, par: getattr(builders, kind)(
        depth, act, weight_std=1.3, bias_std=sb, parametrization=par, input_dim=3),
    kind=st.sampled_from(VECTOR_BUILDERS),
    depth=st.integers(1, 3),
    act=st.sampled_from(["relu", "erf", "tanh", "identity", "monomial(2)", "gelu"]),
    sb=st.one_of(st.none(), st.just(0.4)),
    par=st.sampled_from(PARAMETRIZATIONS))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs)
def test_exact_equals_gia_on_bp_like_programs(program):
    """Every builder has an independent zero-mean trained readout: BP-like, so the exact calculus
    adds no Zdot and returns GIA's recursion symbol for symbol (TP2 Def. A.3, Thm 7.2; TP3
    Thm D.1)."""
    assert gia_check(program).holds
    exact, gia = derive(program, mode="exact"), derive(program, mode="gia")
    assert [(str(e.lhs), e.rhs) for e in exact.equations] == \
        [(str(e.lhs), e.rhs) for e in gia.equations]
    assert exact.ntk == gia.ntk
    X = np.random.default_rng(0).normal(size=(3, 3))
    width = {"n": 64}      # the standard parametrization's NTK grows with n; the others ignore it
    # identical equations; the reference quadrature's BLAS sums may differ in the last bit
    np.testing.assert_allclose(exact.gram(X, params=width).ntk, gia.gram(X, params=width).ntk,
                               rtol=1e-14, atol=0)


# ---------------------------------------------------------------- gia_check verdicts
@pytest.mark.parametrize("program", [symntk.mlp(3, "relu"), symntk.mlp(2, "erf", bias_std=0.1),
                                     symntk.residual_mlp(3, "relu"), symntk.tied_mlp(3, "tanh"),
                                     E.trained_readout_square()])
def test_gia_check_holds_for_builders(program):
    check = gia_check(program)
    assert check.holds and check.reasons == () and "holds" in str(check)


@pytest.mark.parametrize("program,reason", [
    (E.tp2_section_6_3(), "fixed sum over the coordinates of 'x2'"),
    (E.square_readout(), "nonzero-mean readout"),
    (E.mean_pooled_readout(), "not a zero-mean trained weight"),
    (E.tied_readout_embedding(), "readout vector 'x' is the input embedding (U)"),
    (E.ata_v(), "A is used as A.T in the forward pass"),
    (E.semicircle(3)[0], "W is used as W.T in the forward pass"),
])
def test_gia_check_fails_with_reason(program, reason):
    check = gia_check(program)
    assert not check.holds
    assert any(reason in r for r in check.reasons), check.reasons


# ---------------------------------------------------------------- the finite-width referee
X3 = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])


@pytest.mark.parametrize("build,X", [
    (E.square_readout, X1),
    (lambda: E.tied_readout_embedding("relu"), X3),
    (lambda: E.mean_pooled_readout("relu"), X3),
    (lambda: E.tied_readout_embedding("monomial(2)"), X3),
], ids=["square_readout", "tied_readout_relu", "mean_pooled_relu", "tied_readout_square"])
def test_finite_width_agrees_with_exact_and_rejects_gia(build, X):
    """Width 2048, 8 networks: the empirical NTK's mean is within 3 s.e. of exact mode everywhere
    and more than 5 s.e. from GIA somewhere (each program fails TP2 Condition 1)."""
    program = build()
    mc = symntk.monte_carlo(program, X, width=2048, n_samples=8, seed=11)
    z = {mode: np.abs(derive(program, mode=mode).gram(X).ntk - mc.ntk_mean) / mc.ntk_sem
         for mode in ("gia", "exact")}
    assert z["exact"].max() < 3.0, z
    assert z["gia"].max() > 5.0, z


def test_finite_width_agrees_with_layernorm_moments():
    """NETSOR+ Moments (LayerNorm-style x / sqrt(mean x^2)) against the simulator."""
    a, t = sp.symbols("a t", real=True)
    xi = symntk.Input("xi", 3)
    h = (symntk.Weight("W1", fan_in=3, variance=2) @ xi).named("h")
    m = symntk.Moment(sp.Lambda(a, a ** 2), (h,), "m")
    x = symntk.Nonlin(sp.Lambda((a, t), sp.Max(0, a / sp.sqrt(t))), (h, m), "x")
    h2 = (symntk.Weight("W2") @ x).named("h2")
    m2 = symntk.Moment(sp.Lambda(a, a ** 2), (h2,), "m2")
    y = symntk.Nonlin(sp.Lambda((a, t), sp.tanh(a / sp.sqrt(t))), (h2, m2), "y")
    program = symntk.Program(symntk.Readout(symntk.Weight("v", fan_out=1), y), name="layernorm")
    mc = symntk.monte_carlo(program, X3, width=2048, n_samples=8, seed=5)
    K = derive(program).gram(X3)
    assert (np.abs(K.ntk - mc.ntk_mean) / mc.ntk_sem).max() < 3.5
    assert K.nngp[0, 0] == pytest.approx(mc.nngp_mean[0, 0], abs=4 * mc.nngp_sem[0, 0])


def test_deep_mean_pooled_network_exact_inside_a_folded_loop():
    """Zdot terms in a depth-4 ReLU MLP with a mean-pooled readout: the forward recursion still
    folds into a loop in l, and the exact NTK matches the simulation while GIA does not."""
    xi = symntk.Input("xi", 3)
    x = symntk.nonlin("relu", (symntk.Weight("W1", fan_in=3) @ xi).named("h1"), name="x1")
    x = symntk.repeat(lambda c, l: symntk.nonlin("relu", (symntk.Weight("W", index=l) @ c).named("h"),
                                                 name="x"), x, 2, 4, name="x")
    program = symntk.Program(symntk.FixedReadout(x), name="deep_mean_pooled")
    exact, gia = derive(program, mode="exact"), derive(program, mode="gia")
    assert any(lp.direction > 0 for lp in exact.loops)
    mc = symntk.monte_carlo(program, X3, width=2048, n_samples=8, seed=3)
    z_exact = np.abs(exact.gram(X3).ntk - mc.ntk_mean) / mc.ntk_sem
    z_gia = np.abs(gia.gram(X3).ntk - mc.ntk_mean) / mc.ntk_sem
    assert z_exact.max() < 3.0 and z_gia.max() > 5.0


@pytest.mark.parametrize("build", [lambda: symntk.batchnorm_mlp(1), lambda: symntk.gnn(1)])
def test_compare_names_programs_of_other_engines(build):
    """Pixel-pair and batch programs have one derivation: compare() says so instead of failing."""
    with pytest.raises(NotImplementedError, match="another engine"):
        symntk.compare(build())
