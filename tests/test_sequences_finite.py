"""Finite-width referee for programs over positions (sequence inputs, Scan, Pool).

Oracles, each independent of the code under test:
* the brute-force Jacobian contraction J1 J2^T (``method="jacobian"``) for the structured NTK;
* central finite differences of the outputs in every parameter entry, for backpropagation
  through time (independent of the factored tape);
* a hand-written NumPy forward pass of the Elman RNN;
* ``reference_rnn``: the simple-RNN NNGP/NTK written from the paper's formulas (no symntk code),
  reached by Monte Carlo over seeds, with a deviation falling like width^-1/2.
"""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from scipy.special import erf

from reference_rnn import rnn_nngp_ntk
from symntk import gru, lstm, rnn, stacked_rnn
from symntk.finite import empirical_ntk, monte_carlo, sample
from symntk.program import (WIDTH, Bias, Carry, Input, OutputBias, Pool, Program, ProgramError,
                            Readout, Scan, Weight, nonlin, scan)

D = 3


def vector_init_program(readout="last"):
    """tanh RNN whose initial state is a trained position-free bias s0 (not the zero vector)."""
    xi = Input("xi", D, positions="t")
    W, U = Weight("W", variance=sp.Rational(3, 2)), Weight("U", fan_in=D, variance=2)
    b = Bias("b", variance=sp.Rational(1, 4))
    s = scan(lambda prev: nonlin("tanh", W @ prev + U @ xi + b), "t",
             init=Bias("s0", variance=sp.Rational(1, 2)))
    return Program(Readout(Weight("v", 1, WIDTH), Pool(s, readout)), name="vector_init")


def positioned_extras_program():
    """Position-wise nodes outside any Scan (Embedding -> Nonlin -> MatMul), a bias broadcast over
    t outside the recurrence, a Scan over them, and a Nonlin mixing a pooled (position-free)
    vector back into a positioned one before a second pooling."""
    xi = Input("xi", D, positions="t")
    e = nonlin("relu", Weight("E", fan_in=D) @ xi + Bias("c", variance=sp.Rational(1, 3)))
    m = Weight("M") @ e
    s = scan(lambda prev: nonlin("erf", Weight("W") @ prev + m), "t", name="s")
    mixed = nonlin("tanh", s + Pool(s, "mean"))
    return Program(Readout(Weight("v", 1, WIDTH), Pool(mixed, "last"),
                           OutputBias("b_out", sp.Rational(1, 5))), name="extras")


CASES = {
    "rnn_erf_last": rnn("erf", 1.2, 1.4, None, "last"),
    "rnn_erf_mean_bias": rnn("erf", 1.2, 1.4, 0.5, "mean"),
    "rnn_relu_last_bias": rnn("relu", 1.1, 1.3, 0.4, "last"),
    "rnn_relu_mean": rnn("relu", 1.1, 1.3, None, "mean"),
    "stacked_rnn": stacked_rnn(3, "tanh", 1.1, 1.2, 0.3, "mean"),
    "gru": gru(1.0, 1.1, 0.4, "last"),
    "lstm": lstm(1.0, 1.1, 0.4, "mean"),
    "vector_init": vector_init_program(),
    "extras": positioned_extras_program(),
}


def sequences(n, T, seed):
    return np.random.default_rng(seed).uniform(-1, 1, (n, T, D))


def rel_err(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("parametrization", ["ntk", "tp"])
def test_structured_ntk_equals_jacobian_oracle(name, parametrization):
    X1, X2 = sequences(4, 5, 1), sequences(3, 2, 2)  # different lengths on the two sides
    net = sample(CASES[name], 7, seed=3, parametrization=parametrization, input_dim=D)
    for second in (None, X2):
        fast, slow = net.ntk(X1, second), net.ntk(X1, second, method="jacobian")
        assert rel_err(fast.ntk, slow.ntk) < 1e-12
        for label, c in slow.contributions.items():
            assert np.max(np.abs(fast.contributions[label] - c)) <= 1e-12 * np.max(np.abs(slow.ntk))
    sym = net.ntk(X1).ntk
    np.testing.assert_allclose(sym, sym.T, rtol=0, atol=1e-13 * np.abs(sym).max())
    assert np.linalg.eigvalsh(sym).min() > -1e-10 * np.abs(sym).max()


def test_cross_length_block_is_the_joint_gram():
    """Theta(X1, X2) with T1 != T2 is the off-diagonal block of one joint Gram: the network is the
    same, only the data differ (the joint Gram is assembled from equal-length batches)."""
    net = sample(CASES["lstm"], 6, seed=5, input_dim=D)
    X1, X2 = sequences(3, 4, 7), sequences(2, 6, 8)
    cross = net.ntk(X1, X2).ntk
    j1, j2 = net.gradients(X1), net.gradients(X2)
    oracle = sum(net.factor(k) * j1[k].reshape(3, -1) @ j2[k].reshape(2, -1).T for k in j1)
    assert rel_err(cross, oracle) < 1e-12
    np.testing.assert_allclose(net.ntk(X2, X1).ntk, cross.T, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["rnn_erf_mean_bias", "rnn_relu_last_bias", "stacked_rnn", "gru",
                                  "lstm", "vector_init", "extras"])
def test_backprop_through_time_matches_finite_differences(name):
    net = sample(CASES[name], 4, seed=11, input_dim=D)
    X, eps = sequences(3, 4, 12), 1e-6
    grads = net.gradients(X)
    for label, P in net.parameters.items():
        fd = np.empty((3,) + P.shape)
        for idx in np.ndindex(P.shape):
            hi, lo = P.copy(), P.copy()
            hi[idx] += eps
            lo[idx] -= eps
            fd[(slice(None),) + idx] = (net.with_parameters({label: hi})(X)
                                        - net.with_parameters({label: lo})(X)) / (2 * eps)
        np.testing.assert_allclose(grads[label], fd, atol=1e-7, rtol=1e-5, err_msg=label)


@pytest.mark.parametrize("readout", ["last", "mean"])
def test_rnn_forward_matches_numpy_recurrence(readout):
    net = sample(rnn("erf", 1.3, 0.8, 0.5, readout), 9, seed=2, input_dim=D)
    p, X = net.parameters, sequences(5, 6, 4)
    s, states = np.zeros((5, 9)), []
    for t in range(6):
        s = erf(s @ p["W"].T + X[:, t] @ p["U"].T + p["b"])
        states.append(s)
    pooled = states[-1] if readout == "last" else np.mean(states, axis=0)
    np.testing.assert_allclose(net(X), pooled @ p["v"][0] + p["b_out"], rtol=1e-12, atol=1e-14)


def test_lstm_forward_matches_numpy_cell():
    net = sample(lstm(1.0, 1.2, 0.3, "last"), 5, seed=6, input_dim=D)
    p, X = net.parameters, sequences(3, 4, 9)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    gate = lambda k, h, x: h @ p[f"W_{k}"].T + x @ p[f"U_{k}"].T + p[f"b_{k}"]  # noqa: E731
    h = c = np.zeros((3, 5))
    for t in range(4):
        x = X[:, t]
        i, f, o, g = sig(gate("i", h, x)), sig(gate("f", h, x)), sig(gate("o", h, x)), np.tanh(gate("g", h, x))
        c = f * c + i * g
        h = o * np.tanh(c)
    np.testing.assert_allclose(net(X), h @ p["v"][0] + p["b_out"], rtol=1e-12, atol=1e-14)


def test_gru_forward_matches_numpy_cell():
    net = sample(gru(1.0, 1.2, 0.3, "mean"), 5, seed=6, input_dim=D)
    p, X = net.parameters, sequences(3, 4, 9)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    h, hs = np.zeros((3, 5)), []
    for t in range(4):
        x = X[:, t]
        z = sig(h @ p["W_z"].T + x @ p["U_z"].T + p["b_z"])
        r = sig(h @ p["W_r"].T + x @ p["U_r"].T + p["b_r"])
        cand = np.tanh((r * h) @ p["W_h"].T + x @ p["U_h"].T + p["b_h"])
        h = z * h + (1 - z) * cand
        hs.append(h)
    np.testing.assert_allclose(net(X), np.mean(hs, axis=0) @ p["v"][0] + p["b_out"],
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- bad input
def test_bad_sequence_inputs_name_the_input():
    program = rnn("erf", readout="last")
    net = sample(program, 4, input_dim=D)
    with pytest.raises(ValueError, match=r"'xi' is a sequence.*\(N, T, 3\)"):
        net(np.ones((2, D)))
    bad = sequences(2, 3, 0)
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="'xi' contains NaN"):
        net(bad)
    with pytest.raises(ValueError, match="'xi' has sequences of length T = 0"):
        net(np.ones((2, 0, D)))
    with pytest.raises(ValueError, match=r"'xi' must have shape \(N, T, 3\).*input dimension 3"):
        net(np.ones((2, 3, D + 1)))
    with pytest.raises(ValueError, match="'xi' is a sequence"):
        empirical_ntk(program, sequences(2, 3, 0), np.ones((2, D)), width=4)


def test_plain_program_refuses_sequence_data():
    from symntk import mlp
    net = sample(mlp(2, "relu"), 4, input_dim=D)
    with pytest.raises(ValueError, match="'xi'.*declared without positions.*not a sequence"):
        net(np.ones((2, 5, D)))


def test_carry_shared_by_two_scans_is_refused():
    xi = Input("xi", D, positions="t")
    s1 = scan(lambda p: nonlin("tanh", Weight("W1") @ p + Weight("U1", fan_in=D) @ xi), "t")
    s2 = scan(lambda p: nonlin("tanh", Weight("W2") @ p + Weight("U2") @ s1), "t")  # same carry name
    program = Program(Readout(Weight("v", 1, WIDTH), Pool(s2, "last")))
    with pytest.raises(ValueError, match="bound by two different Scans"):
        sample(program, 3)


# ----------------------------------------------------------------------------- builders
def _labels(program):
    return sorted(sample(program, 3, input_dim=D).parameters)


def test_builders_parameters_and_conventions():
    assert _labels(rnn()) == ["U", "W", "v"]
    assert _labels(rnn(bias_std=0.1)) == ["U", "W", "b", "b_out", "v"]
    assert _labels(rnn(bias_std=0.1, readout_bias=False)) == ["U", "W", "b", "v"]
    assert _labels(stacked_rnn(2)) == ["U1", "U2", "W1", "W2", "v"]
    assert _labels(gru(bias_std=0.2, readout_bias=False)) == sorted(
        f"{k}_{g}" for k in "WUb" for g in "zrh") + ["v"]
    assert _labels(lstm()) == sorted(f"{k}_{g}" for k in "WU" for g in "ifog") + ["v"]
    program = rnn("relu", weight_std=1.5, input_std=2, bias_std=0.5, readout="mean",
                  parametrization="tp", readout_std=3)
    params = {p.name: p for p in program.nodes if isinstance(p, (Weight, Bias, OutputBias))}
    assert params["W"].variance == sp.Rational(9, 4) and params["U"].variance == 4
    assert params["b"].variance == sp.Rational(1, 4) and params["v"].variance == 9
    assert {p.parametrization for p in params.values()} == {"tp"}
    assert isinstance(program.output.vector, Pool) and program.output.vector.how == "mean"
    assert next(n for n in program.nodes if isinstance(n, Input)).positions == "t"
    scans = [n for n in lstm().nodes if isinstance(n, Scan)]
    assert len(scans) == 1 and len(scans[0].carries) == 2
    with pytest.raises(ProgramError, match="readout must be one of"):
        rnn(readout="max")
    with pytest.raises(ProgramError, match="depth"):
        stacked_rnn(0)


def test_coupled_scan_ir():
    h, c = Carry("h", WIDTH, "t"), Carry("c", WIDTH, "t")
    xi = Input("xi", D, positions="t")
    c_new = nonlin("tanh", Weight("W") @ h) * c + Weight("U", fan_in=D) @ xi
    s = Scan(h, nonlin("tanh", c_new), None, "h", coupled=[(c, c_new, None)])
    assert s.carries == (h, c) and s.inits == (None, None) and s.func(*s.args) == s
    assert s.named("g").coupled == s.coupled
    plain = scan(lambda p: nonlin("tanh", Weight("W") @ p + Weight("U", fan_in=D) @ xi), "t")
    assert plain.coupled == () and plain.carries == (plain.carry,) and plain.func(*plain.args) == plain
    with pytest.raises(ProgramError, match="share one Carry"):
        Scan(h, nonlin("tanh", c_new), None, "h", coupled=[(h, c_new, None)])
    with pytest.raises(ProgramError, match="used outside"):
        Program(Readout(Weight("v", 1, WIDTH), Pool(c_new, "last")))


# ----------------------------------------------------------------------------- infinite width
# NTK4A's RNN notebook: erf, sigma_W^2 = 1, sigma_U^2 = 2, sigma_b^2 = 0.2, sigma_v^2 = 1,
# tp parametrization, no readout bias; tokens in [-1, 1]^3.
NTK4A = dict(var_w=1.0, var_u=2.0, var_b=0.2, var_v=1.0)


def ntk4a_rnn(readout, activation="erf"):
    return rnn(activation, 1, sp.sqrt(2), sp.sqrt(sp.Rational(1, 5)), readout, "tp", 1,
               readout_bias=False)


@pytest.mark.slow
@pytest.mark.parametrize("readout", ["mean", "last"])
def test_monte_carlo_reaches_reference_rnn_ntk(readout):
    X1, X2 = sequences(2, 5, 21), sequences(2, 3, 22)  # T1 = 5, T2 = 3
    mc = monte_carlo(ntk4a_rnn(readout), X1, X2, width=2048, n_samples=6, seed=100)
    nngp, ntk = rnn_nngp_ntk(X1, X2, "erf", readout=readout, **NTK4A)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 3 * mc.ntk_sem), (mc.ntk_mean, ntk, mc.ntk_sem)
    assert np.all(np.abs(mc.nngp_mean - nngp) <= 3 * mc.nngp_sem), (mc.nngp_mean, nngp)


@pytest.mark.slow
def test_deviation_from_reference_falls_like_inverse_sqrt_width():
    X = np.concatenate([sequences(2, 4, 31), sequences(1, 4, 32)])
    _, ntk = rnn_nngp_ntk(X, None, "relu", readout="mean", **NTK4A)
    program = ntk4a_rnn("mean", "relu")
    widths, devs = [64, 256, 1024], []
    for n in widths:
        d = [np.linalg.norm(empirical_ntk(program, X, width=n, seed=s).ntk - ntk) / np.linalg.norm(ntk)
             for s in range(6)]
        devs.append(np.mean(d))
    slope = np.polyfit(np.log(widths), np.log(devs), 1)[0]
    assert -0.75 < slope < -0.3, (devs, slope)


def test_reference_rnn_single_token_is_a_one_layer_network():
    """With T = 1 the RNN is one hidden layer on xi (W never acts on a nonzero state): with
    Sigma = var_u xi.xi'/d + var_b, NNGP = var_v E relu relu and, in tp form,
    NTK = var_v E relu' relu' (xi.xi'/d + 1) + E relu relu (the U, b and v terms)."""
    X = sequences(3, 1, 41)
    nngp, ntk = rnn_nngp_ntk(X, None, "relu", var_w=5.0, var_u=2.0, var_b=0.3, var_v=1.5)
    g = X[:, 0] @ X[:, 0].T / D
    S = 2.0 * g + 0.3
    q = np.sqrt(np.diag(S))
    cos = np.clip(S / np.outer(q, q), -1, 1)
    th = np.arccos(cos)
    C = np.outer(q, q) * (np.sin(th) + (np.pi - th) * cos) / (2 * np.pi)
    dC = (np.pi - th) / (2 * np.pi)
    # arccos near cos = 1 (the diagonal) amplifies rounding to ~sqrt(machine eps)
    np.testing.assert_allclose(nngp, 1.5 * C, rtol=1e-7)
    np.testing.assert_allclose(ntk, 1.5 * dC * (g + 1) + C, rtol=1e-7)
