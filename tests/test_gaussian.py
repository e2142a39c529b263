"""Tests for symntk.gaussian: closed forms, the GaussianExpectation node and its numerics.

Oracles: exact values of the closed forms (TP2 Facts E.2, E.3), Isserlis' theorem, and an
independent high-precision quadrature (mpmath at 30 digits, Gauss-Legendre on the Cholesky-whitened
2-D Gaussian, split at the kinks u = 0 and v = 0).
"""

import functools

import mpmath
import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp

from symntk.activations import ACTIVATIONS, X, activation, derivative, jump_points
from symntk.gaussian import (
    MEAN_RULES,
    PAIR_RULES,
    GaussianExpectation,
    expect,
    numeric_expectation,
    vtransform,
)

S11, S22 = sp.symbols("Sigma11 Sigma22", positive=True)
S12 = sp.Symbol("Sigma12", real=True)
u, v, w = sp.symbols("u v w", real=True)
u1, u2, u3, u4 = sp.symbols("u1:5", real=True)
R = sp.Rational
COV = sp.Matrix([[S11, S12], [S12, S22]])
C = S12 / (sp.sqrt(S11) * sp.sqrt(S22))


def mpf_to_sympy(x):
    """An mpmath number as a 30-digit SymPy Float (``str`` would round to 15 digits)."""
    return sp.Float(x, 30)


def has_node(expr):
    return expr.has(GaussianExpectation)


def num(expr, dps=30):
    return sp.N(expr, dps)


# ============================================================================ oracle
ORACLE_DPS = 30
ZMAX = 12  # Gaussian tail beyond 12 sigma < 1e-32, even against the growth of exp(u)


@functools.lru_cache(maxsize=None)
def _gl_nodes():
    """48-point Gauss-Legendre on [-1, 1] at 40 digits."""
    from mpmath.calculus.quadrature import GaussLegendre

    with mp.workdps(ORACLE_DPS + 10):
        return tuple(GaussLegendre(mp).calc_nodes(5, mp.prec))


def _gl(edges):
    """(node, weight) pairs of the 48-point rule on each piece between the edges."""
    out = []
    for lo, hi in zip(edges, edges[1:]):
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        out.extend((mid + half * x, half * wt) for x, wt in _gl_nodes())
    return out


def _mpf(q):
    q = sp.Rational(q)
    return mp.mpf(q.p) / q.q


def oracle(fs, cov, kinked=True):
    """M[i][j] = E f_i(u) f_j(v), (u, v) ~ N(0, cov), by quadrature at 30 digits.

    Independent of symntk.gaussian: Cholesky whitening u = s1 z1, v = s2 (c z1 + s z2),
    s = sqrt(1 - c^2), fixed 48-point Gauss-Legendre rules with mpmath at 30 digits.

    * c = +-1: v = c (s2/s1) u exactly, a 1-D integral split at 0 (mpmath.quad).
    * kinked f (kinks at u = 0 and v = 0 only, as for every registered activation):
      polar coordinates z = r (cos t, sin t); the kinks are the rays where u = 0 or v = 0,
      so the angular sectors between them carry smooth integrands.
    * smooth f: iterated over z1 (outer) and z2 (inner), both split at 0; f(u) depends on
      z1 only, so it is evaluated once per outer node.
    """
    with mp.workdps(ORACLE_DPS):
        s11, s12, s22 = map(_mpf, cov)
        s1, s2 = mp.sqrt(s11), mp.sqrt(s22)
        c = s12 / (s1 * s2)
        n = len(fs)
        total = [[mp.mpf(0)] * n for _ in range(n)]

        def add(weight, a, b):
            for i in range(n):
                for j in range(n):
                    total[i][j] += weight * a[i] * b[j]

        if abs(c) == 1:  # adaptive tanh-sinh is affordable in 1-D
            for i in range(n):
                for j in range(n):
                    h = lambda z: fs[i](s1 * z) * fs[j](c * s2 * z) * mp.npdf(z)  # noqa: E731
                    total[i][j] = mp.quad(h, [-mp.inf, 0, mp.inf])
            return total
        gauss = [(z, wt * mp.npdf(z)) for z, wt in _gl([-ZMAX, 0, ZMAX])]
        s = mp.sqrt(1 - c * c)
        if kinked:
            radial = [(r, wt * r * mp.exp(-r * r / 2) / (2 * mp.pi)) for r, wt in _gl([0, ZMAX])]
            t0 = mp.atan2(-c, s)  # v = 0 along this ray and its opposite; u = 0 at +-pi/2
            rays = sorted({mp.pi / 2, 3 * mp.pi / 2, t0 % (2 * mp.pi), (t0 + mp.pi) % (2 * mp.pi)})
            for t, wt in _gl([*rays, rays[0] + 2 * mp.pi]):
                du, dv = s1 * mp.cos(t), s2 * (c * mp.cos(t) + s * mp.sin(t))
                for r, wr in radial:
                    add(wt * wr, [f(r * du) for f in fs], [f(r * dv) for f in fs])
            return total
        for z1, w1 in gauss:
            acc = [mp.mpf(0)] * n
            for z2, w2 in gauss:
                vv = s2 * (c * z1 + s * z2)
                for j, f in enumerate(fs):
                    acc[j] += w2 * f(vv)
            add(w1, [f(s1 * z1) for f in fs], acc)
        return total


# ===================================================================== exact closed forms
def test_relu_values():
    assert vtransform("relu", "relu", 1, 0, 1) == 1 / (2 * sp.pi)
    half = vtransform("relu", "relu", 1, R(1, 2), 1)
    assert sp.simplify(half - (sp.sqrt(3) / (4 * sp.pi) + R(1, 6))) == 0
    assert abs(num(half) - sp.Float("0.3044989", 30)) < 1e-7
    assert vtransform("relu", "relu", 1, 1, 1) == R(1, 2)


def test_step_values():
    assert vtransform("step", "step", 1, 0, 1) == R(1, 4)
    assert vtransform("step", "step", 1, R(1, 2), 1) == R(1, 3)
    assert vtransform("step", "step", 1, -1, 1) == 0


def test_erf_and_erf_prime_values():
    assert vtransform("erf", "erf", 1, 1, 1) == 2 / sp.pi * sp.asin(R(2, 3))
    assert abs(num(vtransform("erf", "erf", 1, 1, 1)) - sp.Float("0.4645591", 30)) < 1e-7
    d = derivative("erf")
    assert sp.simplify(vtransform(d, d, 1, 0, 1) - 4 / (3 * sp.pi)) == 0
    assert sp.simplify(vtransform(d, d, 1, 1, 1) - 4 / (sp.pi * sp.sqrt(5))) == 0
    assert abs(num(vtransform(d, d, 1, 1, 1)) - sp.Float("0.5694100", 30)) < 1e-7


def test_relu_step_identity_and_erf_erf_prime():
    lhs = vtransform("relu", "step", S11, S12, S22)
    assert sp.simplify(lhs - sp.sqrt(S11) * (1 + C) / (2 * sp.sqrt(2 * sp.pi))) == 0
    assert vtransform("erf", derivative("erf"), S11, S12, S22) == 0


def test_closed_form_table_symbolically():
    relu = vtransform("relu", "relu", S11, S12, S22)
    theta = sp.acos(C)
    expected = sp.sqrt(S11 * S22) / (2 * sp.pi) * (sp.sqrt(1 - C**2) + (sp.pi - theta) * C)
    assert sp.simplify(relu - expected) == 0
    assert vtransform("step", "step", S11, S12, S22) == (sp.pi - theta) / (2 * sp.pi)
    erf = vtransform("erf", "erf", S11, S12, S22)
    assert sp.simplify(erf - 2 / sp.pi * sp.asin(S12 / sp.sqrt((S11 + R(1, 2)) * (S22 + R(1, 2))))) == 0
    d = derivative("erf")
    erf_prime = vtransform(d, d, S11, S12, S22)
    expected = 4 / sp.pi * ((1 + 2 * S11) * (1 + 2 * S22) - 4 * S12**2) ** R(-1, 2)
    assert sp.simplify(erf_prime - expected) == 0
    assert vtransform("identity", "identity", S11, S12, S22) == S12
    sigma = sp.Symbol("sigma", positive=True)
    lognormal = vtransform(sp.exp(X / sigma), sp.exp(X / sigma), S11, S12, S22)
    assert sp.simplify(lognormal - sp.exp((S11 + 2 * S12 + S22) / (2 * sigma**2))) == 0
    assert sp.expand(vtransform("monomial(2)", "monomial(2)", S11, S12, S22) - (S11 * S22 + 2 * S12**2)) == 0
    assert sp.expand(vtransform(2 * X, 2 * X, S11, S12, S22) - 4 * S12) == 0


def test_diagonal_entries():
    assert expect(sp.Max(0, u) ** 2, (u,), [[S11]]) == S11 / 2
    assert expect(sp.Heaviside(u) ** 2, (u,), [[S11]]) == R(1, 2)
    assert expect(sp.Max(0, u) * sp.Heaviside(u), (u,), [[S11]]) == sp.sqrt(S11) / sp.sqrt(2 * sp.pi)
    assert expect(sp.Max(0, u), (u,), [[S11]]) == sp.sqrt(S11) / sp.sqrt(2 * sp.pi)
    assert expect(sp.Heaviside(u), (u,), [[S11]]) == R(1, 2)
    assert expect(sp.exp(u), (u,), [[S11]]) == sp.exp(S11 / 2)
    assert expect(sp.cos(u), (u,), [[S11]]) == sp.exp(-S11 / 2)
    assert sp.simplify(expect(sp.sin(u) ** 2, (u,), [[S11]]) - (1 - sp.exp(-2 * S11)) / 2) == 0
    # The same Gaussian through two linear forms: relu(2u) relu(u) is 2 relu(u)^2.
    assert expect(sp.Max(0, 2 * u) * sp.Max(0, u), (u,), [[S11]]) == S11


# ================================================================= Wick / Isserlis
def test_wick_four_variables():
    names = [[sp.Symbol(f"S{min(i, j)}{max(i, j)}") for j in range(1, 5)] for i in range(1, 5)]
    cov = sp.Matrix(names)
    s = lambda i, j: cov[i - 1, j - 1]  # noqa: E731
    assert expect(u1 * u2 * u3 * u4, (u1, u2, u3, u4), cov) == sp.expand(
        s(1, 2) * s(3, 4) + s(1, 3) * s(2, 4) + s(1, 4) * s(2, 3)
    )
    for odd in (u1, u1 * u2 * u3, u1**3, u1**2 * u4, u1 * u2 * u3 * u4 * u1):
        assert expect(odd, (u1, u2, u3, u4), cov) == 0
    assert expect(u1**4, (u1, u2, u3, u4), cov) == 3 * s(1, 1) ** 2
    assert expect(u1**2 * u2**2, (u1, u2, u3, u4), cov) == s(1, 1) * s(2, 2) + 2 * s(1, 2) ** 2
    assert expect(u1**6, (u1,), [[S11]]) == 15 * S11**3


def test_polynomials_of_linear_forms():
    cov = sp.Matrix([[S11, S12], [S12, S22]])
    assert sp.expand(expect((u + v) ** 2, (u, v), cov) - (S11 + 2 * S12 + S22)) == 0
    assert sp.expand(expect((u - 2 * v) ** 4, (u, v), cov) - 3 * (S11 - 4 * S12 + 4 * S22) ** 2) == 0


# ============================================================ linear forms, canonicalisation
def test_relu_of_linear_forms_collapses_to_two_gaussians():
    a, b, c, d, e, f = sp.symbols("a b c d e f", real=True)
    cov3 = sp.Matrix([[a, d, e], [d, b, f], [e, f, c]])
    lhs = expect(sp.Max(0, u1 + u3) * sp.Max(0, u2 + u3), (u1, u2, u3), cov3)
    rhs = vtransform("relu", "relu", a + 2 * e + c, d + e + f + c, b + 2 * f + c)
    assert sp.simplify(lhs - rhs) == 0
    lhs = expect(sp.Heaviside(u1 + u3) * sp.Heaviside(u2 + u3), (u1, u2, u3), cov3)
    assert sp.simplify(lhs - vtransform("step", "step", a + 2 * e + c, d + e + f + c, b + 2 * f + c)) == 0


def test_negated_argument_flips_the_covariance():
    lhs = expect(sp.Max(0, -u) * sp.Max(0, v), (u, v), COV)
    assert lhs == vtransform("relu", "relu", S11, -S12, S22)
    assert expect(sp.Max(0, -u) * sp.Max(0, u), (u,), [[S11]]) == 0


def test_scale_is_pulled_out_of_homogeneous_heads():
    assert expect(sp.Max(0, 3 * u) * sp.Heaviside(2 * v), (u, v), COV) == 3 * vtransform(
        "relu", "step", S11, S12, S22
    )


def test_relu_scale_law_symbolic():
    a = sp.Symbol("a", positive=True)
    lhs = expect(sp.Max(0, a * u) * sp.Max(0, a * v), (u, v), COV)
    assert sp.simplify(lhs - a**2 * vtransform("relu", "relu", S11, S12, S22)) == 0


# Denominators are bounded: sqrt(1 - c^2) of a rational with a ~90-bit denominator sends SymPy
# into integer factorisation, which gives up with a ValueError (a SymPy limit, not ours).
@settings(max_examples=40, deadline=None)
@given(
    a=st.fractions(min_value=R(1, 10), max_value=10, max_denominator=10**6),
    s1=st.fractions(min_value=R(1, 10), max_value=3, max_denominator=10**6),
    s2=st.fractions(min_value=R(1, 10), max_value=3, max_denominator=10**6),
    c=st.fractions(min_value=-1, max_value=1, max_denominator=10**6),
)
def test_relu_scale_law_numeric(a, s1, s2, c):
    a, s1, s2, c = map(sp.Rational, (a, s1, s2, c))
    cov = (s1**2, c * s1 * s2, s2**2)
    lhs = vtransform(sp.Max(0, a * X), sp.Max(0, a * X), *cov)
    rhs = vtransform("relu", "relu", *cov)
    assert abs(num(lhs - a**2 * rhs)) < 1e-25 * (1 + abs(num(lhs)))


# =============================================================== rules beyond the table
def test_gaussian_factor_absorbed_into_measure():
    assert sp.simplify(expect(sp.exp(-(u**2)), (u,), [[S11]]) - 1 / sp.sqrt(1 + 2 * S11)) == 0
    lognormal = expect(sp.exp(u) * sp.exp(2 * v), (u, v), COV)
    assert sp.simplify(lognormal - sp.exp((S11 + 4 * S12 + 4 * S22) / 2)) == 0
    # Mean shift: E[u e^v] = Cov(u, v) E e^v.
    assert sp.simplify(expect(u * sp.exp(v), (u, v), COV) - S12 * sp.exp(S22 / 2)) == 0


def test_trig_products():
    assert expect(sp.sin(u) * sp.cos(v), (u, v), COV) == 0  # odd
    cc = expect(sp.cos(u) * sp.cos(v), (u, v), COV)
    expected = (sp.exp(-(S11 - 2 * S12 + S22) / 2) + sp.exp(-(S11 + 2 * S12 + S22) / 2)) / 2
    assert sp.simplify(cc - expected) == 0
    ss = expect(sp.sin(u) * sp.sin(v), (u, v), COV)
    expected = (sp.exp(-(S11 - 2 * S12 + S22) / 2) - sp.exp(-(S11 + 2 * S12 + S22) / 2)) / 2
    assert sp.simplify(ss - expected) == 0
    shifted = expect(sp.exp(u) * sp.sin(v), (u, v), COV)
    assert sp.simplify(shifted - sp.exp(S11 / 2) * sp.sin(S12) * sp.exp(-S22 / 2)) == 0
    assert sp.simplify(expect(sp.cos(u + 1), (u,), [[S11]]) - sp.cos(1) * sp.exp(-S11 / 2)) == 0


def test_stein_lemma_and_delta():
    assert expect(u * sp.Max(0, v), (u, v), COV) == S12 / 2
    assert sp.simplify(expect(u * sp.Heaviside(v), (u, v), COV) - S12 / sp.sqrt(2 * sp.pi * S22)) == 0
    assert expect(u**2 * sp.Heaviside(u), (u,), [[S11]]) == S11 / 2
    assert sp.simplify(expect(u * sp.sin(v), (u, v), COV) - S12 * sp.exp(-S22 / 2)) == 0
    assert sp.simplify(expect(sp.DiracDelta(u), (u,), [[S11]]) - 1 / sp.sqrt(2 * sp.pi * S11)) == 0


def test_gelu_closed_form_via_stein():
    """E gelu(u) gelu(v): no node left, and it matches quadrature (Stein's lemma, TP2 Lemma F.4)."""
    value = vtransform("gelu", "gelu", S11, S12, S22)
    assert not has_node(value)
    gelu = sp.lambdify(X, activation("gelu"), "mpmath")
    for cov in [(1, R(1, 3), 2), (R(1, 2), R(-1, 5), 1)]:
        ref = oracle([gelu], cov, kinked=False)[0][0]
        got = num(value.xreplace(dict(zip((S11, S12, S22), cov))))
        assert abs(got - mpf_to_sympy(ref)) < 1e-20


def test_max_min_abs_sign_are_rewritten_to_table_heads():
    assert expect(sp.Abs(u), (u,), [[S11]]) == 2 * sp.sqrt(S11) / sp.sqrt(2 * sp.pi)
    # E sign(u) sign(v) = (2/pi) asin(c)
    sign_sign = expect(sp.sign(u) * sp.sign(v), (u, v), COV)
    for point in ({S11: 1, S12: R(1, 3), S22: 2}, {S11: R(1, 2), S12: R(-2, 3), S22: 1}):
        assert abs(num((sign_sign - 2 / sp.pi * sp.asin(C)).xreplace(point))) < 1e-28
    mx = expect(sp.Max(u, v), (u, v), COV)  # E max(u, v) = sqrt(Var(u - v) / (2 pi))
    assert sp.simplify(mx - sp.sqrt(S11 - 2 * S12 + S22) / sp.sqrt(2 * sp.pi)) == 0
    assert sp.simplify(expect(sp.Min(u, v), (u, v), COV) + mx) == 0


# ====================================================== closed-form tables, iterated
HEAD_EXPR = {"relu": sp.Max(0, X), "step": sp.Heaviside(X), "erf": sp.erf(X)}
TABLE_COVS = [(R(3, 2), R(-7, 10), R(2, 3)), (2, R(999999, 1000000), R(1, 2))]


def test_every_table_head_has_an_expression():
    heads = set(MEAN_RULES) | {h for pair in PAIR_RULES for h in pair}
    assert heads <= set(HEAD_EXPR)


@pytest.mark.parametrize("pair", sorted(PAIR_RULES))
@pytest.mark.parametrize("cov", TABLE_COVS, ids=str)
def test_pair_rules_against_quadrature(pair, cov):
    f, g = (sp.lambdify(X, HEAD_EXPR[h], "mpmath") for h in pair)
    closed = vtransform(HEAD_EXPR[pair[0]], HEAD_EXPR[pair[1]], *cov)
    assert not has_node(closed)
    ref = oracle([f, g], cov, kinked=any(h != "erf" for h in pair))
    assert abs(num(closed) - mpf_to_sympy(ref[0][1])) < 1e-14
    # The reversed pair is looked up with the roles swapped.
    swapped = vtransform(HEAD_EXPR[pair[1]], HEAD_EXPR[pair[0]], *cov)
    assert abs(num(swapped) - mpf_to_sympy(ref[1][0])) < 1e-14


@pytest.mark.parametrize("head", sorted(MEAN_RULES))
def test_mean_rules(head):
    with mp.workdps(30):
        f = sp.lambdify(X, HEAD_EXPR[head], "mpmath")
        ref = mp.quad(lambda z: f(mp.sqrt(2) * z) * mp.npdf(z), [-mp.inf, 0, mp.inf])
    assert abs(num(expect(HEAD_EXPR[head].xreplace({X: u}), (u,), [[2]])) - mpf_to_sympy(ref)) < 1e-25


# ============================================= every registered activation vs quadrature
SPECS = {  # parameters for the parametrised constructors; others are called bare
    "leaky_relu": "leaky_relu(0.2)",
    "monomial": "monomial(3)",
    "polynomial": "polynomial([1, -2, 1/2, 1/3])",
}
SWEEP_COVS = {
    "c=-0.4,unequal": (R(3, 2), R(-2, 5), R(2, 3)),
    "c=0.999999,unequal": (2, R(999999, 1000000), R(1, 2)),
    "c=1,unequal": (4, 1, R(1, 4)),
    "c=-1,unequal": (1, R(-3, 2), R(9, 4)),
}
KINDS = ("phi*phi", "dphi*dphi", "phi*dphi")
CLOSED_FORM = {"relu", "leaky_relu", "abs", "step", "erf", "gelu", "sin", "cos", "exp", "identity", "monomial",
               "polynomial"}


def _spec(name):
    return SPECS.get(name, name)


def _differentiable(name):
    """Continuous activations: their derivative is a function (a jump's is a Dirac delta, which
    the NTK replaces by the derivative almost everywhere)."""
    return not jump_points(activation(_spec(name)), X)


SWEEP = [
    pytest.param(name, kind, cov_id, id=f"{name}-{kind}-{cov_id}")
    for name in sorted(ACTIVATIONS)
    for kind in (KINDS if _differentiable(name) else KINDS[:1])
    for cov_id in SWEEP_COVS
]


@functools.lru_cache(maxsize=None)
def _closed(expr, kind):
    d = sp.diff(expr, X)
    left, right = {"phi*phi": (expr, expr), "dphi*dphi": (d, d), "phi*dphi": (expr, d)}[kind]
    return vtransform(left, right, S11, S12, S22)


@functools.lru_cache(maxsize=None)
def _reference(expr, cov):
    fs = [sp.lambdify(X, expr, "mpmath")]
    if not sp.diff(expr, X).has(sp.DiracDelta):
        fs.append(sp.lambdify(X, sp.diff(expr, X), "mpmath"))
    kinked = expr.has(sp.Max, sp.Min, sp.Heaviside, sp.Abs, sp.sign)
    m = oracle(fs, cov, kinked=kinked)
    return {"phi*phi": m[0][0]} if len(fs) == 1 else {"phi*phi": m[0][0], "dphi*dphi": m[1][1], "phi*dphi": m[0][1]}


def _evaluate(expr, cov):
    """Exact substitution; closed forms at 30 digits, leftover nodes by numeric_expectation."""
    value = sp.sympify(expr).xreplace(dict(zip((S11, S12, S22), map(sp.sympify, cov))))
    nodes = value.atoms(GaussianExpectation)
    value = value.xreplace({n: sp.Float(numeric_expectation(n), 30) for n in nodes})
    return num(value), bool(nodes)


def test_sweep_covers_the_registry():
    assert {p.values[0] for p in SWEEP} == set(ACTIVATIONS)
    assert CLOSED_FORM <= set(ACTIVATIONS)


@pytest.mark.parametrize("name, kind, cov_id", SWEEP)
def test_activation_expectations_against_quadrature(name, kind, cov_id):
    expr = activation(_spec(name))
    cov = SWEEP_COVS[cov_id]
    closed = _closed(expr, kind)
    if name in CLOSED_FORM:
        assert not has_node(closed), f"{name} {kind} should have a closed form: {closed}"
    got, numeric = _evaluate(closed, cov)
    ref = mpf_to_sympy(_reference(expr, cov)[kind])
    tol = (1e-12 if numeric else 1e-15) * (1 + abs(ref))
    assert abs(got - ref) < tol, (name, kind, cov, got, ref)


# ============================================= structural properties (hypothesis)
CLOSED_PHI = sorted(CLOSED_FORM)


@functools.lru_cache(maxsize=None)
def _phi_phi_closed_forms(name):
    expr = activation(_spec(name))
    off = _closed(expr, "phi*phi")
    diag = expect(expr.xreplace({X: u}) ** 2, (u,), [[S11]])
    return off, diag


def _rational_cov(s1, s2, c):
    s1, s2, c = map(sp.Rational, (s1, s2, c))
    return s1**2, c * s1 * s2, s2**2


cov_strategy = dict(
    s1=st.fractions(min_value=R(1, 5), max_value=2, max_denominator=50),
    s2=st.fractions(min_value=R(1, 5), max_value=2, max_denominator=50),
    c=st.fractions(min_value=-1, max_value=1, max_denominator=50),
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(CLOSED_PHI), **cov_strategy)
def test_vtransform_psd_and_swap_symmetric(name, s1, s2, c):
    off, diag = _phi_phi_closed_forms(name)
    a, b, d = _rational_cov(s1, s2, c)
    k12 = num(off.xreplace({S11: a, S12: b, S22: d}))
    k21 = num(off.xreplace({S11: d, S12: b, S22: a}))  # arguments swapped
    k11 = num(diag.xreplace({S11: a}))
    k22 = num(diag.xreplace({S11: d}))
    scale = 1 + abs(k11) + abs(k22)
    assert abs(k12 - k21) < 1e-25 * scale
    assert k11 >= -1e-25 and k22 >= -1e-25
    assert k11 * k22 - k12**2 >= -1e-20 * scale**2
    # The diagonal equals the off-diagonal formula at c = 1.
    assert abs(num(off.xreplace({S11: a, S12: a, S22: a})) - k11) < 1e-20 * scale


@functools.lru_cache(maxsize=None)
def _swapped_mixed(expr):
    return vtransform(sp.diff(expr, X), expr, S11, S12, S22)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(n for n in CLOSED_FORM if n != "step")), **cov_strategy)
def test_mixed_vtransform_swap(name, s1, s2, c):
    """E phi(u) phi'(v) equals E phi'(u) phi(v) with the two variances swapped."""
    expr = activation(_spec(name))
    a, b, d = _rational_cov(s1, s2, c)
    lhs = num(_closed(expr, "phi*dphi").xreplace({S11: a, S12: b, S22: d}))
    rhs = num(_swapped_mixed(expr).xreplace({S11: d, S12: b, S22: a}))
    assert abs(lhs - rhs) < 1e-20 * (1 + abs(lhs))


# ======================================================================= the node
def test_irreducible_terms_stay_nodes_after_linearity():
    sw = sp.Symbol("sigma_w", positive=True)
    out = expect(sw**2 * (sp.Max(0, u) * sp.Max(0, v) + sp.tanh(u) * sp.tanh(v)), (u, v), COV)
    node = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), COV)
    assert sp.expand(out - sw**2 * (vtransform("relu", "relu", S11, S12, S22) + node)) == 0
    # A node only keeps the variables its term uses.
    out = expect(sp.tanh(u) ** 2 + u * v, (u, v, w), sp.diag(S11, S22, 1))
    assert out == GaussianExpectation(sp.tanh(u) ** 2, (u,), [[S11]])


def test_node_printing():
    node = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), COV)
    assert sp.latex(node) == (
        r"\mathbb{E}_{\left(u, v\right) \sim \mathcal{N}\left(0,\, \left(\begin{smallmatrix}"
        r"\Sigma_{11} & \Sigma_{12} \\ \Sigma_{12} & \Sigma_{22}\end{smallmatrix}\right)\right)}"
        r"\left[\tanh{\left(u \right)} \tanh{\left(v \right)}\right]"
    )
    one = GaussianExpectation(sp.tanh(u) ** 2, (u,), [[S11]])
    assert sp.latex(one) == (
        r"\mathbb{E}_{u \sim \mathcal{N}\left(0,\, \Sigma_{11}\right)}\left[\tanh^{2}{\left(u \right)}\right]"
    )
    assert str(node) == "E[tanh(u)*tanh(v) | (u, v) ~ N(0, [[Sigma11, Sigma12], [Sigma12, Sigma22]])]"


def test_node_is_a_well_behaved_sympy_expression():
    node = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), COV)
    assert node.free_symbols == {S11, S12, S22}
    assert node.subs(u, 3) == node  # bound variable
    assert node.subs(S11, 2).cov[0, 0] == 2
    assert node == GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), COV)  # hash-consed equality
    relu = GaussianExpectation(sp.Max(0, u) * sp.Max(0, v), (u, v), COV)
    assert relu.doit() == vtransform("relu", "relu", S11, S12, S22)
    assert node.doit() == node
    with pytest.raises(ValueError):
        GaussianExpectation(u, (u, v), [[1]])


def test_node_evalf():
    cov = [[1, R(1, 2)], [R(1, 2), 1]]
    node = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), cov)
    ref = oracle([sp.lambdify(X, sp.tanh(X), "mpmath")], (1, R(1, 2), 1), kinked=False)[0][0]
    assert abs(float(node.evalf()) - float(ref)) < 1e-13
    symbolic = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), COV)
    value = (S11 * symbolic).evalf(subs={S11: 1, S12: R(1, 2), S22: 1})
    assert abs(float(value) - float(ref)) < 1e-13
    assert symbolic.evalf() == symbolic  # unbound covariance: stays symbolic


def test_numeric_expectation_high_precision_path():
    # 1-D (rank-1 covariance): against mpmath.quad at 40 digits.
    node = GaussianExpectation(sp.Max(0, u) * sp.tanh(v), (u, v), [[1, 2], [2, 4]])
    with mp.workdps(40):
        ref = mp.quad(lambda z: max(0, z) * mp.tanh(2 * z) * mp.npdf(z), [-mp.inf, 0, mp.inf])
        assert abs(numeric_expectation(node, prec=120) - ref) < mpmath.mpf(10) ** -30
    # 2-D: the oracle is good to ~1e-17.
    node = GaussianExpectation(sp.Max(0, u) * sp.tanh(v), (u, v), [[1, R(1, 3)], [R(1, 3), 2]])
    ref = oracle([sp.lambdify(X, f, "mpmath") for f in (sp.Max(0, X), sp.tanh(X))], (1, R(1, 3), 2))[0][1]
    with mp.workdps(30):
        assert abs(numeric_expectation(node, prec=80) - ref) < 1e-16
    assert abs(numeric_expectation(node) - ref) < 1e-13


@pytest.mark.parametrize(
    "cov, expected",
    [
        ([[1, 1], [1, 1]], "diag"),  # c = 1: u = v
        ([[1, -1], [-1, 1]], "-diag"),  # c = -1: u = -v
        ([[0, 0], [0, 1]], 0),  # zero variance
        ([[0, 0], [0, 0]], 0),
    ],
)
def test_numeric_expectation_singular_covariances(cov, expected):
    node = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), cov)
    value = numeric_expectation(node)
    assert mpmath.isfinite(value)
    if expected in ("diag", "-diag"):
        with mp.workdps(30):
            diag = mp.quad(lambda z: mp.tanh(z) ** 2 * mp.npdf(z), [-mp.inf, 0, mp.inf])
        assert abs(value - (diag if expected == "diag" else -diag)) < 1e-13
    else:
        assert value == expected
    kinked = GaussianExpectation(sp.Max(0, u) * sp.Heaviside(v) + sp.Abs(u - v), (u, v), cov)
    assert mpmath.isfinite(numeric_expectation(kinked))
    sig = GaussianExpectation(1 / (1 + sp.exp(-u)) / (1 + sp.exp(-v)), (u, v), [[0, 0], [0, 1]])
    assert abs(numeric_expectation(sig) - 0.25) < 1e-14  # sigmoid(0) * E sigmoid(v)


def test_numeric_expectation_kinks_of_linear_forms_and_three_variables():
    cov3 = [[1, R(1, 5), R(1, 10)], [R(1, 5), 2, R(3, 10)], [R(1, 10), R(3, 10), R(1, 2)]]
    three = GaussianExpectation(sp.tanh(u1 + u3) * sp.tanh(u2 + u3), (u1, u2, u3), cov3)
    # The same expectation over the two collapsed Gaussians L1 = u1+u3, L2 = u2+u3.
    m = sp.Matrix(cov3)
    a, b = sp.Matrix([1, 0, 1]), sp.Matrix([0, 1, 1])
    two = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), [[(a.T * m * a)[0], (a.T * m * b)[0]],
                                                                  [(a.T * m * b)[0], (b.T * m * b)[0]]])
    assert abs(numeric_expectation(three) - numeric_expectation(two)) < 1e-7  # tensor Gauss-Hermite
    # Kinks of an affine form are split too: E relu(u + 1/2) relu(v), reference by nested
    # adaptive double-precision quadrature in Cholesky coordinates (u = z1).
    shifted = GaussianExpectation(sp.Max(0, u + R(1, 2)) * sp.Max(0, v), (u, v), [[1, R(1, 2)], [R(1, 2), 1]])
    fp = mpmath.fp
    r3 = fp.sqrt(3) / 2

    def inner(z1):
        f = lambda z2: max(0.0, z1 / 2 + r3 * z2) * fp.npdf(z2)  # noqa: E731
        return max(0.0, z1 + 0.5) * fp.npdf(z1) * fp.quad(f, [-fp.inf, -z1 / (2 * r3), fp.inf])

    ref = fp.quad(inner, [-fp.inf, -0.5, 0, fp.inf])
    assert abs(numeric_expectation(shifted) - ref) < 1e-12


def test_numeric_expectation_errors():
    node = GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), COV)
    with pytest.raises(ValueError, match="unbound"):
        numeric_expectation(node)
    assert abs(numeric_expectation(node, subs={S11: 1, S12: 0, S22: 1})) < 1e-15
    with pytest.raises(ValueError, match="positive semidefinite"):
        numeric_expectation(GaussianExpectation(sp.tanh(u) * sp.tanh(v), (u, v), [[1, 2], [2, 1]]))


# ======================================================================= API hygiene
def test_expect_validates_its_arguments():
    with pytest.raises(ValueError, match="real"):
        expect(sp.Symbol("p") ** 2, (sp.Symbol("p"),), [[1]])
    with pytest.raises(ValueError, match="sign assumption"):
        expect(sp.Symbol("p", positive=True) ** 2, (sp.Symbol("p", positive=True),), [[1]])
    with pytest.raises(ValueError, match="shape"):
        expect(u * v, (u, v), [[1]])
    with pytest.raises(ValueError, match="symmetric"):
        expect(u * v, (u, v), [[1, 2], [3, 1]])


def test_no_sympy_integrate_on_the_expectation_path(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("sympy.integrate called")

    monkeypatch.setattr(sp, "integrate", forbidden)
    monkeypatch.setattr(sp.Integral, "doit", forbidden)
    # Fresh symbols so the rule caches cannot answer from earlier tests.
    a, b, c = sp.symbols("A_fresh B_fresh C_fresh", positive=True)
    for name in ("relu", "step", "erf", "gelu", "sin", "exp", "tanh", "abs"):
        expr = activation(name)
        vtransform(expr, expr, a, c, b)
        if name != "step":
            d = sp.diff(expr, X)
            vtransform(d, d, a, c, b)
            vtransform(expr, d, a, c, b)
