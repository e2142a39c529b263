"""scikit-learn integration (symntk.sklearn_kernel).

scikit-learn has no ``check_estimator`` for kernel objects; these tests run the checks its own
kernel tests make on every kernel (gradient vs finite differences, theta/bounds, clone,
clone_with_theta, get/set_params, equality, repr, diag, pickling, kernel algebra, pairwise_kernels)
and use the kernel in GaussianProcessRegressor, SVC and KernelRidge.
Oracles: central finite differences of the NumPy reference evaluator; the GP prior's own samples;
symntk.predict's posterior for KernelRidge.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import sympy as sp

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone                                         # noqa: E402
from sklearn.gaussian_process import GaussianProcessRegressor          # noqa: E402
from sklearn.gaussian_process.kernels import ConstantKernel, WhiteKernel  # noqa: E402
from sklearn.kernel_ridge import KernelRidge                           # noqa: E402
from sklearn.metrics.pairwise import pairwise_kernels                  # noqa: E402
from sklearn.svm import SVC                                            # noqa: E402

import symntk                                                          # noqa: E402
from symntk.sklearn_kernel import TensorProgramKernel                  # noqa: E402

W, B = sp.symbols("weight_variance bias_variance", positive=True)
VALUES = {"weight_variance": 1.7, "bias_variance": 0.2}


def program(depth=2, act="relu"):
    return symntk.mlp(depth, act, weight_std=sp.sqrt(W), bias_std=sp.sqrt(B))


@pytest.fixture(scope="module")
def relu2():
    return program(2)


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).standard_normal((7, 3)) * np.array([1.0, 0.5, 2.0])


def finite_difference(prog, kind, X, h=1e-5):
    """d K / d log p by central differences of the NumPy evaluator, columns in sklearn's order
    (hyperparameters sorted by name)."""
    d = symntk.derive(prog)
    cols = []
    for name in sorted(VALUES):
        up, down = dict(VALUES), dict(VALUES)
        up[name] *= np.exp(h)
        down[name] *= np.exp(-h)
        cols.append((getattr(d.gram(X, params=up), kind) - getattr(d.gram(X, params=down), kind))
                    / (2 * h))
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("depth, act, kind", [(2, "relu", "nngp"), (2, "relu", "ntk"),
                                             (4, "relu", "ntk"), (2, "erf", "ntk")])
def test_gradient_matches_finite_differences(depth, act, kind, X):
    prog = program(depth, act)
    k = TensorProgramKernel(prog, kind=kind, **VALUES)
    K, G = k(X, eval_gradient=True)
    assert G.shape == K.shape + (2,)
    np.testing.assert_allclose(K, k(X), rtol=1e-7, atol=1e-9)       # compiled vs evaluator
    fd = finite_difference(prog, kind, X)
    assert np.abs(G - fd).max() <= 1e-6 * max(1.0, np.abs(fd).max())


def test_gradient_with_duplicated_inputs_is_finite(relu2, X):
    """Two identical rows have correlation exactly 1, where acos has an infinite slope; the
    chain rule's 0 * inf must come out as the diagonal's value."""
    Xd = np.vstack([X, X[2:3]])
    k = TensorProgramKernel(relu2, kind="ntk", **VALUES)
    _, G = k(Xd, eval_gradient=True)
    assert np.all(np.isfinite(G))
    np.testing.assert_allclose(G[2, -1], G[2, 2], rtol=1e-12)
    np.testing.assert_allclose(G[:-1, :-1], k(X, eval_gradient=True)[1], rtol=1e-12)


def test_gradient_only_for_square_gram(relu2, X):
    with pytest.raises(ValueError, match="Y is None"):
        TensorProgramKernel(relu2, **VALUES)(X, X[:2], eval_gradient=True)


# ----------------------------------------------------------------------------- the protocol
def test_theta_bounds_and_hyperparameters(relu2):
    k = TensorProgramKernel(relu2, **VALUES, weight_variance_bounds=(0.1, 10.0))
    names = [h.name for h in k.hyperparameters]
    assert names == ["bias_variance", "weight_variance"]
    np.testing.assert_allclose(k.theta, np.log([0.2, 1.7]))
    np.testing.assert_allclose(k.bounds, np.log([[1e-5, 1e5], [0.1, 10.0]]))
    assert k.n_dims == 2
    k.theta = np.log([0.5, 3.0])
    assert (k.bias_variance, k.weight_variance) == pytest.approx((0.5, 3.0))
    fixed = TensorProgramKernel(relu2, **VALUES, bias_variance_bounds="fixed")
    assert fixed.n_dims == 1 and fixed.theta == pytest.approx(np.log([1.7]))
    X = np.random.default_rng(1).standard_normal((4, 3))
    assert fixed(X, eval_gradient=True)[1].shape == (4, 4, 1)


def test_clone_params_equality_repr_and_pickle(relu2, X):
    k = TensorProgramKernel(relu2, kind="ntk", **VALUES)
    c = clone(k)
    assert c == k and c is not k and c.get_params() == k.get_params()
    np.testing.assert_array_equal(c(X), k(X))
    t = k.clone_with_theta(np.log([0.3, 2.5]))
    assert t != k and t.weight_variance == pytest.approx(2.5) and k.weight_variance == 1.7
    k2 = clone(k).set_params(weight_variance=2.5, bias_variance=0.3)
    np.testing.assert_allclose(k2(X), t(X), rtol=1e-12)
    assert TensorProgramKernel(relu2, kind="nngp", **VALUES) != k
    assert "weight_variance=1.7" in repr(k) and "ntk" in repr(k)
    p = pickle.loads(pickle.dumps(k))        # programs compare by identity: compare the rest
    assert {n: v for n, v in p.get_params().items() if n != "program"} == \
        {n: v for n, v in k.get_params().items() if n != "program"}
    np.testing.assert_allclose(p(X), k(X), rtol=1e-12)
    with pytest.raises(ValueError, match="Invalid parameter"):
        k.set_params(sigma=1.0)


def test_diag_stationarity_and_pairwise(relu2, X):
    k = TensorProgramKernel(relu2, **VALUES)
    np.testing.assert_allclose(k.diag(X), np.diag(k(X)), rtol=1e-12)
    assert not k.is_stationary() and k.requires_vector_input
    Y = X[:3] + 0.1
    np.testing.assert_allclose(pairwise_kernels(X, Y, metric=k), k(X, Y), rtol=1e-12)
    np.testing.assert_allclose(k(X, Y), k(Y, X).T, rtol=1e-12)


def test_kernel_algebra_with_sklearn_kernels(relu2, X):
    k = TensorProgramKernel(relu2, **VALUES)
    combo = ConstantKernel(2.0) * k + WhiteKernel(0.1)
    K, G = combo(X, eval_gradient=True)
    np.testing.assert_allclose(K, 2.0 * k(X) + 0.1 * np.eye(len(X)), rtol=1e-7)
    assert G.shape == (len(X), len(X), 4)


def test_bad_construction_is_named(relu2):
    with pytest.raises(TypeError, match="missing"):
        TensorProgramKernel(relu2, weight_variance=1.0)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        TensorProgramKernel(relu2, **VALUES, sigma=1.0)
    with pytest.raises(ValueError, match="kind"):
        TensorProgramKernel(relu2, kind="cntk", **VALUES)
    with pytest.raises(ValueError, match="positive"):
        TensorProgramKernel(relu2, weight_variance=-1.0, bias_variance=0.1)(np.ones((2, 3)))


# ----------------------------------------------------------------------------- estimators
def test_gp_fit_recovers_variances_of_its_own_prior(relu2):
    """Draw 30 functions from the NNGP prior with known variances; maximising the marginal
    likelihood from a wrong start recovers them."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((60, 3)) * rng.uniform(0.3, 2.0, (60, 1))
    truth = TensorProgramKernel(relu2, weight_variance=2.0, bias_variance=0.4)
    K = truth(X) + 1e-8 * np.eye(len(X))
    Y = np.linalg.cholesky(K) @ rng.standard_normal((len(X), 30))
    start = TensorProgramKernel(relu2, weight_variance=0.8, bias_variance=1.5)
    gp = GaussianProcessRegressor(start, alpha=1e-8, optimizer="fmin_l_bfgs_b").fit(X, Y)
    fitted = gp.kernel_
    assert fitted.weight_variance == pytest.approx(2.0, rel=0.15)
    assert fitted.bias_variance == pytest.approx(0.4, rel=0.25)
    assert gp.log_marginal_likelihood_value_ >= gp.log_marginal_likelihood(start.theta)


def test_precomputed_kernel_in_svc_and_kernel_ridge(relu2):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((80, 3))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    Xtr, ytr, Xte, yte = X[:60], y[:60], X[60:], y[60:]
    k = TensorProgramKernel(relu2, kind="ntk", **VALUES)
    svc = SVC(kernel="precomputed", C=10.0).fit(k(Xtr), ytr)
    assert svc.score(k(Xte, Xtr), yte) > 0.7                       # chance is ~0.5
    svc_callable = SVC(kernel=k, C=10.0).fit(Xtr, ytr)
    np.testing.assert_array_equal(svc_callable.predict(Xte), svc.predict(k(Xte, Xtr)))
    alpha = 0.1
    kr = KernelRidge(kernel="precomputed", alpha=alpha).fit(k(Xtr), ytr)
    ntk = TensorProgramKernel(relu2, kind="ntk", **VALUES)
    post = symntk.gradient_descent_mse(symntk.derive(relu2), Xtr, ytr.astype(float), Xte,
                                       np.inf, ridge=alpha, params=VALUES, covariance=None)
    np.testing.assert_allclose(kr.predict(ntk(Xte, Xtr)), post.mean, rtol=1e-8, atol=1e-10)
