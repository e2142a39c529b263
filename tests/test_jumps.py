"""Discontinuous nonlinearities: one convention, the derivative almost everywhere.

Neural Tangents' ``stax.Sign`` has the arcsine NNGP V(K) = (2/pi) arcsin(rho) and a zero
derivative (its NTK is the NNGP of the last layer), which is also what autodiff computes on a
finite network.  The references below are written from those formulas, not from symntk.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import sympy as sp

import symntk
from symntk import JumpWarning, derive, mlp
from symntk.activations import X

SW, SB, D = 1.3, 0.4, 3
XS = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5], [-0.4, -0.9, 0.3], [0.2, 0.1, -2.0]])


def _arcsin_dual(k11, k12, k22):
    return 2 / np.pi * np.arcsin(np.clip(k12 / np.sqrt(k11 * k22), -1, 1))


def _step_dual(k11, k12, k22):
    """E H(u) H(v) = (pi - arccos rho) / (2 pi) (arc-cosine kernel of degree 0, Cho & Saul 2009)."""
    return (np.pi - np.arccos(np.clip(k12 / np.sqrt(k11 * k22), -1, 1))) / (2 * np.pi)


def nt_reference(X1, X2, depth, dual, sw=SW, sb=SB):
    """stax.serial(Dense(sw, sb), act, ..., Dense(1, sw, sb)) with act' = 0 almost everywhere:
    K^{l+1} = sw^2 V(K^l) + sb^2 and Theta^{l+1} = K^{l+1} + sw^2 * 0 * Theta^l = K^{l+1}."""
    d = X1.shape[1]
    k12 = sw**2 * X1 @ X2.T / d + sb**2
    k11 = sw**2 * np.sum(X1 * X1, 1) / d + sb**2
    k22 = sw**2 * np.sum(X2 * X2, 1) / d + sb**2
    for _ in range(depth):
        k12 = sw**2 * dual(k11[:, None], k12, k22[None, :]) + sb**2
        k11 = sw**2 * dual(k11, k11, k11) + sb**2
        k22 = sw**2 * dual(k22, k22, k22) + sb**2
    return k12, k12  # nngp, ntk


def _derive(program):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JumpWarning)
        return derive(program)


@pytest.fixture(scope="module")
def sign2():
    return mlp(2, "sign(x)", weight_std=SW, bias_std=SB, input_dim=D)


@pytest.fixture(scope="module")
def step3():
    return mlp(3, "step", weight_std=SW, bias_std=SB, input_dim=D)


@pytest.mark.parametrize("which, depth, dual", [("sign2", 2, _arcsin_dual), ("step3", 3, _step_dual)])
def test_sign_and_step_equal_neural_tangents(which, depth, dual, request, kernel_cache):
    program = request.getfixturevalue(which)
    d = _derive(program)
    nngp, ntk = nt_reference(XS, XS, depth, dual)
    compiled = d.compile()(XS)
    reference = d.gram(XS)
    for got in (compiled, reference):
        np.testing.assert_allclose(got.nngp, nngp, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(got.ntk, ntk, rtol=1e-12, atol=1e-13)


def test_sign_network_empirical_ntk_agrees(sign2):
    """The finite network's autodiff-style NTK (derivative 0 almost everywhere) converges to the
    derived kernel: within 4 standard errors plus a 1/width bias allowance."""
    mc = symntk.monte_carlo(sign2, XS, width=1024, n_samples=6)
    _, ntk = nt_reference(XS, XS, 2, _arcsin_dual)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 4 * mc.ntk_sem + 2e-2)


def test_sign_network_empirical_ntk_is_readout_only(sign2):
    """With phi' = 0 almost everywhere only the readout and its bias have nonzero gradients in
    the finite network: every hidden parameter's NTK contribution is exactly 0."""
    e = symntk.empirical_ntk(sign2, XS, width=256, seed=3)
    readout = {sign2.output.weight.label(), sign2.output.bias.name}
    hidden = {k: v for k, v in e.contributions.items() if k not in readout}
    assert len(hidden) == 4 and all(np.all(v == 0) for v in hidden.values())
    assert np.all(np.diag(e.contributions[sign2.output.weight.label()]) > 0)


def test_jumps_recorded_warned_and_printed(sign2):
    with pytest.warns(JumpWarning, match=r"'x1' \(sign\(x\)\) at Eq\(x, 0\)"):
        d = derive(sign2)
    assert [(label, expr) for label, expr, _ in d.jumps] == [("x1", sp.sign(X)), ("x", sp.sign(X))]
    lines = [line for line in d.latex().splitlines() if "jumps" in line]
    assert len(lines) == 1 and r"x = 0" in lines[0] and "almost everywhere" in lines[0]
    with pytest.raises(ValueError, match="jumps"):
        derive(sign2, jumps="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert derive(mlp(2, "relu"), jumps="error").jumps == ()
        assert derive(sign2, jumps="ignore").jumps == d.jumps


def test_piecewise_jump_uses_derivative_almost_everywhere():
    """A Piecewise with a jump (x + 1 for x >= 0, x else) is the identity's derivative 1 almost
    everywhere: its NTK has sw^2 * 1 * Theta^1 from the first layer, like a linear network."""
    phi = sp.Piecewise((X + 1, X >= 0), (X, True))
    d = _derive(mlp(1, phi, weight_std=SW, bias_std=SB, input_dim=D))
    assert d.jumps and d.jumps[0][2] == (sp.Eq(X, 0),)
    r = d.gram(XS)
    k1 = SW**2 * XS @ XS.T / D + SB**2
    nngp = r.nngp
    np.testing.assert_allclose(r.ntk, nngp + SW**2 * k1, rtol=1e-12)
