"""Reduce before integrating: Stein's lemma integrates out Gaussians that enter polynomially, so
every expectation the derivation emits has at most two nonlinear Gaussian arguments.

The network: a readout vector reused as a hidden bias, f = v . tanh(W U xi / sqrt(n) + v) / sqrt(n),
every parameter trained (``symntk.examples.bias_reuse``).  Its raw NTK equations hold
E[(Z^v)^2 tanh'(h) tanh'(h')] over three correlated Gaussians.  Oracle: those *raw* expectations
computed by a different route, Gaussian conditioning (E[u1^k | u2, u3] is a polynomial in u2, u3),
written here, then adaptive, kink-splitting Gauss-Legendre quadrature of mpmath
(``numeric_expectation``, ~1e-15) in the remaining two dimensions.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import sympy as sp

import symntk
from symntk import examples
from symntk.gaussian import GaussianExpectation, numeric_expectation, reduce_node

X = np.array([[0.7, -1.2], [0.3, 0.5], [-1.5, 0.4]])


@functools.lru_cache(maxsize=None)
def _bias_reuse(mode):
    d = symntk.derive(examples.bias_reuse(), mode=mode)
    return d, d.compile()


@pytest.fixture(scope="session")
def bias_reuse(kernel_cache):
    return _bias_reuse


def conditioned(node: GaussianExpectation) -> GaussianExpectation:
    """E[p(u_j) F(u_R)] = E[E[p(u_j) | u_R] F(u_R)] for a u_j outside every head: u_j | u_R is
    N(m, s^2) with m = S_jR S_RR^-1 u_R, s^2 = S_jj - S_jR S_RR^-1 S_Rj; E z^k = (k-1)!! (k even)."""
    f, V, S = node.integrand, list(node.variables), sp.Matrix(node.cov)
    in_heads = set().union(*(a.free_symbols for a in f.atoms(sp.Function)))
    j = next(i for i, u in enumerate(V) if u not in in_heads)
    R = [i for i in range(len(V)) if i != j]
    coef = S.extract([j], R) * S.extract(R, R).inv()
    m = sum(coef[k] * V[R[k]] for k in range(len(R)))
    s2 = S[j, j] - (coef * S.extract(R, [j]))[0, 0]
    z = sp.Symbol("z", real=True)
    g = sp.expand(f.xreplace({V[j]: m + sp.sqrt(s2) * z}))
    g = sum(c * (sp.factorial2(k - 1) if k % 2 == 0 else 0) for (k,), c in sp.Poly(g, z).terms())
    return GaussianExpectation(g, [V[i] for i in R], S.extract(R, R))


def oracle(d, x1, x2):
    """NTK of one pair from the derivation's raw equations (no table), by conditioning."""
    xs = (x1, x2)
    vals = {s: sp.Float(float(np.dot(xs[i.copies[0]], xs[i.copies[1]]) / len(x1)), 30)
            for s, i in d.inputs.items()}
    for eq in d.equations:
        rhs = eq.rhs.xreplace(vals)
        sub = {}
        for n in rhs.atoms(GaussianExpectation):
            n2 = conditioned(n) if len(n.variables) > 2 else n
            sub[n] = sp.Float(numeric_expectation(n2), 20)
        vals[eq.lhs] = sp.N(rhs.xreplace(sub), 20)
    return float(sp.N(d.ntk.xreplace(vals), 20))


@pytest.mark.parametrize("mode", ["gia", "exact"])
def test_every_expectation_has_at_most_two_gaussians(mode):
    """The raw equations have three-Gaussian expectations; the reduced ones (what is printed,
    evaluated and compiled) none, and the LaTeX shows it."""
    d = symntk.derive(examples.bias_reuse(), mode=mode)
    raw = [n for e in d.equations for n in e.rhs.atoms(GaussianExpectation)]
    assert max(len(n.variables) for n in raw) == 3
    for e in d.reduced().equations + d.diagonal.reduced().equations:
        assert all(len(n.variables) <= 2 for n in e.rhs.atoms(GaussianExpectation)), e
    tex = d.latex()
    assert r"\left(u_{2}, u_{3}\right)" in tex and r"u_{1}, u_{2}, u_{3}" not in tex


@pytest.mark.parametrize("mode", ["gia", "exact"])
def test_bias_reuse_ntk_matches_the_conditioned_quadrature(mode, bias_reuse):
    """The compiled NTK (quadrature of the Stein-reduced 1-D and 2-D expectations) equals the raw
    three-Gaussian expectations computed by conditioning, to 1e-9 relative (was 2e-4)."""
    d, k = bias_reuse(mode)
    K = k(X).ntk
    ref = np.array([[oracle(d, X[i], X[j]) if i != j else oracle(d.diagonal, X[i], X[i])
                     for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(K[:2, :2], ref, rtol=1e-9)
    np.testing.assert_allclose(k(X[:2], X[2:]).ntk[:, 0], [oracle(d, x, X[2]) for x in X[:2]],
                               rtol=1e-9)


@pytest.mark.parametrize("power", [1, 2, 3])
def test_stein_elimination_for_a_generic_covariance(power):
    """E[u1^k tanh(u2) sigmoid-like(u3)] over a generic 3 x 3 covariance: Stein's reduction (no u1
    left, at most two Gaussians per expectation) equals the conditioned quadrature."""
    u1, u2, u3 = sp.symbols("u1 u2 u3", real=True)
    cov = sp.Matrix([[1.3, 0.4, -0.7], [0.4, 2.0, 0.9], [-0.7, 0.9, 1.1]])
    node = GaussianExpectation(u1 ** power * sp.tanh(u2) * sp.erf(u3 / 2) ** 2, (u1, u2, u3), cov)
    reduced = reduce_node(node)
    assert not reduced.has(u1)
    assert all(len(n.variables) <= 2 for n in reduced.atoms(GaussianExpectation))
    value = reduced.xreplace({n: sp.Float(numeric_expectation(n), 20)
                              for n in reduced.atoms(GaussianExpectation)})
    want = numeric_expectation(conditioned(node))
    assert abs(float(value) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
