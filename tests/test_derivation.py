"""The GIA derivation against closed forms from the literature (TP2 App. E.1; He-initialised
ReLU MLP) and symbolic identities."""
import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

import symntk
from symntk import Input, Nonlin, Program, ProgramError, Readout, Weight, derive, mlp

X_PAIR = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])


def entries(K):
    return [K[0, 0], K[0, 1], K[1, 1]]


# ---------------------------------------------------------------- TP2 App. E.1 closed form
def test_tp2_appendix_e1_closed_form():
    """ReLU, 2 hidden layers with biases, no readout bias, unit variances:
    Theta(x, x) = 3/4 |x|^2/m + 7/4, with the intermediate limits of TP2 App. E.1."""
    d = derive(mlp(2, "relu", weight_std=1, bias_std=1, readout_bias=False, input_dim=3))
    x = np.array([[1.0, 2.0, 0.0]])
    assert d.gram(x).ntk[0, 0] == pytest.approx(3.0, rel=1e-12)
    for x in np.random.default_rng(0).normal(size=(5, 3)):
        q = x @ x / 3
        assert d.gram(x).ntk[0, 0] == pytest.approx(0.75 * q + 1.75, rel=1e-12)


# ---------------------------------------------------------------- He-initialised ReLU MLP
@pytest.mark.parametrize("L,expected", [(1, [6.666667, 0.0621634, 4.666667]),
                                        (2, [10.0, 1.1560405, 7.0]),
                                        (3, [13.33333, 2.2517982, 9.33333])])
def test_he_relu_no_bias_jacot(L, expected):
    d = derive(mlp(L, "relu", weight_std=sp.sqrt(2), bias_std=None, input_dim=3))
    assert entries(d.gram(X_PAIR).ntk) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("L", [1, 2, 3, 6])
def test_he_relu_diagonal_both_conventions(L):
    x = X_PAIR[:1]
    q = x[0] @ x[0] / 3
    jacot = derive(mlp(L, "relu", weight_std=sp.sqrt(2), input_dim=3)).gram(x).ntk[0, 0]
    tp = derive(mlp(L, "relu", weight_std=sp.sqrt(2), input_dim=3, parametrization="tp")).gram(x).ntk[0, 0]
    assert jacot == pytest.approx(2 * (L + 1) * q, rel=1e-12)
    assert tp == pytest.approx((L + 1) * q, rel=1e-12)


# ---------------------------------------------------------------- structural identities
@pytest.mark.parametrize("L", [1, 2, 4, 9])
def test_linear_network(L):
    """phi = id, no bias, TP convention, unit variances: Theta = (L+1) xi.xi'/d."""
    d = derive(mlp(L, "identity", parametrization="tp", input_dim=3))
    assert d.gram(X_PAIR).ntk == pytest.approx((L + 1) * X_PAIR @ X_PAIR.T / 3, rel=1e-12)
    assert d.gram(X_PAIR).nngp == pytest.approx(X_PAIR @ X_PAIR.T / 3, rel=1e-12)


def test_convention_scaling_per_parameter():
    """TP vs Jacot: each weight term scales by exactly sigma_w^2, each bias term by sigma_b^2."""
    sw, sb = 1.7, 0.3
    jac = derive(mlp(3, "erf", weight_std=sw, bias_std=sb, input_dim=3)).gram(X_PAIR)
    tp = derive(mlp(3, "erf", weight_std=sw, bias_std=sb, input_dim=3, parametrization="tp")).gram(X_PAIR)
    assert jac.ntk_terms.keys() == tp.ntk_terms.keys()
    for name in jac.ntk_terms:
        scale = sb ** 2 if name.startswith("b") else sw ** 2
        np.testing.assert_allclose(jac.ntk_terms[name], scale * tp.ntk_terms[name], rtol=1e-12)
    assert jac.nngp == pytest.approx(tp.nngp, rel=1e-14)


# ---------------------------------------------------------------- the textbook recursion
def _neural_tangents_recursion(depth, V, Vdot, sw2, sb2, q1, q2, c):
    """Jacot et al. / NT (TP2 Eqs. 6-9): Sigma^1 = sw2 x.x'/d + sb2; Theta^{l+1} = Sigma^{l+1} +
    sw2 Theta^l dSigma^l; readout Dense(1) with bias."""
    S = (sw2 * q1 + sb2, sw2 * c + sb2, sw2 * q2 + sb2)
    theta = S[1]
    for _ in range(depth):
        nxt = tuple(sw2 * V(*S, i) + sb2 for i in range(3))
        theta = nxt[1] + sw2 * theta * Vdot(*S)
        S = nxt
    return S[1], theta


def _relu_V(s11, s12, s22, which):
    a, b = [(s11, s11), (s11, s22), (s22, s22)][which]
    cov = [s11, s12, s22][which]
    c = cov / sp.sqrt(a * b)
    return sp.sqrt(a * b) / (2 * sp.pi) * (sp.sqrt(1 - c ** 2) + (sp.pi - sp.acos(c)) * c)


def _relu_Vdot(s11, s12, s22):
    return (sp.pi - sp.acos(s12 / sp.sqrt(s11 * s22))) / (2 * sp.pi)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_recovers_jacot_recursion_relu(depth):
    """derive(mlp) equals the textbook NNGP/NTK recursion, evaluated to 40 digits."""
    sw2, sb2 = sp.Rational(17, 10), sp.Rational(3, 10)
    q1, q2, c = sp.Rational(5, 3), sp.Rational(7, 6), sp.Rational(-1, 2)
    nngp, ntk = _neural_tangents_recursion(depth, _relu_V, _relu_Vdot, sw2, sb2, q1, q2, c)
    d = derive(mlp(depth, "relu", weight_std=sp.sqrt(sw2), bias_std=sp.sqrt(sb2), input_dim=3),
               fold=False).reduced()
    values = {}
    for s, info in d.inputs.items():
        values[s] = {(0, 0): q1, (1, 1): q2, (0, 1): c}[info.copies]
    for eq in d.equations:
        values[eq.lhs] = eq.rhs.xreplace(values)
    assert abs(sp.N(d.ntk.xreplace(values) - ntk, 50)) < 1e-40
    assert abs(sp.N(d.nngp.xreplace(values) - nngp, 50)) < 1e-40


def test_recovers_jacot_recursion_symbolically_for_a_polynomial():
    """With phi(x) = x^2 the closed forms are polynomials (Wick), so the identity is exact algebra
    in symbolic variances and input kernels."""
    sw, sb = sp.symbols("sigma_w sigma_b", positive=True)
    q1, q2, c = sp.symbols("q1 q2 c", real=True)

    def V(s11, s12, s22, which):
        a, b, s = [(s11, s11, s11), (s11, s22, s12), (s22, s22, s22)][which]
        return a * b + 2 * s ** 2

    def Vdot(s11, s12, s22):
        return 4 * s12

    d = derive(mlp(2, "monomial(2)", weight_std=sw, bias_std=sb, input_dim=3), fold=False).reduced()
    values = {s: {(0, 0): q1, (1, 1): q2, (0, 1): c}[info.copies] for s, info in d.inputs.items()}
    for eq in d.equations:
        values[eq.lhs] = eq.rhs.xreplace(values)
    nngp, ntk = _neural_tangents_recursion(2, V, Vdot, sw ** 2, sb ** 2, q1, q2, c)
    assert sp.expand(d.ntk.xreplace(values) - ntk) == 0
    assert sp.expand(d.nngp.xreplace(values) - nngp) == 0


# ---------------------------------------------------------------- structure of the derivation
def test_mlp_is_a_recursion_in_l_not_unrolled():
    d = derive(mlp(50, "relu", bias_std=0.1))
    loops = d.loops
    assert len(loops) == 2                                   # forward and backward
    fwd, bwd = sorted(loops, key=lambda lp: -lp.direction)
    assert fwd.direction == 1 and bwd.direction == -1
    assert fwd.stop == 50 or bwd.stop in (49, 50)
    assert len(d.equations) < 30                            # independent of the depth
    assert not d.unrolled_repeats


def test_folded_equals_unrolled_numerically():
    X = np.random.default_rng(1).normal(size=(4, 5))
    prog = mlp(6, "erf", weight_std=1.3, bias_std=0.2, input_dim=5)
    a, b = derive(prog).gram(X), derive(prog, fold=False).gram(X)
    np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)
    np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)


def test_tied_mlp_cross_layer_terms_vanish_under_gia():
    """Weight tying: same NNGP as the untied MLP (TP0 App. D.6).  The NTK sums D C over every pair
    of uses of W (TP2 Eq. 12), so the derivation keeps cross-layer kernels and stays unrolled; the
    cross-layer D vanish (cotangents of different depths are independent, zero-mean under GIA
    with one readout at the end), so the NTK equals the untied one."""
    X = np.random.default_rng(2).normal(size=(3, 4))
    tied = derive(symntk.tied_mlp(3, "relu", bias_std=0.5, input_dim=4))
    untied = derive(mlp(3, "relu", bias_std=0.5, input_dim=4))
    assert tied.unrolled_repeats
    t, u = tied.gram(X), untied.gram(X)
    np.testing.assert_allclose(t.nngp, u.nngp, rtol=1e-12)
    np.testing.assert_allclose(t.ntk, u.ntk, rtol=1e-12)
    assert "W" in t.ntk_terms and "W[l]" in u.ntk_terms     # one tied matrix vs one per layer


@settings(max_examples=15, deadline=None)
@given(depth=st.integers(1, 4), act=st.sampled_from(["relu", "erf", "identity", "abs"]),
       sw=st.floats(0.5, 2.0), sb=st.one_of(st.none(), st.floats(0.05, 1.0)),
       seed=st.integers(0, 2 ** 16))
def test_gram_matrices_symmetric_psd(depth, act, sw, sb, seed):
    X = np.random.default_rng(seed).normal(size=(5, 3))
    r = derive(mlp(depth, act, weight_std=sw, bias_std=sb, input_dim=3)).gram(X)
    for K in (r.nngp, r.ntk):
        np.testing.assert_allclose(K, K.T, rtol=1e-10, atol=1e-12)
        assert np.linalg.eigvalsh(K).min() > -1e-9 * np.abs(K).max()


# ---------------------------------------------------------------- bad input
def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation.*bogus"):
        mlp(2, "bogus")


def test_jump_is_named_and_refused_on_request():
    with pytest.raises(ValueError, match=r"jumps.*'x1' \(Heaviside\(x\)\)"):
        derive(mlp(2, "step"), jumps="error")
    with pytest.raises(ValueError, match="unknown jumps"):
        derive(mlp(2, "relu"), jumps="loud")


def test_malformed_program_dimension_mismatch_names_node():
    xi = Input("xi", 3)
    W = Weight("W1", fan_in=4)
    with pytest.raises(ProgramError, match="W1.*fan_in 4.*3"):
        W @ xi


def test_nonlinearity_of_a_matrix_is_rejected():
    x = sp.Symbol("x", real=True)
    with pytest.raises(ProgramError, match="applied to W"):
        Nonlin(sp.Lambda(x, sp.tanh(x)), (Weight("W"),))


def test_readout_that_never_reaches_an_input():
    with pytest.raises(ProgramError, match="does not depend on any Input"):
        Program(Readout(Weight("v", fan_out=1), symntk.Bias("b")))


def test_bad_data():
    d = derive(mlp(2, "relu", input_dim=3))
    with pytest.raises(ValueError, match="NaN"):
        d.gram(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="4 features.*dimension is 3"):
        d.gram(np.ones((2, 4)))


def test_unbound_parameter_is_named():
    d = derive(mlp(2, "relu", weight_std=sp.Symbol("sigma_w"), input_dim=3))
    with pytest.raises(ValueError, match="sigma_w"):
        d.gram(X_PAIR)
    assert np.isfinite(d.gram(X_PAIR, params={"sigma_w": 1.2}).ntk).all()


def test_standard_parametrization_against_finite_width():
    """SP trains W directly: the NTK grows like fan_in (as in NT); with the width bound, the
    derived kernel is the finite network's expected NTK."""
    program = mlp(2, "erf", weight_std=1.2, bias_std=0.3, parametrization="standard", input_dim=3)
    d = derive(program)
    assert sp.Symbol("n", positive=True, integer=True) in d.parameters()
    K = d.gram(X_PAIR, params={"n": 512}).ntk
    mc = symntk.monte_carlo(program, X_PAIR, width=512, n_samples=12, seed=1)
    assert (np.abs(K - mc.ntk_mean) / mc.ntk_sem).max() < 3.0
    assert K[0, 0] > 100                      # O(n), unlike the NTK parametrization


def test_zero_input_without_bias_takes_the_limit_in_both_numeric_paths():
    """h = W x = 0 for x = 0: the closed-form table's zero-variance limit (c = 0), not 0/0, in the
    NumPy evaluator and the compiled kernel alike."""
    d = derive(mlp(2, "relu", input_dim=3))
    X = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    E, K = d.gram(X), d.compile()(X)
    assert np.all(np.isfinite(K.ntk)) and K.ntk[0, 0] == 0.0 and E.ntk[0, 0] == 0.0
    np.testing.assert_allclose(E.ntk, K.ntk, rtol=1e-14, atol=1e-300)


def test_float_weight_std_is_made_exact_without_radicals():
    """nsimplify alone turns 1.5871849111603005 into 7*2**(3/403)*3**(69/806)*..., whose
    integer powers overflow a float in the evaluator; the builders keep the float's rational."""
    sw = 1.5871849111603005
    p = mlp(3, "erf", weight_std=sw, bias_std=0.1, input_dim=3)
    variances = {w.variance for w in p.weights}
    assert all(v.is_Rational for v in variances)
    assert any(abs(float(v) - sw ** 2) < 1e-14 for v in variances)
    r = derive(p).gram(X_PAIR)
    assert np.all(np.isfinite(r.ntk))
