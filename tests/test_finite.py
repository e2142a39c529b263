"""Finite-width ground truth (symntk.finite, symntk.convergence).

Oracles used here, each independent of the code under test:
* brute-force Jacobian contraction J1 J2^T (``method="jacobian"``) for the structured NTK;
* central finite differences *in the trained parameter* (W = s * omega, TP2 §4) for reverse
  mode and the parametrization factors;
* a hand-written Neural-Tangents-style MLP recursion (TP2 Eqs. 6-9) with the arc-cosine (ReLU) and
  Williams arcsin (erf) closed forms (TP2 Facts E.2, E.3) for the infinite-width NTK;
* closed forms: TP2 App. E.1 and the He-initialised ReLU MLP.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st
from sympy import Lambda, Max, Symbol, erf, tanh

from symntk.activations import ACTIVATIONS as _REGISTRY
from symntk.builders import mlp, residual_mlp, tied_mlp
from symntk.convergence import ConvergenceRecord, convergence, plot_convergence
from symntk.finite import FiniteNetwork, empirical_ntk, monte_carlo, sample
from symntk.program import (PARAMETRIZATIONS, WIDTH, Bias, FixedReadout, Input, Nonlin, OutputBias,
                            Program, Readout, Weight, nonlin)

x = Symbol("x", real=True)
RELU = Lambda(x, Max(0, x))
ERF = Lambda(x, erf(x))
TANH = Lambda(x, tanh(x))
M = Symbol("m", positive=True, integer=True)


# ----------------------------------------------------------------------------- programs
def transpose_program(act=RELU):
    """Uses W, then W^T, then W again in the forward pass (rectangular W : A(n, m)), a two-argument
    Nonlin, a bias and a readout with output bias: the mixed W / W^T Gram terms all appear."""
    a, b = Symbol("a", real=True), Symbol("b", real=True)
    xi = Input("xi", 3)
    U = Weight("U", M, 3, variance=sp.Rational(13, 10))
    W = Weight("W", WIDTH, M, variance=sp.Rational(17, 10))
    x1 = nonlin(TANH, U @ xi)                       # dim m
    x2 = nonlin(act, W @ x1)                        # dim n
    x3 = Nonlin(Lambda((a, b), erf(a) * b), (W.T @ x2, x1))  # dim m: W^T in the forward pass
    x4 = nonlin(TANH, W @ x3 + Bias("b", WIDTH, sp.Rational(1, 2)))
    return Program(Readout(Weight("v", 1, WIDTH, sp.Rational(11, 10)), x4,
                           OutputBias("b_out", sp.Rational(3, 10))), name="transpose")


def two_input_program():
    """Two network inputs, one bias used in two layers, and a fixed (nonzero-mean) readout."""
    xa, xc = Input("a", 3), Input("c", 4)
    b = Bias("b", WIDTH, sp.Rational(7, 10))
    h = Weight("Ua", WIDTH, 3) @ xa + Weight("Uc", WIDTH, 4, variance=2) @ xc + b
    g = Weight("W", variance=sp.Rational(3, 2)) @ nonlin(RELU, h) + b
    return Program(FixedReadout(nonlin(TANH, g)), name="two_input")


STRUCTURED_CASES = {
    "mlp_bias": (mlp(3, RELU, 1.3, 0.4), 9),
    "mlp_nobias_erf": (mlp(2, ERF, 1.1, None), 8),
    "residual": (residual_mlp(3, TANH, 0.9, 0.2, branch_scale=sp.Rational(1, 2)), 10),
    "tied": (tied_mlp(4, RELU, 1.4, 0.3), 7),
    "transpose": (transpose_program(), {"n": 7, "m": 11}),
    "two_input": (two_input_program(), 12),
}


def inputs_for(program, n, seed):
    rng = np.random.default_rng(seed)
    dims = {i.name: (int(i.dim) if i.dim.is_Integer else 4) for i in program.inputs}
    if len(dims) == 1:
        return rng.standard_normal((n, next(iter(dims.values()))))
    return {name: rng.standard_normal((n, d)) for name, d in dims.items()}


def rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ----------------------------------------------------------------------------- structured = brute force
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("case", sorted(STRUCTURED_CASES))
def test_structured_ntk_equals_jacobian_contraction(case, parametrization):
    program, width = STRUCTURED_CASES[case]
    X1, X2 = inputs_for(program, 5, 1), inputs_for(program, 3, 2)
    for second in (None, X2):
        fast = empirical_ntk(program, X1, second, width=width, seed=3, parametrization=parametrization)
        slow = empirical_ntk(program, X1, second, width=width, seed=3, parametrization=parametrization,
                             method="jacobian")
        assert fast.ntk.shape == (5, 5 if second is None else 3)
        assert rel_err(fast.ntk, slow.ntk) < 1e-10
        assert fast.contributions.keys() == slow.contributions.keys()
        for label, c in slow.contributions.items():
            assert np.max(np.abs(fast.contributions[label] - c)) <= 1e-10 * np.max(np.abs(slow.ntk))
        np.testing.assert_array_equal(fast.outputs1, slow.outputs1)
    # every parameter contributes something nonzero (the oracle is not comparing zeros)
    assert all(np.max(np.abs(c)) > 0 for c in fast.contributions.values())


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 9), m=st.integers(2, 9), seed=st.integers(0, 2**31),
       parametrization=st.sampled_from(PARAMETRIZATIONS))
def test_structured_equals_jacobian_random_shapes(n, m, seed, parametrization):
    program = transpose_program(act=TANH)
    X1 = np.random.default_rng(seed).standard_normal((4, 3))
    X2 = np.random.default_rng(seed + 1).standard_normal((2, 3))
    net = sample(program, {"n": n, "m": m}, seed, parametrization)
    fast, slow = net.ntk(X1, X2), net.ntk(X1, X2, method="jacobian")
    assert rel_err(fast.ntk, slow.ntk) < 1e-10


def test_mixed_weight_transpose_gram_term():
    """For uses y = W z (dF/dW = g z^T) and y' = W^T z' (dF/dW = z' g'^T) the Frobenius product is
    sum_ij g_i z_j z'_i g'_j = (g.z')(z.g'): the structured term (G Z'^T) * (Z G'^T)."""
    from symntk.finite import _weight_gram
    rng = np.random.default_rng(0)
    n_out, n_in, N1, N2 = 5, 3, 4, 2
    G, Z = rng.standard_normal((N1, n_out)), rng.standard_normal((N1, n_in))   # y = W z
    Zt, Gt = rng.standard_normal((N2, n_out)), rng.standard_normal((N2, n_in))  # y' = W^T z'
    explicit = np.array([[np.sum(np.outer(G[i], Z[i]) * np.outer(Zt[j], Gt[j])) for j in range(N2)]
                         for i in range(N1)])
    np.testing.assert_allclose(explicit, (G @ Zt.T) * (Z @ Gt.T), rtol=1e-13)
    np.testing.assert_allclose(_weight_gram([(G, Z)], [(Zt, Gt)], symmetric=False), explicit, rtol=1e-13)


def test_symmetric_gram_is_symmetric_and_psd():
    program, width = STRUCTURED_CASES["tied"]
    r = empirical_ntk(program, inputs_for(program, 6, 0), width=width, seed=0)
    np.testing.assert_allclose(r.ntk, r.ntk.T, rtol=0, atol=1e-12 * np.abs(r.ntk).max())
    assert np.linalg.eigvalsh(r.ntk).min() > -1e-10 * np.abs(r.ntk).max()


# ----------------------------------------------------------------------------- finite differences
def trained_scale(param_kind, parametrization, variance, fan_in):
    """s in W = s * omega (TP2 §4), written out from the definitions, not from finite.py."""
    if parametrization == "standard":
        return 1.0
    if param_kind == "weight":
        return np.sqrt((variance if parametrization == "ntk" else 1.0) / fan_in)
    return np.sqrt(variance) if parametrization == "ntk" else 1.0


def fd_trained_jacobian(net: FiniteNetwork, X, parametrization, eps=1e-6):
    """Per-example d f / d omega for every trained entry by central differences."""
    program = net.program
    kinds = {p.label(): ("weight", float(p.variance), int(net.parameters[p.label()].shape[1]))
             for p in program.weights}
    kinds.update({p.label(): ("bias", float(p.variance), 1) for p in program.biases})
    if isinstance(program.output, Readout) and program.output.bias is not None:
        kinds[program.output.bias.name] = ("bias", float(program.output.bias.variance), 1)
    jac = {}
    for label, value in net.parameters.items():
        s = trained_scale(*kinds[label][:1], parametrization, *kinds[label][1:])
        cols = []
        for idx in np.ndindex(value.shape):
            step = np.zeros_like(value)
            step[idx] = s * eps   # omega + eps  <=>  W + s * eps
            up = net.with_parameters({label: value + step})(X)
            down = net.with_parameters({label: value - step})(X)
            cols.append((up - down) / (2 * eps))
        jac[label] = (np.stack(cols, axis=1), s)
    return jac


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("case", ["transpose", "two_input", "tied"])
def test_reverse_mode_matches_finite_differences(case, parametrization):
    program = {"transpose": transpose_program(act=TANH), "two_input": two_input_program(),
               "tied": tied_mlp(3, ERF, 1.2, 0.5)}[case]
    width = {"n": 4, "m": 5} if case == "transpose" else 4
    X = inputs_for(program, 3, 7)
    net = sample(program, width, seed=11, input_dim=4)
    fd = fd_trained_jacobian(net, X, parametrization)
    grads = net.gradients(X)
    for label, (J, s) in fd.items():
        raw = grads[label].reshape(len(J), -1)
        np.testing.assert_allclose(raw * s, J, rtol=1e-6, atol=1e-8 * np.abs(J).max())
    ntk_fd = sum(J @ J.T for J, _ in fd.values())
    ntk = net.ntk(X, parametrization=parametrization).ntk
    assert rel_err(ntk, ntk_fd) < 1e-7


#: every registered activation; constructors that need parameters get them here
_SPECS = {"polynomial": "polynomial(0.5, 1, -0.3)"}
REGISTRY = [_SPECS.get(name, name) for name in sorted(_REGISTRY)]


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_activations_reverse_mode(name):
    """Every registered activation differentiates (sympy.diff) and backpropagates correctly."""
    program = mlp(2, name, 0.8, 0.3)
    X = inputs_for(program, 3, 5)
    net = sample(program, 5, seed=2, input_dim=4)
    fd = fd_trained_jacobian(net, X, "ntk")
    grads = net.gradients(X)
    for label, (J, s) in fd.items():
        np.testing.assert_allclose(grads[label].reshape(len(J), -1) * s, J, rtol=1e-5,
                                   atol=1e-7 * max(1.0, np.abs(J).max()))


def test_nonlinearity_derivatives_from_sympy():
    """Derivatives come from sympy.diff of the Lambda: Max(0, x) -> Heaviside with H(0) = 1/2,
    x Heaviside(x) -> its a.e. derivative (DiracDelta dropped), Abs -> sign, two-argument Nonlins."""
    from symntk.finite import _compile_nonlin
    z = np.array([-1.5, 0.0, 2.0])
    for phi, expected in [(RELU, [0.0, 0.5, 1.0]), (Lambda(x, x * sp.Heaviside(x)), [0.0, 0.5, 1.0]),
                          (Lambda(x, sp.Abs(x)), [-1.0, 0.0, 1.0]),
                          (ERF, 2 / np.sqrt(np.pi) * np.exp(-z ** 2))]:
        f, (df,) = _compile_nonlin(phi, ())
        np.testing.assert_allclose(np.broadcast_to(df(z), z.shape), expected, rtol=1e-15)
    a, b = Symbol("a", real=True), Symbol("b", real=True)
    f, (da, db) = _compile_nonlin(Lambda((a, b), tanh(a) * b ** 2), ())
    np.testing.assert_allclose(da(z, z + 1), (1 - np.tanh(z) ** 2) * (z + 1) ** 2, rtol=1e-14)
    np.testing.assert_allclose(db(z, z + 1), 2 * np.tanh(z) * (z + 1), rtol=1e-14)


# ----------------------------------------------------------------------------- sampling and inputs
def test_sampling_law_and_reproducibility():
    program = mlp(2, RELU, 1.5, 0.5)
    net = sample(program, 700, seed=5, input_dim=3)
    p = net.parameters
    for label, var, count in [("W[2]", 2.25 / 700, 700 * 700), ("W1", 2.25 / 3, 700 * 3),
                              ("v", 2.25 / 700, 700), ("b1", 0.25, 700)]:
        est = p[label].var()
        assert abs(est / var - 1) < 4 * np.sqrt(2 / count), (label, est, var)
    again = sample(program, 700, seed=5, input_dim=3)
    other = sample(program, 700, seed=6, input_dim=3)
    np.testing.assert_array_equal(again.parameters["W[2]"], p["W[2]"])
    assert not np.array_equal(other.parameters["W[2]"], p["W[2]"])
    with pytest.raises(ValueError):
        p["W1"][0, 0] = 1.0  # parameters are read-only views


def test_variable_widths_and_symbolic_variance():
    sw2 = Symbol("sigma_w2", positive=True)
    program = Program(Readout(Weight("v", 1, M), nonlin(ERF, Weight("U", M, 2, variance=sw2)
                                                          @ Input("xi", 2))))
    with pytest.raises(ValueError, match="sigma_w2"):
        sample(program, {"m": 5}, seed=0)
    net = sample(program, {"m": 5}, seed=0, values={"sigma_w2": 4})
    assert net.parameters["U"].shape == (5, 2) and net.dims == {"m": 5}
    assert net(np.ones((3, 2))).shape == (3,)


def test_input_validation_errors():
    program = mlp(2, RELU, 1.0, 0.1)
    net = sample(program, 6, seed=0, input_dim=3)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        net(np.ones((4, 2)))
    with pytest.raises(ValueError, match="single example"):
        net(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        net(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="no examples"):
        net(np.ones((0, 3)))
    with pytest.raises(ValueError, match="input_dim"):
        sample(program, 6, seed=0)
    with pytest.raises(ValueError, match="width"):
        sample(program, 0, seed=0, input_dim=3)
    with pytest.raises(ValueError, match="parametrization"):
        sample(program, 6, seed=0, input_dim=3, parametrization="mup")
    with pytest.raises(ValueError, match="method"):
        net.ntk(np.ones((2, 3)), method="fast")
    two = sample(two_input_program(), 5, seed=0)
    with pytest.raises(ValueError, match="dict"):
        two(np.ones((2, 3)))
    with pytest.raises(ValueError, match="inputs given for"):
        two({"a": np.ones((2, 3))})
    with pytest.raises(ValueError, match="different numbers of examples"):
        two({"a": np.ones((2, 3)), "c": np.ones((3, 4))})
    with pytest.raises(ValueError, match=r"\['m'\]"):
        sample(transpose_program(), {"n": 4}, seed=0)


# ----------------------------------------------------------------------------- infinite-width oracle
def relu_expectations(s11, s22, s12):
    """E relu(u) relu(v), E step(u) step(v): arc-cosine kernels of order 1 and 0, halved (TP2 Fact E.2)."""
    norm = np.sqrt(s11 * s22)
    c = np.clip(s12 / norm, -1.0, 1.0)
    theta = np.arccos(c)
    return (norm * (np.sqrt(1 - c * c) + (np.pi - theta) * c) / (2 * np.pi),
            (np.pi - theta) / (2 * np.pi))


def erf_expectations(s11, s22, s12):
    """E erf(u) erf(v), E erf'(u) erf'(v) (Williams 1997, TP2 Fact E.3)."""
    a, b = 1 + 2 * s11, 1 + 2 * s22
    return 2 / np.pi * np.arcsin(2 * s12 / np.sqrt(a * b)), 4 / np.pi / np.sqrt(a * b - 4 * s12 ** 2)


def nt_kernels(X, depth, expectations, sw, sb, readout_bias=True, terms=False):
    """NNGP and NTK of ``mlp(depth, ...)`` in the NT convention (TP2 Eqs. 6, 8, 9):
    Sigma^1 = sw^2 x.x'/d + sb^2, Sigma^{l+1} = sw^2 E phi phi + sb^2, Theta^1 = Sigma^1,
    Theta^{l+1} = Sigma^{l+1} + sw^2 Theta^l E phi' phi'; the readout is layer depth + 1.
    With ``terms``, also the weight term of each layer l = 1..depth+1 (sw^2 C^{l-1} times the
    backward product), so that Theta = sum(weight terms) + bias terms."""
    sb2 = (sb or 0.0) ** 2
    sigma = sw ** 2 * X @ X.T / X.shape[1] + sb2
    weight_terms = [sw ** 2 * X @ X.T / X.shape[1]]
    theta = sigma.copy()
    for layer in range(depth):
        q = np.diag(sigma)
        e_phi, e_dphi = expectations(q[:, None], q[None, :], sigma)
        sigma = sw ** 2 * e_phi + (sb2 if readout_bias or layer < depth - 1 else 0.0)
        theta = sigma + sw ** 2 * theta * e_dphi
        weight_terms = [t * sw ** 2 * e_dphi for t in weight_terms] + [sw ** 2 * e_phi]
    return (sigma, theta, weight_terms) if terms else (sigma, theta)


def test_oracle_reproduces_closed_forms():
    # TP2 App. E.1: 3/4 |x|^2/m + 7/4 = 3.0 at x = (1, 2, 0)
    _, theta = nt_kernels(np.array([[1.0, 2.0, 0.0]]), 2, relu_expectations, 1.0, 1.0, readout_bias=False)
    assert theta[0, 0] == pytest.approx(3.0, rel=1e-12)
    # He-initialised ReLU MLP: no biases, sw^2 = 2, L = 2, NT convention: [10, 1.1560405, 7]
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    _, theta = nt_kernels(X, 2, relu_expectations, np.sqrt(2), None)
    np.testing.assert_allclose([theta[0, 0], theta[0, 1], theta[1, 1]], [10, 1.1560405, 7], rtol=1e-7)
    # TP2 Fact E.3 (Williams): V_erf(1,1,1) = 2/pi arcsin(2/3), V_erf'(1,1,0) = 4/(3 pi)
    e, d = erf_expectations(1.0, 1.0, 1.0)
    assert e == pytest.approx(0.4645591, abs=1e-7)
    assert erf_expectations(1.0, 1.0, 0.0)[1] == pytest.approx(0.4244132, abs=1e-7)


ACTIVATIONS = {"relu": (RELU, relu_expectations, 1.4, 0.3), "erf": (ERF, erf_expectations, 1.6, 0.2)}


@pytest.mark.slow  # finite-width Monte Carlo up to width 4096 (~7 s unloaded)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_deviation_falls_like_inverse_sqrt_width(name):
    act, expectations, sw, sb = ACTIVATIONS[name]
    X = np.random.default_rng(42).standard_normal((32, 5))
    _, reference = nt_kernels(X, 3, expectations, sw, sb)
    record = convergence(mlp(3, act, sw, sb), X, 2 ** np.arange(6, 13), seeds=12,
                         reference=reference, label=name)
    assert -0.6 < record.slope < -0.4, record.table()
    # the bootstrap interval of the slope is tight enough for the bound to mean something
    assert record.slope_stderr < 0.05, record.table()
    # and the deviation really is small at width 4096 (not merely decaying)
    assert record.mean[-1] < 0.1, record.table()


@pytest.mark.slow  # finite-width Monte Carlo up to width 4096 (~7 s unloaded)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_monte_carlo_mean_matches_infinite_width_ntk(name):
    act, expectations, sw, sb = ACTIVATIONS[name]
    X = np.random.default_rng(7).standard_normal((4, 5))
    nngp, ntk = nt_kernels(X, 3, expectations, sw, sb)
    program = mlp(3, act, sw, sb)
    mc = monte_carlo(program, X, width=4096, n_samples=16, seed=100)
    z = (mc.ntk_mean - ntk) / mc.ntk_sem
    assert np.max(np.abs(z)) < 3, z
    assert mc.ntk_sem.max() < 0.02 * np.abs(ntk).max()  # the test has power at the 2% level
    # NNGP: E f f'^T over many cheap narrow networks (finite-width bias O(1/n) << the error bars)
    mc = monte_carlo(program, X, width=256, n_samples=400, seed=0)
    assert mc.readout_zero_mean
    z = (mc.nngp_mean - nngp) / mc.nngp_sem
    assert np.max(np.abs(z)) < 3.5, z
    assert mc.nngp_sem.max() < 0.1 * np.abs(nngp).max()


def tp2_e1_program():
    """TP2 App. E.1: ReLU, 2 hidden layers, biases in both, no readout bias, unit variances."""
    xi = Input("xi", 3)
    x1 = nonlin(RELU, Weight("W1", WIDTH, 3) @ xi + Bias("b1"))
    x2 = nonlin(RELU, Weight("W2") @ x1 + Bias("b2"))
    return Program(Readout(Weight("v", 1, WIDTH), x2), name="tp2_e1")


@pytest.mark.slow  # finite-width Monte Carlo at width 4096 (~2 s unloaded)
def test_tp2_e1_relu_two_hidden_layers():
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    q = (X ** 2).sum(1) / 3
    _, theta = nt_kernels(X, 2, relu_expectations, 1.0, 1.0, readout_bias=False)
    np.testing.assert_allclose(np.diag(theta), 0.75 * q + 1.75, rtol=1e-12)
    mc = monte_carlo(tp2_e1_program(), X, width=4096, n_samples=12, seed=0)
    assert abs(mc.ntk_mean[0, 0] - 3.0) < 3 * mc.ntk_sem[0, 0], (mc.ntk_mean, mc.ntk_sem)
    assert np.max(np.abs(mc.ntk_mean - theta) / mc.ntk_sem) < 3
    assert mc.ntk_sem[0, 0] < 0.02 * 3.0


def test_he_relu_parametrization_conventions():
    """He-initialised ReLU MLP: no biases, sigma^2 = 2 everywhere, L = 2 hidden layers.
    NT: Theta(x, x) = 2 (L+1) q.  Every weight term is 1/sigma^2 times its NT term in the TP
    convention and fan_in/sigma^2 times it in the standard one (TP2 §4; NT), so TP gives (L+1) q
    and standard gives ~ n L q (the d-dimensional input layer's share does not grow with n)."""
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    _, theta_nt, w = nt_kernels(X, 2, relu_expectations, np.sqrt(2), None, terms=True)
    np.testing.assert_allclose(sum(w), theta_nt, rtol=1e-12)
    width, d = 1024, 3
    expected = {"ntk": theta_nt, "tp": theta_nt / 2, "standard": (d * w[0] + width * sum(w[1:])) / 2}
    q = (X ** 2).sum(1) / 3
    np.testing.assert_allclose(np.diag(expected["tp"]), 3 * q, rtol=1e-12)
    for parametrization, target in expected.items():
        mc = monte_carlo(mlp(2, RELU, np.sqrt(2), None), X, width=width, n_samples=10, seed=0,
                         parametrization=parametrization)
        z = (mc.ntk_mean - target) / mc.ntk_sem
        assert np.max(np.abs(z)) < 3, (parametrization, mc.ntk_mean, target)
        assert mc.ntk_sem.max() < 0.05 * np.abs(target).max()


def test_parametrizations_rescale_each_term_exactly():
    """Conventions: the forward law is shared, so on one sample each term changes by its factor."""
    net = sample(mlp(2, ERF, 1.5, 0.5), 9, seed=1, input_dim=3)
    X = np.random.default_rng(0).standard_normal((4, 3))
    c = {p: net.ntk(X, parametrization=p).contributions for p in ("ntk", "tp", "standard")}
    for label in c["ntk"]:
        fan_in = net.parameters[label].shape[1] if net.parameters[label].ndim == 2 else 1
        var = 2.25 if label.startswith(("W", "v")) else 0.25
        np.testing.assert_allclose(c["ntk"][label], var * c["tp"][label], rtol=1e-12)
        np.testing.assert_allclose(c["standard"][label] * (1 if label.startswith("b") else 1 / fan_in),
                                   c["tp"][label], rtol=1e-12)
    # a per-parameter override only touches that parameter
    mixed = net.ntk(X, parametrization={"W[2]": "standard"}).contributions
    np.testing.assert_allclose(mixed["W[2]"], c["standard"]["W[2]"], rtol=1e-12)
    np.testing.assert_allclose(mixed["W1"], c["ntk"]["W1"], rtol=1e-12)


# ----------------------------------------------------------------------------- convergence record, plot
def small_record():
    X = np.random.default_rng(0).standard_normal((3, 2))
    _, reference = nt_kernels(X, 1, erf_expectations, 1.0, None)
    return convergence(mlp(1, ERF, 1.0, None), X, [8, 16, 32], seeds=[1, 2, 3], reference=reference)


def test_convergence_record_contents():
    r = small_record()
    assert isinstance(r, ConvergenceRecord)
    assert r.deviations.shape == (3, 3) and np.all(r.deviations > 0)
    np.testing.assert_allclose(r.mean, r.deviations.mean(1))
    from scipy.stats import t
    half = t.ppf(0.975, 2) * r.deviations.std(1, ddof=1) / np.sqrt(3)  # Student t, 3 seeds
    np.testing.assert_allclose(r.ci_high - r.mean, half)
    np.testing.assert_allclose(r.mean - r.ci_low, half)
    np.testing.assert_allclose(r.slope, np.polyfit(np.log([8, 16, 32]), np.log(r.mean), 1)[0])
    assert r.slope_stderr > 0 and r.slope_ci[0] < r.slope_ci[1]
    assert "slope" in r.table() and "32" in r.table()
    with pytest.raises(ValueError, match="reference"):
        convergence(mlp(1, ERF, 1.0, None), np.ones((3, 2)), [8, 16], 2, np.eye(2))


def test_plot_convergence(tmp_path, monkeypatch):
    r = small_record()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        plot_convergence([r], tmp_path / "dev.png")
        assert (tmp_path / "dev.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # simulate a missing matplotlib
    with pytest.raises(ImportError, match="needs matplotlib"):
        plot_convergence(r, tmp_path / "none.png")
