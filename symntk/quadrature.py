"""Quadrature rules for Gaussian expectations without a closed form (TP2 Def. E.1 V-transforms
of activations with no closed form), and the vectorised reference use of them.

The rules (nodes and weights, float64 arrays):

* :func:`hermite_rule`: probabilists' Gauss-Hermite, E f(Z) ~ sum w f(z) for Z ~ N(0, 1);
* :func:`half_rule`: a Gauss rule for the standard normal density on [0, inf) (1-D integrands with
  a kink at 0 are integrated on each side);
* :func:`polar_rule`: a radial Gauss rule for the weight rho exp(-rho^2/2) and Gauss-Legendre on
  the angle (2-D integrands in polar coordinates of the whitened plane, arcs split at kinks).

The compiled kernels receive them as arrays (never callables: Numba could not cache them), in the
order :data:`RULE_ARRAYS`, which is also the order of the generated functions' parameters;
:func:`rule_arrays` builds that tuple from the options :data:`QUADRATURE`.

:func:`gaussian_expectation` is the reference evaluator's E[f(u)] for u ~ N(0, S), S a k x k
covariance given entrywise as arrays (one covariance per input pair): u = S^{1/2} z with z
standard normal, E f(S^{1/2} z) ~ sum_grid w f(S^{1/2} z_grid) on the tensor product of Gauss-
Hermite rules.  The square root comes from an eigendecomposition with negative rounding clipped,
so singular covariances (c = +-1, a zero input) are handled.  Accurate to ~1e-12 for smooth,
polynomially bounded f at the default degree; kinked f converge slowly, which is why kinked
activations have closed forms.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["QUADRATURE", "RULE_ARRAYS", "rule_arrays", "hermite_rule", "half_rule", "polar_rule",
           "DEFAULT_DEGREE", "gaussian_expectation"]

#: Default quadrature orders of the compiled kernels (accuracy: :mod:`symntk.kernels`).
QUADRATURE = {"rule": "polar", "radial_order": 32, "angular_order": 24, "hermite_order": 64,
              "half_order": 48, "kd_order": 16, "mehler": True}

#: The rule arrays in the order the generated functions take them: polar radial nodes/weights,
#: angular nodes/weights, half-line nodes/weights, 2-D Gauss-Hermite, k-D Gauss-Hermite.
RULE_ARRAYS = ("RR", "RW", "AT", "AW", "HR", "HW", "GZ", "GW", "KZ", "KW")


def rule_arrays(options: dict) -> tuple:
    """The arrays named by :data:`RULE_ARRAYS`, in that order, for the orders in ``options``."""
    rr, rw, at, aw = polar_rule(options["radial_order"], options["angular_order"])
    hr, hw = half_rule(options["half_order"])
    gz, gw = hermite_rule(options["hermite_order"])
    kz, kw = hermite_rule(options["kd_order"])
    return (rr, rw, at, aw, hr, hw, gz, gw, kz, kw)


@functools.lru_cache(maxsize=None)
def _radial_gauss(power: int, n: int):
    """Gauss rule for ``int_0^inf f(r) r^power exp(-r^2/2) dr`` (weights sum to the integral of
    the weight).  Lanczos with full reorthogonalisation on a fine discretisation of the weight
    (composite Gauss-Legendre), then Golub-Welsch; moments agree with the exact ones to ~1e-14."""
    if n < 1:
        raise ValueError(f"quadrature order must be >= 1, got {n}")
    R = np.sqrt(2.0 * (2 * n + 40.0)) + 6.0        # the weight beyond R is below e^{-2n-40}
    x, w = np.polynomial.legendre.leggauss(30)
    edges = np.linspace(0.0, R, 2 * n + 61)
    a, b = edges[:-1, None], edges[1:, None]
    X = ((b - a) / 2 * x + (a + b) / 2).ravel()
    W = ((b - a) / 2 * w).ravel() * X ** power * np.exp(-X * X / 2)
    keep = W > 1e-300
    X, W = X[keep], W[keep]
    Q = np.zeros((n, X.size))
    q = np.sqrt(W)
    mu0 = q @ q
    Q[0] = q / np.sqrt(mu0)
    alpha, beta = np.zeros(n), np.zeros(max(n - 1, 0))
    for k in range(n):
        v = X * Q[k]
        alpha[k] = Q[k] @ v
        if k == n - 1:
            break
        v -= alpha[k] * Q[k]
        if k > 0:
            v -= beta[k - 1] * Q[k - 1]
        for _ in range(2):                           # reorthogonalise twice (Lanczos)
            v -= Q[:k + 1].T @ (Q[:k + 1] @ v)
        beta[k] = np.linalg.norm(v)
        Q[k + 1] = v / beta[k]
    J = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    nodes, vecs = np.linalg.eigh(J)
    return np.ascontiguousarray(nodes), np.ascontiguousarray(mu0 * vecs[0] ** 2)


def polar_rule(radial_order: int, angular_order: int):
    """``(RR, RW, AT, AW)``: radial Gauss rule for ``rho exp(-rho^2/2)`` (weights sum to 1) and
    Gauss-Legendre on [0, 1] for the angle (weights sum to 1)."""
    rr, rw = _radial_gauss(1, int(radial_order))
    t, w = np.polynomial.legendre.leggauss(int(angular_order))
    return rr, rw, np.ascontiguousarray((t + 1) / 2), np.ascontiguousarray(w / 2)


def half_rule(order: int):
    """``(HR, HW)``: Gauss rule for the standard normal density on [0, inf) (weights sum to 1/2)."""
    r, w = _radial_gauss(0, int(order))
    return r, w / np.sqrt(2 * np.pi)


@functools.lru_cache(maxsize=None)
def hermite_rule(order: int):
    """``(GZ, GW)``: probabilists' Gauss-Hermite, E f(Z) ~ sum GW f(GZ) for Z ~ N(0, 1)
    (weights sum to 1); exact for polynomials of degree < 2 * order."""
    z, w = np.polynomial.hermite_e.hermegauss(int(order))
    return np.ascontiguousarray(z), np.ascontiguousarray(w / np.sqrt(2 * np.pi))


#: Points per dimension; 2-D expectations use DEFAULT_DEGREE**2 function evaluations per pair.
DEFAULT_DEGREE = {1: 96, 2: 64, 3: 24}


def gaussian_expectation(f, cov: np.ndarray, degree: int | None = None) -> np.ndarray:
    """E f(u), u ~ N(0, cov[..., :, :]); ``f`` maps k arrays to an array; returns shape cov[..., 0, 0]."""
    cov = np.asarray(cov, dtype=np.float64)
    k = cov.shape[-1]
    degree = degree or DEFAULT_DEGREE.get(k, 12)
    vals, vecs = np.linalg.eigh(cov)
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :]     # cov = root root^T
    z, w = hermite_rule(degree)
    grids = np.meshgrid(*([z] * k), indexing="ij")
    weights = np.prod(np.meshgrid(*([w] * k), indexing="ij"), axis=0).ravel()
    Z = np.stack([g.ravel() for g in grids])                           # (k, G)
    U = np.einsum("...ij,jg->...ig", root, Z)                          # (..., k, G)
    fx = f(*[U[..., i, :] for i in range(k)])
    fx = np.broadcast_to(fx, U.shape[:-2] + (Z.shape[1],))
    return fx @ weights
