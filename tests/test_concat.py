"""Concatenation of branches of different widths (Neural Tangents' ``FanInConcat``).

NT's convention on the channel axis: the kernel of a concatenation is the width-weighted average
of the branch kernels (NNGP and NTK), and a ``Dense`` after it sees that average.  The reference
below is written from NT's layer formulas (Dense, Relu, Erf, FanInConcat), not from symntk.
"""
from __future__ import annotations

import numpy as np
import pytest

import symntk
from symntk import (WIDTH as n, Bias, Input, OutputBias, Program, ProgramError, Readout, Weight,
                    concat, derive, nonlin)

D, S1, B1, S2, B2, SV, BV = 3, 2.0, 0.1, 1.5, 0.2, 1.3, 0.05
XS = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5], [-0.4, -0.9, 0.3], [0.2, 0.1, -2.0]])


def _program(width_e=2):
    """xi -> Dense(n) -> FanOut -> (relu | Dense(width_e n) -> erf) -> FanInConcat -> Dense(1)."""
    xi = Input("xi", D)
    h = (Weight("W1", n, D, variance=S1) @ xi + Bias("b1", n, B1)).named("h")
    r = nonlin("relu", h, name="r")
    g = (Weight("W2", width_e * n, n, variance=S2) @ h + Bias("b2", width_e * n, B2)).named("g")
    e = nonlin("erf", g, name="e")
    return Program(Readout(Weight("v", 1, (1 + width_e) * n, variance=SV), concat(r, e),
                           OutputBias("b_out", BV)))


def _relu(k11, k12, k22):
    """Relu: V = sqrt(q q') (sin t + (pi - t) cos t) / (2 pi), Vdot = (pi - t) / (2 pi)."""
    t = np.arccos(np.clip(k12 / np.sqrt(k11 * k22), -1, 1))
    return (np.sqrt(k11 * k22) * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi),
            (np.pi - t) / (2 * np.pi))


def _erf(k11, k12, k22):
    """Erf: V = (2/pi) asin(2 k12 / sqrt((1 + 2 k11)(1 + 2 k22))),
    Vdot = (4/pi) / sqrt((1 + 2 k11)(1 + 2 k22) - 4 k12^2)."""
    a = (1 + 2 * k11) * (1 + 2 * k22)
    return 2 / np.pi * np.arcsin(2 * k12 / np.sqrt(a)), 4 / np.pi / np.sqrt(a - 4 * k12**2)


def nt_reference(X, width_e=2):
    d11 = np.sum(X * X, 1) / D
    k0 = X @ X.T / D
    kh = [S1 * k0 + B1, S1 * d11 + B1]                     # off-diagonal pair, diagonal
    th = kh[0]
    kr, dr = _relu(kh[1][:, None], kh[0], kh[1][None, :])
    kg = [S2 * kh[0] + B2, S2 * kh[1] + B2]
    tg = kg[0] + S2 * th
    ke, de = _erf(kg[1][:, None], kg[0], kg[1][None, :])
    w_r, w_e = 1 / (1 + width_e), width_e / (1 + width_e)  # FanInConcat: by channel counts
    kc, tc = w_r * kr + w_e * ke, w_r * th * dr + w_e * tg * de
    k = SV * kc + BV
    return k, k + SV * tc


@pytest.fixture(scope="module")
def program():
    return _program()


def test_concat_equals_neural_tangents(program, kernel_cache):
    nngp, ntk = nt_reference(XS)
    d = derive(program)
    for got in (d.gram(XS), d.compile()(XS)):
        np.testing.assert_allclose(got.nngp, nngp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got.ntk, ntk, rtol=1e-10, atol=1e-12)


def test_branch_widths_set_the_weights():
    """Widths n | 3n weigh the branches 1/4, 3/4: a different kernel from n | 2n, each NT's."""
    for width_e in (1, 3):
        nngp, ntk = nt_reference(XS, width_e)
        got = derive(_program(width_e)).gram(XS)
        np.testing.assert_allclose(got.ntk, ntk, rtol=1e-10)
        np.testing.assert_allclose(got.nngp, nngp, rtol=1e-10)


def test_concat_finite_width_agrees(program):
    mc = symntk.monte_carlo(program, XS, width=512, n_samples=6)
    nngp, ntk = nt_reference(XS)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 4 * mc.ntk_sem + 0.02 * np.abs(ntk).max())
    assert np.all(np.abs(mc.nngp_mean - nngp) <= 4 * mc.nngp_sem + 0.02 * np.abs(nngp).max())


def test_matmul_over_concat_and_hidden_layers_of_other_widths():
    """A hidden Dense over the concatenation, then layers of width 2n and n: NT's kernels do not
    depend on the widths, so the program equals the same one at equal widths."""
    def build(w):
        xi = Input("xi", D)
        h = (Weight("W1", n, D, variance=S1) @ xi).named("h")
        c = concat(nonlin("relu", h, name="r"), nonlin("erf", h, name="e"))
        g = nonlin("tanh", (Weight("W2", w * n, 2 * n, variance=S2) @ c).named("g"), name="t")
        return Program(Readout(Weight("v", 1, w * n, variance=SV), g))
    a, b = derive(build(1)).gram(XS), derive(build(3)).gram(XS)
    np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)
    mc = symntk.monte_carlo(build(3), XS, width=256, n_samples=6)
    assert np.all(np.abs(mc.ntk_mean - b.ntk) <= 4 * mc.ntk_sem + 0.03 * np.abs(b.ntk).max())


def test_concat_bad_programs():
    xi = Input("xi", D)
    h = (Weight("W1", n, D) @ xi).named("h")
    c = concat(nonlin("relu", h), nonlin("erf", h))
    with pytest.raises(ProgramError, match="only a matmul or a readout"):
        Program(Readout(Weight("v", 1, 2 * n), nonlin("tanh", c)))
    with pytest.raises(ProgramError, match="at least two"):
        concat(h)
    with pytest.raises(ProgramError, match="transposed"):
        Weight("W", 2 * n, n).T @ c
    seq = Weight("U", n, D) @ Input("s", D, positions="t")
    with pytest.raises(ProgramError, match="positions"):
        concat(seq, seq)
    with pytest.raises(NotImplementedError, match="exact mode"):
        derive(Program(Readout(Weight("v", 1, n), Weight("W", n, 2 * n) @ c)), mode="exact")
