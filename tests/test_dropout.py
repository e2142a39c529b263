"""Dropout in Neural Tangents' conventions.

``stax.Dropout(keep, mode="train")``: two different examples see independent masks, so their
kernels are unchanged; an example with itself sees one mask, so the diagonal of the NNGP and the
NTK (and the variances later layers read) are divided by ``keep``.  ``mode="test"`` is the
identity.  The reference is written from those rules and NT's Dense/Relu/Erf formulas.
"""
from __future__ import annotations

import numpy as np
import pytest

import symntk
from symntk import (WIDTH as n, Bias, Input, OutputBias, Program, ProgramError, Readout, Weight,
                    derive, dropout, nonlin)

D, S1, B1, S2, B2, SV, BV = 3, 2.0, 0.1, 1.5, 0.2, 1.3, 0.05
RATE1, RATE2 = 0.25, 0.5
XS = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5], [-0.4, -0.9, 0.3]])


def _program(mode="train"):
    """Dense -> Relu -> Dropout -> Dense -> Erf -> Dropout -> Dense(1)."""
    xi = Input("xi", D)
    h = (Weight("W1", n, D, variance=S1) @ xi + Bias("b1", n, B1)).named("h")
    y = dropout(nonlin("relu", h, name="x"), RATE1, mode)
    g = (Weight("W2", n, n, variance=S2) @ y + Bias("b2", n, B2)).named("g")
    z = dropout(nonlin("erf", g, name="e"), RATE2, mode)
    return Program(Readout(Weight("v", 1, n, variance=SV), z, OutputBias("b_out", BV)))


def _relu(q1, k, q2):
    t = np.arccos(np.clip(k / np.sqrt(q1 * q2), -1, 1))
    return (np.sqrt(q1 * q2) * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi),
            (np.pi - t) / (2 * np.pi))


def _erf(q1, k, q2):
    a = (1 + 2 * q1) * (1 + 2 * q2)
    return 2 / np.pi * np.arcsin(np.clip(2 * k / np.sqrt(a), -1, 1)), \
        4 / np.pi / np.sqrt(np.maximum(a - 4 * k**2, 1e-300))


def nt_reference(X, train=True):
    """Kernels of all pairs of the rows of X (X2 = None: the diagonal is 'the same example')."""
    N = len(X)
    eye = np.eye(N, dtype=bool)
    K = S1 * X @ X.T / D + B1
    T = K.copy()

    def act(K, T, fn):
        q = np.diag(K)
        V, dV = fn(q[:, None], K, q[None, :])
        return V, T * dV

    def drop(K, T, rate):
        if not train:
            return K, T
        return np.where(eye, K / (1 - rate), K), np.where(eye, T / (1 - rate), T)

    K, T = drop(*act(K, T, _relu), RATE1)
    K = S2 * K + B2
    T = K + S2 * T
    K, T = drop(*act(K, T, _erf), RATE2)
    K = SV * K + BV
    return K, K + SV * T


@pytest.mark.parametrize("mode", ["train", "test"])
def test_dropout_equals_neural_tangents(mode, kernel_cache):
    nngp, ntk = nt_reference(XS, train=mode == "train")
    d = derive(_program(mode))
    for got in (d.gram(XS), d.compile()(XS)):
        np.testing.assert_allclose(got.nngp, nngp, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(got.ntk, ntk, rtol=1e-12, atol=1e-13)


def test_two_batches_are_different_examples():
    """k(X1, X2) with X2 a copy of X1: different examples (independent masks), so the entries
    equal the off-diagonal formula, not the train-mode diagonal."""
    d = derive(_program())
    same = d.gram(XS)
    other = d.gram(XS, XS.copy())
    off = ~np.eye(len(XS), dtype=bool)
    np.testing.assert_allclose(other.ntk[off], same.ntk[off], rtol=1e-12)
    assert np.all(np.diag(other.ntk) < np.diag(same.ntk))


def test_dropout_finite_width_agrees():
    """Masks drawn per example at finite width (one mask per example within a batch)."""
    mc = symntk.monte_carlo(_program(), XS, width=1024, n_samples=8)
    nngp, ntk = nt_reference(XS)
    assert np.all(np.abs(mc.ntk_mean - ntk) <= 4 * mc.ntk_sem + 0.03 * np.abs(ntk).max())


@pytest.mark.parametrize("rate", [1, 1.0, -0.1, 2, float("nan")])
def test_bad_rate(rate):
    x = nonlin("relu", Weight("W", n, D) @ Input("xi", D))
    with pytest.raises(ProgramError, match=r"dropout rate must be in \[0, 1\)|must be a number"):
        dropout(x, rate)


def test_bad_dropout_programs():
    x = nonlin("relu", Weight("W", n, D) @ Input("xi", D))
    with pytest.raises(ProgramError, match="unknown dropout mode"):
        dropout(x, 0.1, "eval")
    with pytest.raises(ProgramError, match="only a matmul or a readout"):
        Program(Readout(Weight("v", 1, n), nonlin("tanh", dropout(x, 0.1))))
    assert dropout(x, 0.3, "test") is x
