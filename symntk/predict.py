"""Predictions of the infinite-width network: gradient descent on squared loss and the GP posterior.

A network in NTK parametrization trained by gradient descent is, as its widths grow, kernel
gradient descent with the infinite-width NTK at initialization (Jacot et al. 2018; TP2b Thm. 5.3).
On squared loss the training-set outputs move linearly: with Theta = Theta(X, X) and learning
rate eta, gradient flow gives

    f_t(X) - Y = E_t (f_0(X) - Y),          E_t = exp(-eta Theta t)            (sum loss)

and a test input follows the linear model in function space,

    f_t(x) = f_0(x) + A_t(x) (Y - f_0(X)),  A_t(x) = Theta(x, X) Theta^{-1} (I - E_t).

Since f_0 ~ GP(0, K) with K the NNGP kernel (TP1 Cor. 5.5) and the NTK is deterministic, f_t is
Gaussian with (Lee et al. 2019, Eq. 16)

    mu_t(x)        = A_t(x) Y,
    Sigma_t(x, x') = K(x, x') + A_t(x) K(X, X) A_t(x')^T - A_t(x) K(X, x') - K(x, X) A_t(x')^T,

i.e. the covariance of [I, -A_t] (f_0(x), f_0(X)).  Training only the readout (in NTK
parametrization its NTK term is the NNGP: readout weight + output bias) replaces Theta by K
(``training="nngp"``).  ``t = inf`` is kernel regression, mu = Theta(x, X) Theta^{-1} Y.
Full-batch gradient *descent* (discrete steps, ``discrete=True``) has E_s = (I - eta Theta)^s
after s steps, which is what a wide network trained with a finite learning rate follows (TP2b
Thm. 5.3 is stated for discrete steps).

Conventions, all explicit arguments:

* ``loss="sum"`` (default): L = 1/2 sum_i ||f(x_i) - y_i||^2, as in TP2/TP2b;
  ``loss="mean"``: L = 1/(2 N k) sum ||f - Y||^2 over the N k entries of Y (Neural Tangents'
  ``gradient_descent_mse``), i.e. eta is divided by Y.size;
* ``ridge``: Theta + ridge I (resp. K + ridge I) replaces the training Gram matrix in the
  dynamics (kernel ridge regression at t = inf; Neural Tangents' ``diag_reg`` on an absolute scale);
  the prior covariance of f_0(X) stays K(X, X);
* vector outputs: Y of shape (N, k); the k outputs of the infinite-width network are independent
  with the same kernel, so the mean is (M, k) and the covariance (M, M) is shared by all outputs.

Numerics: one symmetric eigendecomposition of the training Gram matrix per (kernel, ridge), never
an explicit inverse.  Theta^{-1}(I - E_t) is the spectral function -expm1(-eta lambda t) / lambda
(finite as lambda -> 0); eigenvalues below ``N * eps * lambda_max`` are treated as exact zeros
(their directions carry no signal: Theta(x, X) v = 0 for a null vector v of a PSD kernel), and an
:class:`IllConditionedWarning` says when the amplification lambda_max * g(lambda) exceeds
``max_condition`` or the matrix is not PSD to working precision.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Prediction", "Predictor", "IllConditionedWarning", "gradient_descent_mse",
           "gp_posterior", "LOSSES", "TRAINING"]

LOSSES = ("sum", "mean")
TRAINING = ("ntk", "nngp")
COVARIANCE = ("full", "diagonal", None)


class IllConditionedWarning(RuntimeWarning):
    """The training Gram matrix is singular or not positive semidefinite to working precision."""


@dataclass(frozen=True)
class Prediction:
    """Mean and covariance of the infinite-width network's outputs on test inputs.

    ``mean`` has the shape of the test targets: (M,) for a 1-D Y, (M, k) for Y of shape (N, k).
    ``covariance`` is (M, M) (``"full"``), (M,) (``"diagonal"``: the variances) or None; it is
    the same for every output column.
    """
    mean: np.ndarray
    covariance: np.ndarray | None
    t: float
    training: str
    discrete: bool = False

    @property
    def variance(self) -> np.ndarray:
        """Var f_t(x) for each test input, shape (M,)."""
        if self.covariance is None:
            raise ValueError("this prediction was made with covariance=None")
        c = self.covariance
        return np.array(c if c.ndim == 1 else np.diag(c))

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(np.maximum(self.variance, 0.0))


# ------------------------------------------------------------------------------- kernels
def _kernel_function(kernel, params, mode) -> Callable:
    """``k(X1, X2=None, diagonal=False) -> KernelResult`` from a Program, a Derivation, a compiled
    kernel, or any callable with the compiled kernel's signature."""
    from .equations import Derivation
    from .program import Program

    if isinstance(kernel, Program):
        from .derivation import derive
        kernel = derive(kernel, mode=mode)
    if isinstance(kernel, Derivation):
        kernel = kernel.kernel_function(stacklevel=3)
    if not callable(kernel):
        raise TypeError("kernel must be a Program, a Derivation, a compiled kernel or a callable "
                        f"k(X1, X2=None, params=None, diagonal=False), got {type(kernel).__name__}")

    def k(X1, X2=None, diagonal=False):
        return kernel(X1, X2, params=params, diagonal=diagonal) if diagonal else \
            kernel(X1, X2, params=params)
    return k


def _targets(Y, n: int) -> tuple[np.ndarray, bool]:
    Y = np.asarray(Y, dtype=np.float64)
    vector = Y.ndim == 1
    if vector:
        Y = Y[:, None]
    if Y.ndim != 2:
        raise ValueError(f"Y_train must have shape (N,) or (N, k), got {Y.shape}")
    if Y.shape[0] != n:
        raise ValueError(f"Y_train has {Y.shape[0]} rows but X_train has {n} examples")
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y_train contains NaN or inf")
    return Y, vector


def _check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def _check_time(t, discrete: bool) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"t must be a number (or numpy.inf), got {t!r}") from None
    if np.isnan(t) or t < 0:
        raise ValueError(f"t must be >= 0 (or inf), got {t}")
    if discrete and np.isfinite(t) and not float(t).is_integer():
        raise ValueError(f"with discrete=True, t counts gradient-descent steps; got {t}")
    return t


# ------------------------------------------------------------------------------- spectra
@dataclass(frozen=True)
class _Spectrum:
    """Eigendecomposition G = V diag(lam) V^T of a (regularised) training Gram matrix."""
    lam: np.ndarray
    V: np.ndarray
    tol: float
    negative: bool

    @classmethod
    def of(cls, G: np.ndarray) -> "_Spectrum":
        G = 0.5 * (G + G.T)
        lam, V = np.linalg.eigh(G)
        top = max(float(np.max(np.abs(lam))), np.finfo(float).tiny)
        tol = G.shape[0] * np.finfo(float).eps * top
        return cls(lam, V, tol, bool(lam.min() < -tol))

    def response(self, eta: float, t: float, discrete: bool) -> np.ndarray:
        """g(lambda) with G^{-1}(I - E_t) = V diag(g) V^T: (1 - e^{-eta lambda t}) / lambda for
        gradient flow, (1 - (1 - eta lambda)^t) / lambda for t steps of gradient descent; 0 on
        eigenvalues below the tolerance (treated as exact zeros)."""
        lam = self.lam
        keep = lam > self.tol
        g = np.zeros_like(lam)
        lk = lam[keep]
        if discrete:
            rate = 1.0 - eta * lk
            if np.isinf(t):
                if np.any(np.abs(rate) >= 1.0):
                    raise ValueError(
                        f"gradient descent with learning rate {eta} diverges or does not converge "
                        f"(eta * lambda_max = {eta * lk.max():.4g} >= 2 or eta * lambda = 0); "
                        "t = inf needs 0 < eta * lambda < 2 for every eigenvalue")
                g[keep] = 1.0 / lk
            else:
                if np.any(rate <= -1.0):
                    warnings.warn(
                        f"gradient descent with learning rate {eta} diverges: eta * lambda_max = "
                        f"{eta * lk.max():.4g} >= 2 (the prediction grows without bound in t)",
                        RuntimeWarning, stacklevel=4)
                # 1 - (1 - eta lam)^t computed as -expm1(t log1p(-eta lam)) when 1 - eta lam > 0
                pos = rate > 0
                out = np.empty_like(lk)
                out[pos] = -np.expm1(t * np.log1p(-eta * lk[pos]))
                out[~pos] = 1.0 - rate[~pos] ** t
                g[keep] = out / lk
        elif np.isinf(t):
            g[keep] = 1.0 / lk
        else:
            g[keep] = -np.expm1(-eta * t * lk) / lk
        return g

    def check(self, g: np.ndarray, eta: float, t: float, max_condition: float, what: str):
        """Warn when the Gram matrix is not PSD, or when the prediction amplifies its errors by
        more than ``max_condition``: lambda_max * g(lambda), where a dropped (numerically zero)
        eigenvalue counts with its exact limit g(0) = eta t (infinite at t = inf)."""
        if self.negative:
            warnings.warn(
                f"the {what} Gram matrix is not positive semidefinite (smallest eigenvalue "
                f"{self.lam.min():.3g}, largest {self.lam.max():.3g}); its negative directions are "
                "dropped. A kernel should be PSD: check the kernel or add ridge=",
                IllConditionedWarning, stacklevel=4)
            return
        top = float(np.max(self.lam))
        dropped = int(np.count_nonzero(self.lam <= self.tol))
        amplification = top * max(float(np.max(g)) if g.size else 0.0,
                                  eta * t if dropped else 0.0)
        if amplification > max_condition:
            detail = (f"{dropped} eigenvalue(s) are zero to working precision and were dropped "
                      "(pseudo-inverse)" if dropped else
                      f"eigenvalues {self.lam.min():.3g} .. {top:.3g}")
            warnings.warn(
                f"the {what} Gram matrix is ill-conditioned: the prediction amplifies errors in "
                f"it by {amplification:.3g} ({detail}); add ridge= or use a finite t",
                IllConditionedWarning, stacklevel=4)


# ------------------------------------------------------------------------------- predictor
class Predictor:
    """Infinite-width predictions of one kernel trained on (X_train, Y_train).

    ``kernel``: a :class:`~symntk.program.Program` (derived in ``mode`` and compiled), a
    :class:`~symntk.derivation.Derivation`, a compiled kernel, or any callable
    ``k(X1, X2=None, params=None, diagonal=False)`` returning an object with ``.nngp`` and ``.ntk``
    (N1, N2) matrices.  ``params`` binds the kernel's free symbols (variances).  ``learning_rate``,
    ``loss`` (``"sum"`` default, or ``"mean"``) and ``ridge`` define the dynamics (module
    docstring).  Gram matrices and eigendecompositions are cached, so many times ``t`` and test
    sets are cheap.
    """

    def __init__(self, kernel, X_train, Y_train, *, params=None, mode: str = "gia",
                 learning_rate: float = 1.0, loss: str = "sum", ridge: float = 0.0,
                 max_condition: float = 1e10):
        _check_choice(loss, LOSSES, "loss")
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
        if not (np.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a non-negative number, got {ridge!r}")
        self._k = _kernel_function(kernel, params, mode)
        self.X_train = np.asarray(X_train, dtype=np.float64)
        if self.X_train.ndim != 2:
            raise ValueError(f"X_train must have shape (N, d), got {self.X_train.shape}")
        self.Y_train, self._vector = _targets(Y_train, self.X_train.shape[0])
        self.learning_rate = float(learning_rate)
        self.loss = loss
        self.ridge = float(ridge)
        self.max_condition = float(max_condition)
        self._train = self._k(self.X_train)
        self._spectra: dict = {}
        self._test_cache: tuple | None = None

    @property
    def eta(self) -> float:
        """The learning rate of the sum-loss dynamics (divided by Y.size for ``loss="mean"``)."""
        return self.learning_rate / (self.Y_train.size if self.loss == "mean" else 1)

    def train_kernel(self, which: str) -> np.ndarray:
        """Theta(X, X) (``"ntk"``) or K(X, X) (``"nngp"``) on the training inputs."""
        _check_choice(which, TRAINING, "training")
        G = getattr(self._train, which)
        if G is None:
            raise ValueError(f"the kernel has no {which.upper()} (e.g. a fixed readout: outputs "
                             "are not a centred GP)")
        return np.asarray(G, dtype=np.float64)

    def _spectrum(self, which: str, ridge: float) -> _Spectrum:
        key = (which, ridge)
        if key not in self._spectra:
            G = self.train_kernel(which)
            self._spectra[key] = _Spectrum.of(G + ridge * np.eye(G.shape[0]))
        return self._spectra[key]

    def _test_blocks(self, X_test, need_test_test: str | None):
        """(k(x, X), k(x, x')) for the test inputs; None means the training inputs."""
        if X_test is None:
            return self._train, (self._train if need_test_test else None)
        X_test = np.asarray(X_test, dtype=np.float64)
        key = (X_test.shape, hash(X_test.tobytes()))
        cache = self._test_cache
        if cache is None or cache[0] != key:
            cache = self._test_cache = (key, self._k(X_test, self.X_train), {})
        cross, tt = cache[1], cache[2]
        if need_test_test and need_test_test not in tt:
            tt[need_test_test] = self._k(X_test, diagonal=need_test_test == "diagonal")
        return cross, tt.get(need_test_test)

    def _prior_cov(self):
        K = self._train.nngp
        if K is None:
            raise ValueError("the covariance needs the NNGP kernel, which this kernel does not "
                             "have (e.g. a fixed readout); use covariance=None")
        return np.asarray(K, dtype=np.float64)

    def _solve(self, which: str, ridge: float, t: float, eta: float, discrete: bool,
               X_test, covariance, initial, what: str, noise: float = 0.0) -> Prediction:
        _check_choice(covariance, COVARIANCE, "covariance")
        spec = self._spectrum(which, ridge)
        g = spec.response(eta, t, discrete)
        spec.check(g, eta, t, self.max_condition, what)
        cross, tt = self._test_blocks(X_test, covariance)
        Kc = np.asarray(getattr(cross, which), dtype=np.float64)      # k(x, X), (M, N)
        A = ((Kc @ spec.V) * g) @ spec.V.T                             # A_t(x), (M, N)
        target = self.Y_train
        offset = 0.0
        if initial is not None:
            f0_train, f0_test = initial
            f0_train = _targets(f0_train, self.Y_train.shape[0])[0]
            m = Kc.shape[0]
            f0_test = np.asarray(f0_test, dtype=np.float64).reshape(m, -1)
            if f0_test.shape[1] != self.Y_train.shape[1] or f0_train.shape != self.Y_train.shape:
                raise ValueError("initial=(f0_train, f0_test) must match Y_train's output count")
            target, offset = self.Y_train - f0_train, f0_test
        mean = A @ target + offset
        if self._vector:
            mean = mean[:, 0]
        cov = None
        if covariance is not None:
            K_XX = self._prior_cov()
            if noise:
                K_XX = K_XX + noise * np.eye(K_XX.shape[0])   # observations y = f_0(X) + noise
            K_cX = np.asarray(cross.nngp, dtype=np.float64)           # K(x, X)
            AK = A @ K_XX
            if covariance == "full":
                cov = np.asarray(tt.nngp, dtype=np.float64) + AK @ A.T - A @ K_cX.T - K_cX @ A.T
                cov = 0.5 * (cov + cov.T)
            else:
                prior = np.asarray(tt.nngp, dtype=np.float64)
                prior = np.diag(prior) if prior.ndim == 2 else prior
                cov = prior + np.einsum("ij,ij->i", AK, A) \
                    - 2 * np.einsum("ij,ij->i", A, K_cX)
        return Prediction(mean, cov, t, which, discrete)

    def gradient_descent(self, t=np.inf, X_test=None, *, training: str = "ntk",
                         discrete: bool = False, covariance: str | None = "full",
                         initial=None) -> Prediction:
        """Mean and covariance of f_t on ``X_test`` (None: the training inputs).

        ``t``: gradient-flow time (``numpy.inf`` for the converged network), or with
        ``discrete=True`` the number of full-batch gradient-descent steps.  ``training="ntk"``
        trains every parameter (kernel Theta), ``"nngp"`` only the readout (kernel K).
        ``covariance``: ``"full"`` (M, M), ``"diagonal"`` (M,) or None.  ``initial=(f0(X_train),
        f0(X_test))`` conditions on one network's initial outputs: the mean is then that
        network's linearised trajectory f_0(x) + A_t(x) (Y - f_0(X)).
        """
        _check_choice(training, TRAINING, "training")
        t = _check_time(t, discrete)
        return self._solve(training, self.ridge, t, self.eta, bool(discrete), X_test, covariance,
                           initial, "NTK" if training == "ntk" else "NNGP")

    def gp_posterior(self, X_test=None, *, noise: float = 0.0,
                     covariance: str | None = "full") -> Prediction:
        """The exact Bayesian posterior of the NNGP prior given Y_train observed with Gaussian
        noise of variance ``noise``:  mu = K(x, X)(K + noise I)^{-1} Y,
        Sigma = K(x, x') - K(x, X)(K + noise I)^{-1} K(X, x')  (Rasmussen & Williams Eq. 2.23-24).
        Its mean equals readout-only training at t = inf with ridge = noise; its covariance
        differs (the noise enters the prior of the observations, not only the dynamics)."""
        if not (np.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a non-negative number, got {noise!r}")
        return self._solve("nngp", float(noise), np.inf, 1.0, False, X_test, covariance, None,
                           "NNGP", noise=float(noise))


def gradient_descent_mse(kernel, X_train, Y_train, X_test=None, t=np.inf, *,
                         training: str = "ntk", learning_rate: float = 1.0, loss: str = "sum",
                         ridge: float = 0.0, discrete: bool = False,
                         covariance: str | None = "full", params=None,
                         mode: str = "gia") -> Prediction:
    """One call: the infinite-width network trained on (X_train, Y_train) by gradient descent on
    squared loss, evaluated at time ``t`` on ``X_test`` (see :class:`Predictor`)."""
    p = Predictor(kernel, X_train, Y_train, params=params, mode=mode, learning_rate=learning_rate,
                  loss=loss, ridge=ridge)
    return p.gradient_descent(t, X_test, training=training, discrete=discrete,
                              covariance=covariance)


def gp_posterior(kernel, X_train, Y_train, X_test=None, *, noise: float = 0.0,
                 covariance: str | None = "full", params=None, mode: str = "gia") -> Prediction:
    """One call: the NNGP posterior (see :meth:`Predictor.gp_posterior`)."""
    p = Predictor(kernel, X_train, Y_train, params=params, mode=mode)
    return p.gp_posterior(X_test, noise=noise, covariance=covariance)
