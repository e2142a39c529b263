"""Infinite-width predictions (symntk.predict).

Oracles: dense linear algebra written out here (scipy.linalg.expm, numpy.linalg.solve and
matrix_power on the formulas of Lee et al. 2019 Eq. 16 / Rasmussen & Williams Eq. 2.23-24), and
exact identities (f_t(X) = (I - e^{-eta Theta t}) Y on training inputs; a PSD covariance).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings, strategies as st

import symntk
from symntk.predict import IllConditionedWarning, Predictor, gp_posterior, gradient_descent_mse


class RandomFeatureKernel:
    """A kernel with the compiled kernel's call signature: Theta = Phi Phi^T / m and
    K = Psi Psi^T / m for random features, so both are PSD and exactly known."""

    def __init__(self, d=3, m=200, seed=0):
        rng = np.random.default_rng(seed)
        self.A, self.B = rng.standard_normal((d, m)), rng.standard_normal((d, m))
        self.m = m

    def _features(self, X):
        return np.tanh(X @ self.A) + 0.3, np.cos(X @ self.B)

    def __call__(self, X1, X2=None, params=None, diagonal=False):
        P1, Q1 = self._features(X1)
        P2, Q2 = (P1, Q1) if X2 is None else self._features(X2)
        if diagonal:
            return symntk.KernelResult((Q1 * Q1).sum(1) / self.m, (P1 * P1).sum(1) / self.m, {})
        return symntk.KernelResult(Q1 @ Q2.T / self.m, P1 @ P2.T / self.m, {})


def data(n=12, m=5, d=3, k=None, seed=1):
    rng = np.random.default_rng(seed)
    X, Xt = rng.standard_normal((n, d)), rng.standard_normal((m, d))
    Y = rng.standard_normal(n if k is None else (n, k))
    return X, Y, Xt


def dense(kern, X, Y, Xt, t, eta, which="ntk"):
    """Lee et al. 2019 Eq. 16 by dense solves (no eigendecomposition)."""
    r, c, tt = kern(X), kern(Xt, X), kern(Xt)
    G, Gc = getattr(r, which), getattr(c, which)
    K, Kc, Ktt = r.nngp, c.nngp, tt.nngp
    I = np.eye(len(X))
    M = I - scipy.linalg.expm(-eta * t * G) if np.isfinite(t) else I
    A = Gc @ np.linalg.solve(G, M)
    mean = A @ Y
    cov = Ktt + A @ K @ A.T - A @ Kc.T - Kc @ A.T
    return mean, cov


@pytest.fixture(scope="session")
def relu_kernel():
    """A compiled depth-2 ReLU MLP with biases (Numba compiles once per session)."""
    return symntk.derive(symntk.mlp(2, "relu", weight_std=1.4, bias_std=0.3)).compile()


# ----------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("t", [0.0, 0.3, 2.0, 25.0, np.inf])
@pytest.mark.parametrize("which", ["ntk", "nngp"])
def test_mean_and_covariance_match_dense_solve(t, which):
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    p = Predictor(kern, X, Y, learning_rate=0.7)
    pred = p.gradient_descent(t, Xt, training=which)
    mean, cov = dense(kern, X, Y, Xt, t, 0.7, which)
    scale = max(1.0, np.abs(mean).max())
    np.testing.assert_allclose(pred.mean, mean, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(pred.covariance, cov, rtol=0, atol=1e-10 * np.abs(cov).max())
    assert pred.mean.shape == (len(Xt),) and pred.covariance.shape == (len(Xt), len(Xt))


@pytest.mark.parametrize("t", [0.05, 1.0, 10.0])
def test_training_inputs_follow_the_linear_ode(relu_kernel, t):
    """mu_t(X) = (I - exp(-eta Theta t)) Y on the training inputs, for the derived ReLU NTK."""
    X, Y, _ = data(n=15, d=4, k=2)
    p = Predictor(relu_kernel, X, Y, learning_rate=0.2)
    pred = p.gradient_descent(t)
    Theta = relu_kernel(X).ntk
    expect = (np.eye(len(X)) - scipy.linalg.expm(-0.2 * t * Theta)) @ Y
    np.testing.assert_allclose(pred.mean, expect, rtol=0, atol=1e-10)
    assert pred.mean.shape == Y.shape


def test_infinite_time_is_kernel_regression_and_the_limit_of_finite_times(relu_kernel):
    X, Y, Xt = data(n=10, d=4)
    p = Predictor(relu_kernel, X, Y)
    inf = p.gradient_descent(np.inf, Xt)
    Theta, Tc = relu_kernel(X).ntk, relu_kernel(Xt, X).ntk
    np.testing.assert_allclose(inf.mean, Tc @ np.linalg.solve(Theta, Y), rtol=0, atol=1e-10)
    np.testing.assert_allclose(p.gradient_descent(np.inf).mean, Y, atol=1e-10)
    gaps = [np.abs(p.gradient_descent(t, Xt).mean - inf.mean).max() for t in (1, 10, 100, 1e4)]
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-8


@pytest.mark.parametrize("t", [0.5, 5.0, np.inf])
def test_covariance_symmetric_psd_and_diagonal_consistent(relu_kernel, t):
    X, Y, Xt = data(n=14, m=9, d=4)
    p = Predictor(relu_kernel, X, Y)
    for which in ("ntk", "nngp"):
        full = p.gradient_descent(t, Xt, training=which)
        C = full.covariance
        assert np.array_equal(C, C.T)
        assert np.linalg.eigvalsh(C).min() > -1e-10 * np.abs(C).max()
        diag = p.gradient_descent(t, Xt, training=which, covariance="diagonal")
        np.testing.assert_allclose(diag.covariance, np.diag(C), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(diag.mean, full.mean, rtol=0, atol=0)
    # at t = inf the training outputs are pinned to Y: no variance left there
    C_train = p.gradient_descent(np.inf).covariance
    assert np.abs(C_train).max() < 1e-8


def test_nngp_training_covariance_closed_form():
    """Readout-only training: Sigma_t = K - K_xX K^{-1}(I - e^{-2 eta K t}) K_Xx (Lee et al.)."""
    kern = RandomFeatureKernel(seed=3)
    X, Y, Xt = data(seed=4)
    t, eta = 1.7, 0.5
    pred = Predictor(kern, X, Y, learning_rate=eta).gradient_descent(t, Xt, training="nngp")
    K, Kc, Ktt = kern(X).nngp, kern(Xt, X).nngp, kern(Xt).nngp
    M = np.eye(len(X)) - scipy.linalg.expm(-2 * eta * t * K)
    np.testing.assert_allclose(pred.covariance, Ktt - Kc @ np.linalg.solve(K, M) @ Kc.T,
                               rtol=0, atol=1e-10)


def test_gp_posterior_dense_and_equal_to_ridged_readout_training():
    kern = RandomFeatureKernel(seed=5)
    X, Y, Xt = data(seed=6, k=3)
    noise = 0.05
    post = gp_posterior(kern, X, Y, Xt, noise=noise)
    K, Kc, Ktt = kern(X).nngp, kern(Xt, X).nngp, kern(Xt).nngp
    Kn = K + noise * np.eye(len(X))
    np.testing.assert_allclose(post.mean, Kc @ np.linalg.solve(Kn, Y), rtol=0, atol=1e-10)
    np.testing.assert_allclose(post.covariance, Ktt - Kc @ np.linalg.solve(Kn, Kc.T),
                               rtol=0, atol=1e-10)
    ridged = gradient_descent_mse(kern, X, Y, Xt, np.inf, training="nngp", ridge=noise)
    np.testing.assert_allclose(ridged.mean, post.mean, rtol=0, atol=1e-10)


def test_mean_loss_rescales_time_by_the_number_of_targets():
    """Neural Tangents' mean loss 1/(2 N k)||f - Y||^2 runs the sum-loss dynamics at t / (N k)."""
    kern = RandomFeatureKernel()
    X, Y, Xt = data(k=2)
    mean = gradient_descent_mse(kern, X, Y, Xt, 30.0, loss="mean")
    summ = gradient_descent_mse(kern, X, Y, Xt, 30.0 / Y.size, loss="sum")
    np.testing.assert_allclose(mean.mean, summ.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mean.covariance, summ.covariance, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [0, 1, 7, 60])
def test_discrete_steps_match_matrix_power(steps):
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    eta = 0.9 / np.linalg.eigvalsh(kern(X).ntk).max()
    pred = gradient_descent_mse(kern, X, Y, Xt, steps, learning_rate=eta, discrete=True)
    Theta, Tc = kern(X).ntk, kern(Xt, X).ntk
    E = np.linalg.matrix_power(np.eye(len(X)) - eta * Theta, steps)
    np.testing.assert_allclose(pred.mean, Tc @ np.linalg.solve(Theta, (np.eye(len(X)) - E) @ Y),
                               rtol=0, atol=1e-9)


def test_discrete_steps_approach_the_flow_as_the_step_shrinks():
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    flow = gradient_descent_mse(kern, X, Y, Xt, 2.0).mean
    errors = []
    for n in (10, 100, 1000):
        d = gradient_descent_mse(kern, X, Y, Xt, n, learning_rate=2.0 / n, discrete=True).mean
        errors.append(np.abs(d - flow).max())
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5   # first order in the step


def test_discrete_infinite_time_needs_a_stable_learning_rate():
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    lam = np.linalg.eigvalsh(kern(X).ntk).max()
    with pytest.raises(ValueError, match="diverges"):
        gradient_descent_mse(kern, X, Y, Xt, np.inf, learning_rate=2.5 / lam, discrete=True)
    with pytest.raises(ValueError, match="steps"):
        gradient_descent_mse(kern, X, Y, Xt, 1.5, discrete=True)
    with pytest.warns(RuntimeWarning, match="diverges"):
        gradient_descent_mse(kern, X, Y, Xt, 3, learning_rate=2.5 / lam, discrete=True)


def test_vector_outputs_are_independent_columns():
    kern = RandomFeatureKernel()
    X, Y, Xt = data(k=3)
    p = Predictor(kern, X, Y)
    both = p.gradient_descent(3.0, Xt)
    for j in range(3):
        one = Predictor(kern, X, Y[:, j]).gradient_descent(3.0, Xt)
        np.testing.assert_allclose(both.mean[:, j], one.mean, rtol=0, atol=1e-12)
        np.testing.assert_allclose(both.covariance, one.covariance, rtol=0, atol=1e-12)


def test_initial_outputs_give_one_networks_linearised_trajectory():
    """f_t(X) = Y + e^{-eta Theta t}(f_0(X) - Y) for a network starting at f_0."""
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    rng = np.random.default_rng(9)
    f0, f0t = rng.standard_normal(len(X)), rng.standard_normal(len(Xt))
    p = Predictor(kern, X, Y, learning_rate=0.3)
    got = p.gradient_descent(4.0, initial=(f0, f0)).mean
    E = scipy.linalg.expm(-0.3 * 4.0 * kern(X).ntk)
    np.testing.assert_allclose(got, Y + E @ (f0 - Y), rtol=0, atol=1e-10)
    np.testing.assert_allclose(p.gradient_descent(0.0, Xt, initial=(f0, f0t)).mean, f0t, atol=0)


# ----------------------------------------------------------------------------- numerics
def test_singular_gram_warns_and_gives_the_pseudo_inverse_limit():
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    X = np.vstack([X, X[:1]])                          # a duplicated input: Theta is singular
    Y = np.append(Y, Y[0])
    with pytest.warns(IllConditionedWarning, match="ill-conditioned"):
        pred = gradient_descent_mse(kern, X, Y, Xt, np.inf)
    Tc = kern(Xt, X).ntk
    np.testing.assert_allclose(pred.mean, Tc @ np.linalg.pinv(kern(X).ntk, rcond=1e-12) @ Y,
                               rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_descent_mse(kern, X, Y, Xt, np.inf, ridge=1e-3)   # a ridge cures it
        gradient_descent_mse(kern, X, Y, Xt, 1.0)                  # so does a finite time


def test_not_psd_warns():
    def bad(X1, X2=None, params=None, diagonal=False):
        n1, n2 = len(X1), len(X1 if X2 is None else X2)
        M = np.ones((n1, n2)) - 2 * np.eye(n1, n2)                 # eigenvalue -2 ... n - 2
        return symntk.KernelResult(M, M, {})
    with pytest.warns(IllConditionedWarning, match="not positive semidefinite"):
        gradient_descent_mse(bad, np.zeros((4, 2)), np.ones(4), covariance=None)


def test_bad_arguments_are_named():
    kern = RandomFeatureKernel()
    X, Y, Xt = data()
    with pytest.raises(ValueError, match="loss"):
        Predictor(kern, X, Y, loss="average")
    with pytest.raises(ValueError, match="rows"):
        Predictor(kern, X, Y[:-1])
    with pytest.raises(ValueError, match="t must be >= 0"):
        Predictor(kern, X, Y).gradient_descent(-1.0)
    with pytest.raises(ValueError, match="training"):
        Predictor(kern, X, Y).gradient_descent(1.0, training="readout")
    with pytest.raises(ValueError, match="ridge"):
        Predictor(kern, X, Y, ridge=-1)
    with pytest.raises(ValueError, match="learning_rate"):
        Predictor(kern, X, Y, learning_rate=0)
    with pytest.raises(TypeError, match="kernel must be"):
        Predictor("relu", X, Y)


# ----------------------------------------------------------------------------- with programs
def test_readout_only_ntk_is_the_nngp_in_ntk_parametrization(relu_kernel):
    """Why training="nngp" means training the readout: its NTK terms (v and b_out) sum to K."""
    X, _, _ = data(n=6, d=4)
    r = relu_kernel(X, terms=True)
    np.testing.assert_allclose(r.ntk_terms["v"] + r.ntk_terms["b_out"], r.nngp, rtol=1e-12)


def test_program_with_symbolic_variances_and_params():
    import sympy as sp
    w = sp.Symbol("sigma_w", positive=True)
    program = symntk.mlp(1, "erf", weight_std=w, bias_std=0.2)
    X, Y, Xt = data(n=8, d=2)
    got = gradient_descent_mse(program, X, Y, Xt, 3.0, params={"sigma_w": 1.3})
    fixed = gradient_descent_mse(symntk.mlp(1, "erf", weight_std=1.3, bias_std=0.2),
                                 X, Y, Xt, 3.0)
    np.testing.assert_allclose(got.mean, fixed.mean, rtol=1e-10)
    np.testing.assert_allclose(got.covariance, fixed.covariance, rtol=1e-10, atol=1e-13)


@settings(deadline=None, max_examples=25)
@given(t=st.floats(0, 50), eta=st.floats(0.01, 3.0), seed=st.integers(0, 10_000))
def test_training_residual_shrinks_monotonically(t, eta, seed):
    """||Y - mu_t(X)|| = ||e^{-eta Theta t} Y|| is non-increasing in t."""
    kern = RandomFeatureKernel(seed=seed % 7)
    X, Y, _ = data(seed=seed)
    p = Predictor(kern, X, Y, learning_rate=eta, max_condition=np.inf)
    r1 = np.linalg.norm(Y - p.gradient_descent(t, covariance=None).mean)
    r2 = np.linalg.norm(Y - p.gradient_descent(t + 1.0, covariance=None).mean)
    assert r2 <= r1 + 1e-9 and r1 <= np.linalg.norm(Y) + 1e-9
