"""Smooth 2-D Gaussian expectations by Mehler's formula (symntk.codegen.mehler).

Oracle: the NNGP/NTK recursion of Jacot et al. (2018) / Neural Tangents' ``serial(Dense, phi) x
depth, Dense(1)`` written here from the papers, every expectation by ``numeric_expectation``
(mpmath, 64 bits, independent of the generated code and of Mehler's formula).
"""
from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import sympy as sp

from symntk import derive, mlp
from symntk.activations import X as XVAR
from symntk.activations import activation, derivative
from symntk.codegen.mehler import separate
from symntk.gaussian import GaussianExpectation, numeric_expectation

U1, U2 = sp.symbols("u_1 u_2", real=True)
SW2, SB2 = 2.0, 0.01                  # weight_std = sqrt(2), bias_std = 0.1
XS = np.array([[1.0, 2.0, 0.0, -0.5], [0.5, -1.0, 1.5, 0.2], [-0.4, -0.9, 0.3, 1.1]])


def expect(F, s11, s12, s22):
    S = sp.Matrix([[s11, s12], [s12, s22]])
    return float(numeric_expectation(GaussianExpectation(F, (U1, U2), S), prec=64))


def reference(act, x, y, depth):
    """(nngp, ntk) at 64-bit quadrature: Sigma^1 = sw2 x.y/d + sb2, Theta^1 = Sigma^1;
    Sigma^{l+1} = sw2 E phi(u) phi(v) + sb2, Theta^{l+1} = Sigma^{l+1} + sw2 E phi'(u) phi'(v)
    Theta^l (Jacot et al. 2018, Thm 1; Arora et al. 2019, Eq. 5)."""
    f, fp = activation(act), derivative(act)
    F = f.xreplace({XVAR: U1}) * f.xreplace({XVAR: U2})
    Fp = fp.xreplace({XVAR: U1}) * fp.xreplace({XVAR: U2})
    d = len(x)
    q1, q2 = SW2 * x @ x / d + SB2, SW2 * y @ y / d + SB2
    k = SW2 * x @ y / d + SB2
    ntk = k
    for _ in range(depth):
        v, vp = expect(F, q1, k, q2), expect(Fp, q1, k, q2)
        k = SW2 * v + SB2
        ntk = k + SW2 * vp * ntk
        q1 = SW2 * expect(F, q1, q1, q1) + SB2
        q2 = SW2 * expect(F, q2, q2, q2) + SB2
    return k, ntk


@functools.lru_cache(maxsize=None)
def _kernel(act, depth=3):
    d = derive(mlp(depth, act, weight_std=sp.sqrt(2), bias_std=0.1, input_dim=XS.shape[1]))
    return d, d.compile()


def test_separate_finds_short_sums_of_products_and_refuses_kinks():
    t = sp.tanh
    assert separate(t(U1) * t(U2), U1, U2) == [(t(U1), t(U2))]
    (f, g), = separate(3 * (1 - t(U1) ** 2) * (1 - t(U2) ** 2), U1, U2)
    assert sp.simplify(f * g - 3 * (1 - t(U1) ** 2) * (1 - t(U2) ** 2)) == 0
    assert len(separate((t(U1) + U1) * (t(U2) + 1), U1, U2)) <= 4
    assert separate(sp.exp(U1 * U2), U1, U2) is None
    assert separate(sp.Max(0, U1) * t(U2), U1, U2) is None
    assert separate(sp.exp(-U1 - U2) / (1 + sp.exp(-U1)), U1, U2) is not None


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "swish"])
def test_depth3_matches_high_precision_quadrature(act, kernel_cache):
    """Every registry activation without a closed form, depth 3: the compiled kernel (Mehler's
    formula, the default) within 1e-10 of 64-bit quadrature of the same recursion."""
    d, k = _kernel(act)
    assert "_mehler(" in k.source
    r = k(XS)
    for i, j in [(0, 1), (1, 2)]:
        nngp, ntk = reference(act, XS[i], XS[j], 3)
        assert abs(r.nngp[i, j] - nngp) <= 1e-10 * abs(nngp), (act, i, j)
        assert abs(r.ntk[i, j] - ntk) <= 1e-10 * abs(ntk), (act, i, j)


def _series_only(k):
    """The kernel's module with the 2-D fallback removed (the series wherever it is called)."""
    src = k.source.replace("CACHE = True", "CACHE = False").replace("if not (_ok", "if False and (_ok")
    mod = types.ModuleType("mehler_series_only")
    exec(compile(src, "<mehler series only>", "exec"), mod.__dict__)   # noqa: S102 - generated text
    return mod


def test_series_alone_carries_the_accuracy_and_the_bound_sends_near_duplicates_to_the_rule(
        kernel_cache):
    """For these pairs the series alone (no 2-D fallback) gives the same numbers as the 2-D rule
    to 1e-12; near-duplicate inputs (correlation -> 1, where the series' bound fails) are
    computed by the rule: the cross kernel of identical rows equals the exact diagonal."""
    d, k = _kernel("tanh")
    polar = d.compile(mehler=False)
    want = polar(XS).ntk
    series = k.__class__(k.derivation, k.generated, _series_only(k), False, k.options)
    got = series(XS).ntk
    np.testing.assert_allclose(got, want, rtol=1e-12)
    Y = XS + 1e-9
    cross = k(XS, Y).ntk
    np.testing.assert_allclose(np.diag(cross), k(XS, diagonal=True).ntk, rtol=1e-7)
    np.testing.assert_allclose(cross, polar(XS, Y).ntk, rtol=1e-12)
