"""BatchNorm-ReLU networks: batch-coupled NNGP and NTK (TP2 App. E.4) against closed forms, an
independent integration and finite-width networks."""
import math

import numpy as np
import pytest
from scipy import integrate, stats

import symntk
from symntk import batchnorm_quadrature as bq
from symntk.batchnorm import BatchSizeWarning
from symntk.program import ProgramError


def _vrelu(K):
    """E relu(u) relu(v) for N(0, K) (Cho & Saul), written independently of the package."""
    d = np.sqrt(np.diag(K))
    out = np.empty_like(K)
    for i in range(len(K)):
        for j in range(len(K)):
            c = np.clip(K[i, j] / (d[i] * d[j]), -1, 1)
            out[i, j] = d[i] * d[j] * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / (2 * math.pi)
    return out


def _eq36_scipy(Sigma):
    """TP2 Eq. 36 entry by entry with QUADPACK on (0, inf) (an independent integration)."""
    B = len(Sigma)
    G = np.eye(B) - 1 / B
    C = G @ Sigma @ G
    I = np.eye(B)

    def f(u, i, j):
        M = I + 2 * u * C
        return B * _vrelu(np.linalg.solve(M, C))[i, j] / math.sqrt(np.linalg.det(M))

    return np.array([[integrate.quad(f, 0, np.inf, args=(i, j), epsabs=1e-12, epsrel=1e-12,
                                     limit=200)[0] for j in range(B)] for i in range(B)])


def test_g7_batch_of_two_gives_half_identity():
    rng = np.random.default_rng(0)
    for _ in range(3):
        A = rng.standard_normal((2, 3))
        r = bq.forward_single(A @ A.T)
        np.testing.assert_allclose(r.value, np.eye(2) / 2, atol=1e-12)
    p = symntk.batchnorm_mlp(1, input_dim=3, weight_std=1.5)
    k = symntk.kernel(p, rng.standard_normal((2, 3)))
    np.testing.assert_allclose(k.nngp, 2.25 * np.eye(2) / 2, atol=1e-12)


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (2.0, 0.7), (0.3, -0.1)])
def test_g8_exchangeable_batch_of_three(a, b):
    r = bq.forward_single(a * np.eye(3) + b * np.ones((3, 3)))
    off = math.sqrt(3) / (4 * math.pi) - 1 / 12
    np.testing.assert_allclose(r.value, np.full((3, 3), off) + (0.5 - off) * np.eye(3), atol=1e-10)


def test_g8_nonsymmetric_against_independent_integration():
    S = np.array([[1, .5, .2], [.5, 1, .1], [.2, .1, 1.5]])
    r = bq.forward_single(S)
    np.testing.assert_allclose(r.value, _eq36_scipy(S), atol=1e-9)
    theory = np.array([[0.42665, 0.081592, 0.04351], [0.081592, 0.45599, 0.039646],
                       [0.04351, 0.039646, 0.61736]])
    np.testing.assert_allclose(r.value, theory, atol=6e-6)
    assert r.error < 1e-8


def test_same_batch_ntk_map_against_a_fine_log_scale_trapezoid():
    """The 1-D NTK integral (adjoint of TP2 Eq. 38) by the exp-sinh rule against a plain
    trapezoid in log u with step 0.02 over u in [e^-70, e^130], for a batch whose centred Gram
    has a small eigenvalue (2e-3 of the largest) besides the exact zero of the centring."""
    X = np.random.default_rng(1).standard_normal((4, 3))
    C0 = X @ X.T / 3
    B = 4
    G = np.eye(B) - 1 / B
    C = G @ C0 @ G
    A = G @ C0 @ G
    lam, U = np.linalg.eigh(C)
    lam = np.where(lam > 1e-12 * lam.max(), lam, 0.0)
    u = np.exp(np.arange(-70, 130, 0.02))
    den = 1 + 2 * u[:, None] * lam[None]
    K = np.einsum("ik,nk,jk->nij", U, lam[None] / den, U)
    V, S, R = bq.relu_moments(K)
    P, P2, Q = bq._backward_moments(K, A[None], V, S, R)
    u3 = u[:, None, None]
    f = A[None] * S - u3 * (P + P2) + 0.5 * u3 ** 2 * Q
    ref = np.einsum("n,nij->ij", 0.02 * u * B / np.sqrt(den.prod(axis=1)), f)
    r = bq.ntk_single(C0, C0)
    np.testing.assert_allclose(r.value, ref, atol=1e-9)
    # the cross-batch map of two copies of the batch: a singular joint Gram (rank 3 of 8) and
    # duplicated members (correlation exactly 1, read from factor rows, not arccos)
    np.testing.assert_allclose(bq.ntk_cross(C0, C0, C0, C0).value, ref, atol=1e-9)


def test_cross_batch_of_the_same_batch_is_the_same_batch_kernel():
    """Two copies of one batch: the joint centred Gram is singular; the cross-batch integrals
    (Eqs. 37, 39) reproduce the single-batch ones (36, 38) (for d = 3:
    test_same_batch_ntk_map_against_a_fine_log_scale_trapezoid)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 16))
    C = X @ X.T / 16
    T = C + 0.3
    np.testing.assert_allclose(bq.forward_cross(C, C, C).value, bq.forward_single(C).value,
                               atol=1e-10)
    np.testing.assert_allclose(bq.ntk_cross(C, C, C, T).value, bq.ntk_single(C, T).value,
                               atol=1e-9)
    p = symntk.batchnorm_mlp(2, input_dim=16, bias_std=0.3)
    same, cross = symntk.kernel(p, X), symntk.kernel(p, X, X.copy())
    np.testing.assert_array_equal(cross.ntk, same.ntk)


def test_cross_batch_ntk_is_hoelder_half_at_coinciding_batches():
    """Near two copies of one batch the cross NTK moves like sqrt(delta) (E step step has an
    arccos at correlation 1), the NNGP much less: the integrals resolve it over 8 decades."""
    X = np.random.default_rng(1).standard_normal((6, 16))
    C = X @ X.T / 16
    T = C + 0.3
    base = bq.ntk_single(C, T).value
    dev = [np.abs(bq.ntk_cross(C - dl * np.eye(6), C, C, T).value - base).max()
           for dl in (1e-12, 1e-8, 1e-4)]
    np.testing.assert_allclose(np.diff(np.log10(dev)), 2.0, atol=0.05)


def test_cross_batch_quadrature_with_rank_deficient_joint_gram():
    """d = 3 < B1 + B2 - 1: the quadrature converges (no inversion of the centred Gram), and
    swapping the batches (a different factorisation of the joint Gram) transposes the result."""
    rng = np.random.default_rng(2)
    X1, X2 = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    C = np.vstack([X1, X2]) @ np.vstack([X1, X2]).T / 3
    a = bq.forward_cross(C[:7, 7:], C[:7, :7], C[7:, 7:])
    b = bq.forward_cross(C[7:, :7], C[7:, 7:], C[:7, :7])
    assert np.all(np.isfinite(a.value)) and a.error < 1e-8
    np.testing.assert_allclose(a.value, b.value.T, atol=1e-9)
    T = rng.standard_normal((7, 5))
    np.testing.assert_allclose(bq.ntk_cross(C[:7, 7:], C[:7, :7], C[7:, 7:], T).value,
                               bq.ntk_cross(C[7:, :7], C[7:, 7:], C[:7, :7], T.T).value.T,
                               atol=1e-8)


def _agree(samples, theory, label):
    """The Monte Carlo mean over seeds within 3 standard errors of the theory, in two aggregate
    statistics (robust with few seeds, unlike the largest of many entrywise t-values):
    ||mean - theory||_F <= 3 sqrt(sum SE^2) (its expected square is sum SE^2), and the
    projection <mean - theory, theory> within 3 of its own standard errors, "3" read at the
    same 99.73% confidence for a Student t with n - 1 degrees of freedom (few seeds)."""
    samples = np.asarray(samples)
    n = len(samples)
    mean, sem = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(n)
    ratio = np.linalg.norm(mean - theory) / math.sqrt(np.sum(sem ** 2))
    assert ratio < 3, (label, ratio)
    proj = np.einsum("sij,ij->s", samples - theory, theory)
    zp = proj.mean() / (proj.std(ddof=1) / math.sqrt(n))
    assert abs(zp) < stats.t.ppf(0.99865, n - 1), (label, zp)


@pytest.mark.parametrize("depth, B1, B2, d, eps", [
    (1, 6, 8, 16, 0), (2, 8, 6, 16, 0), (1, 8, 6, 3, 0.5), (2, 6, 8, 3, 0.5)])
def test_finite_width_agreement(depth, B1, B2, d, eps):
    """One batch (B1 x B1) and two batches (B1 x B2) from the same networks at width 4096.
    Input dimension 3 spans only 3 dimensions of the centred batch: with epsilon = 0 the
    empirical NTK would have infinite variance there (check_monte_carlo warns), so d = 3 runs
    with epsilon = 0.5."""
    rng = np.random.default_rng(10 * depth + B1)
    X1, X2 = rng.standard_normal((B1, d)), rng.standard_normal((B2, d))
    p = symntk.batchnorm_mlp(depth, input_dim=d, epsilon=eps, bias_std=0.5)
    same, cross = symntk.kernel(p, X1), symntk.kernel(p, X1, X2)
    out = {k: [] for k in ("ntk1", "ntkx", "nngp1", "nngpx")}
    for seed in range(12 if depth == 1 else 6):
        net = symntk.sample(p, 4096, seed=seed)
        e1, ex = net.ntk(X1), net.ntk(X1, X2)
        out["ntk1"].append(e1.ntk)
        out["ntkx"].append(ex.ntk)
        # the NNGP through the readout's own term, x^L . x^L' / n (+ the output bias): an average
        # over neurons, which concentrates, unlike f(x) f(x') over a few seeds
        out["nngp1"].append(e1.contributions["v"] + e1.contributions["b_out"])
        out["nngpx"].append(ex.contributions["v"] + ex.contributions["b_out"])
    _agree(out["ntk1"], same.ntk, "NTK, one batch")
    _agree(out["ntkx"], cross.ntk, "NTK, two batches")
    _agree(out["nngp1"], same.nngp, "NNGP, one batch")
    _agree(out["nngpx"], cross.nngp, "NNGP, two batches")


def test_nngp_in_input_dimension_3_without_epsilon():
    """The forward kernels need no epsilon: relu(BN(h)) is bounded by sqrt(B), so its Monte Carlo
    concentrates even when the centred batches span only 3 dimensions (d = 3 < B1 + B2 - 1: the
    joint Gram of the two batches is singular)."""
    rng = np.random.default_rng(7)
    X1, X2 = rng.standard_normal((6, 3)), rng.standard_normal((8, 3))
    p = symntk.batchnorm_mlp(1, input_dim=3)
    same, cross = symntk.kernel(p, X1), symntk.kernel(p, X1, X2)
    one, two = [], []
    for seed in range(8):
        net = symntk.sample(p, 4096, seed=seed)
        one.append(net.ntk(X1).contributions["v"])
        two.append(net.ntk(X1, X2).contributions["v"])
    _agree(one, same.nngp, "NNGP, one batch, d = 3")
    _agree(two, cross.nngp, "NNGP, two batches, d = 3")


def test_deviation_shrinks_like_inverse_sqrt_width():
    rng = np.random.default_rng(5)
    X1, X2 = rng.standard_normal((6, 8)), rng.standard_normal((8, 8))
    p = symntk.batchnorm_mlp(1, input_dim=8)
    theory = symntk.kernel(p, X1, X2).ntk
    devs = []
    for width in (128, 2048):
        mc = symntk.monte_carlo(p, X1, X2, width=width, n_samples=12, seed=0)
        devs.append(np.mean([np.linalg.norm(s - theory) for s in mc.ntk_samples])
                    / np.linalg.norm(theory))
    ratio = devs[0] / devs[1]   # width x16: expected 4
    assert 2.5 < ratio < 6.5, devs


def test_bad_batches_are_refused():
    p = symntk.batchnorm_mlp(1, input_dim=3)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="batch of 1"):
        symntk.kernel(p, rng.standard_normal((1, 3)))
    with pytest.raises(ValueError, match="batch of 1"):
        symntk.kernel(p, rng.standard_normal((4, 3)), rng.standard_normal((1, 3)))
    same = np.tile(rng.standard_normal(3), (5, 1))
    with pytest.raises(ValueError, match="zero variance"):
        symntk.kernel(p, same)
    with pytest.raises(ValueError, match="zero variance"):
        symntk.kernel(p, rng.standard_normal((4, 3)), same)
    net = symntk.sample(p, 16, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        net(rng.standard_normal((1, 3)))
    with pytest.raises(ValueError, match="zero variance"):
        net(same)
    with pytest.raises(ValueError, match="infinite"):
        symntk.kernel(p, rng.standard_normal((3, 3)))
    with pytest.raises(ProgramError, match="epsilon"):
        symntk.batchnorm_mlp(1, epsilon=-1)
    with pytest.raises(NotImplementedError, match="only relu"):
        symntk.kernel(symntk.batchnorm_mlp(1, activation="tanh", input_dim=3),
                      rng.standard_normal((6, 3)))


def test_epsilon_removes_the_singularities():
    """With epsilon > 0 a batch of 3 has a finite NTK and a constant batch a zero kernel."""
    p = symntk.batchnorm_mlp(1, input_dim=3, epsilon=0.1)
    rng = np.random.default_rng(0)
    k = symntk.kernel(p, rng.standard_normal((3, 3)))
    assert np.all(np.isfinite(k.ntk))
    np.testing.assert_allclose(symntk.kernel(p, np.ones((4, 3))).nngp, 0, atol=1e-12)


def test_batch_of_two_has_no_hidden_ntk():
    """B = 2, epsilon = 0: relu(BN(h)) is piecewise constant, so only the readout trains."""
    p = symntk.batchnorm_mlp(2, input_dim=3)
    X = np.random.default_rng(0).standard_normal((2, 3))
    k = symntk.kernel(p, X)
    np.testing.assert_allclose(k.ntk, k.nngp, atol=1e-12)
    e = symntk.empirical_ntk(p, X, width=64, seed=0)
    np.testing.assert_allclose(e.contributions["W1"], 0, atol=1e-12)


def test_monte_carlo_warns_for_small_batches():
    p = symntk.batchnorm_mlp(1, input_dim=6)
    rng = np.random.default_rng(0)
    with pytest.warns(BatchSizeWarning, match="size 5"):
        symntk.monte_carlo(p, rng.standard_normal((5, 6)), width=8, n_samples=2)
    with pytest.warns(BatchSizeWarning, match="size 4"):
        symntk.convergence(p, rng.standard_normal((4, 6)), widths=[8, 16], seeds=2)
    with pytest.warns(BatchSizeWarning, match="span only 3"):
        symntk.monte_carlo(symntk.batchnorm_mlp(1, input_dim=3), rng.standard_normal((8, 3)),
                           width=8, n_samples=2)


def test_finite_gradients_match_finite_differences():
    p = symntk.batchnorm_mlp(2, input_dim=4, epsilon=0.01)
    X = np.random.default_rng(3).standard_normal((5, 4))
    net = symntk.sample(p, 12, seed=2)
    g = net.gradients(X)
    for label, (i, j) in (("W1", (3, 1)), ("W2", (4, 7))):
        W = net.parameters[label].copy()
        Wp, Wm = W.copy(), W.copy()
        Wp[i, j] += 1e-6
        Wm[i, j] -= 1e-6
        fd = (net.with_parameters({label: Wp})(X) - net.with_parameters({label: Wm})(X)) / 2e-6
        np.testing.assert_allclose(g[label][:, i, j], fd, atol=1e-7)
    e1, e2 = net.ntk(X, X[:4] + 1), net.ntk(X, X[:4] + 1, method="jacobian")
    np.testing.assert_allclose(e1.ntk, e2.ntk, atol=1e-12)


def test_latex_of_the_recursion():
    d = symntk.derive(symntk.batchnorm_mlp(2, input_dim=3, bias_std=0.5))
    tex = d.latex()
    for piece in (r"\Sigma^{x^{1}}", r"\Theta^{h^{2}}", r"V_{\mathrm{relu}}", r"\det(I+2D"):
        assert piece in tex


def test_finite_referee_for_a_general_program_with_batchnorm():
    """BatchNorm between other nodes (a Nonlin and a Bias after it): the referee's one-sweep-
    per-output path gives the gradients of finite differences; the derivation says what it
    does not cover."""
    xi = symntk.Input("xi", 4)
    h = symntk.nonlin("tanh", symntk.BatchNorm(symntk.Weight("W1", symntk.WIDTH, 4) @ xi,
                                               "relu", 0.01) + symntk.Bias("b"))
    x2 = symntk.BatchNorm(symntk.Weight("W2", symntk.WIDTH, symntk.WIDTH) @ h)
    p = symntk.Program(symntk.Readout(symntk.Weight("v", 1, symntk.WIDTH), x2,
                                      symntk.OutputBias()))
    X = np.random.default_rng(3).standard_normal((5, 4))
    net = symntk.sample(p, 12, seed=2)
    g = net.gradients(X)
    for label, idx in (("W1", (3, 1)), ("W2", (3, 1)), ("b", (3,))):
        P = net.parameters[label].copy()
        Pp, Pm = P.copy(), P.copy()
        Pp[idx] += 1e-6
        Pm[idx] -= 1e-6
        fd = (net.with_parameters({label: Pp})(X) - net.with_parameters({label: Pm})(X)) / 2e-6
        np.testing.assert_allclose(g[label][(slice(None),) + idx], fd, atol=1e-8)
    e1, e2 = net.ntk(X, X[:3] + 1), net.ntk(X, X[:3] + 1, method="jacobian")
    np.testing.assert_allclose(e1.ntk, e2.ntk, atol=1e-12)
    with pytest.raises(NotImplementedError, match="is not a BatchNorm"):
        symntk.kernel(p, X)
