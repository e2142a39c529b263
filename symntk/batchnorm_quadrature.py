r"""Batch-coupled kernels of ``relu(BatchNorm(h))``: the integrals of TP2 App. E.4 (Eqs. 36-39).

One neuron of a batch ``zeta = (zeta_1..zeta_B) ~ N(0, Sigma)`` is centred, ``y = G zeta``
(``G = I - 11^T/B``), normalised, ``y / sigma`` with ``sigma^2 = |y|^2/B + epsilon``, and passed
through relu.  relu is positively homogeneous, ``relu(y/sigma) = relu(y)/sigma``, and
``sigma^{-p} = Gamma(p/2)^{-1} int_0^inf s^{p/2-1} exp(-s sigma^2) ds`` turns every expectation
into an integral over ``s`` of a *Gaussian* expectation under the tilted covariance

.. math:: \mathbb E[f(y)e^{-s|y|^2}] = \det(I+2sC)^{-1/2}\,\mathbb E_{N(0, K(s))}f,\qquad
          K(s) = C(I+2sC)^{-1},\quad C = G\Sigma G,

(TP2 Eq. 36; for two batches ``D = s I_B (+) t I_B'`` and ``Pi = C(I + 2DC)^{-1}``, Eq. 37).
Here ``C`` is never inverted: with ``C = F F^T`` (eigenvectors of the PSD matrix scaled by the
square roots of the clipped eigenvalues, zero ones included), ``det(I + 2DC) = det(I_r + 2F^T D F)``
and ``Pi = F (I_r + 2F^T D F)^{-1} F^T`` (push-through identity), a solve with a symmetric positive
definite matrix >= I.  This is valid for any rank of ``C``, in particular when the input dimension
is below ``B + B' - 1`` and the joint batch-centred Gram is singular.

The inner Gaussian expectations are closed forms (Cho & Saul 2009; TP2 Fact E.2):
``V = E relu relu^T`` (arc-cosine order 1 / 2), ``S = E step step^T`` (order 0 / 2), and, for the
backward pass, ``R_ij = E[delta(y_i) relu(y_j)] = sqrt(K_ii K_jj - K_ij^2) / (2 pi K_ii)``; with
Gaussian integration by parts (Stein, TP2 Lemma F.4)
``E[step_a relu_j y_b] = K_ba R_aj + K_bj S_aj`` and
``E[y_a y_b relu_i relu_j] = K_ab V_ij + K_ai E[step_i relu_j y_b] + K_aj E[relu_i step_j y_b]``.

NTK: the map ``Theta -> E[J G Theta G' J'^T]`` (J the Jacobian of relu(y/sigma) in y) is the adjoint
of TP2's backward map Delta -> Delta' (Eq. 38/39): accumulating the NTK forward, as Neural
Tangents does, needs it once per layer instead of once per output pair.  Writing
``A = G Theta G'`` and ``M_ia = step_i delta_ia / sigma - relu_i y_a / (B sigma^3)``:

* same batch: ``B int_0^inf delta(u) e^{-u B eps} [A o S - u (P + P^T) + u^2/2 Q] du``;
* two batches: ``sqrt(B B')/pi int int (st)^{-1/2} delta(s,t) e^{-eps(Bs + B't)}
  [A o S - 2t P - 2s P' + 4st Q] ds dt``,

with ``P_ij = E[step_i relu_j (AY)_i]``, ``P'_ij = E[relu_i step_j (A^T Y)_j]``,
``Q_ij = E[relu_i relu_j Y^T A Y]`` (A embedded in the joint index set).

Quadrature: each half line ``(0, inf)`` is mapped by the exp-sinh substitution
``s = exp(pi/2 sinh x)`` to the real line, where the integrand decays double exponentially at both
ends, and the trapezoidal rule converges exponentially in ``1/h`` (Takahasi & Mori 1974).  The
truncation ``|x| <= X_MAX`` keeps ``s`` in ``[e^-50, e^50]`` (tail below 1e-10 even for the slowest
decay ``s^{-3/2}``).  The step is halved until two successive results (the coarse one reuses every
other node) agree to ``tol`` (default 1e-8, relative to the largest entry when it exceeds 1);
that difference is returned as the error estimate.  It is the error of the *coarse* sum: for
exponentially convergent sums the returned finer one is far more accurate (typically 1e-11 when
the estimate is 1e-8; the next halving is what shows it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BNKernels", "forward_single", "forward_cross", "ntk_single", "ntk_cross",
           "relu_moments", "QuadratureError", "TOL"]

TOL = 1e-8
#: eigenvalues below RANK_TOL x the largest are zeros of a singular (batch-centred) Gram
RANK_TOL = 1e-13
#: correlations within NEAR_ONE of +-1 are recomputed from factor rows (see relu_moments)
NEAR_ONE = 1e-10
X_MAX = math.asinh(50.0 / (math.pi / 2))
H_START = 1.0 / 8
H_MIN = 1.0 / 128


class QuadratureError(ArithmeticError):
    """The nested quadrature did not reach its tolerance."""


# ------------------------------------------------------------------ closed inner forms (relu)
def relu_moments(K: np.ndarray, rows: np.ndarray | None = None):
    """``V = E relu(y) relu(y)^T``, ``S = E step step^T``, ``R_ij = E delta(y_i) relu(y_j)`` for
    ``y ~ N(0, K)``, K of shape (..., N, N).  A coordinate of zero variance is 0 (relu(0) = 0,
    step(0) = 0, the finite network's convention).

    ``rows`` (..., N, r) with K = rows rows^T: pairs with |c| > 1 - 1e-10 (duplicate or nearly
    duplicate batch members) are recomputed from the rows, theta = 2 atan2(|e_i - e_j|,
    |e_i + e_j|) with e = row / |row|: arccos(c) would turn the rounding of c into an error of
    sqrt(2 * 1e-16) ~ 1e-8 in theta."""
    d = np.clip(np.einsum("...ii->...i", K), 0.0, None)
    prod = d[..., :, None] * d[..., None, :]
    root = np.sqrt(prod)
    alive = root > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(alive, K / np.where(alive, root, 1.0), 0.0)
    c = np.clip(c, -1.0, 1.0)
    theta = np.arccos(c)
    sine = np.sqrt(np.clip(prod - K * K, 0.0, None))   # sqrt(K_ii K_jj - K_ij^2), no cancellation
    V = (sine + (np.pi - theta) * K) / (2 * np.pi)
    S = np.where(alive, (np.pi - theta) / (2 * np.pi), 0.0)
    if rows is not None:
        N = K.shape[-1]
        flat = np.flatnonzero((np.abs(c) > 1 - NEAR_ONE) & alive)
        if flat.size:
            lead, i, j = flat // (N * N), (flat // N) % N, flat % N
            rf = rows.reshape(-1, N, rows.shape[-1])
            hi, hj = rf[lead, i], rf[lead, j]
            ni = np.sqrt(np.einsum("pk,pk->p", hi, hi))
            nj = np.sqrt(np.einsum("pk,pk->p", hj, hj))
            ok = (ni > 0) & (nj > 0)
            ei = hi / np.where(ok, ni, 1.0)[:, None]
            ej = hj / np.where(ok, nj, 1.0)[:, None]
            dm, dp = ei - ej, ei + ej
            th = 2 * np.arctan2(np.sqrt(np.einsum("pk,pk->p", dm, dm)),
                                np.sqrt(np.einsum("pk,pk->p", dp, dp)))
            flat, th, sn = flat[ok], th[ok], (ni * nj * np.sin(th))[ok]
            kij = K.reshape(-1)[flat]
            theta.reshape(-1)[flat] = th
            sine.reshape(-1)[flat] = sn
            V.reshape(-1)[flat] = (sn + (np.pi - th) * kij) / (2 * np.pi)
            S.reshape(-1)[flat] = (np.pi - th) / (2 * np.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        R = np.where(d[..., :, None] > 0, sine / (2 * np.pi * np.where(
            d[..., :, None] > 0, d[..., :, None], 1.0)), 0.0)
    idx = np.arange(K.shape[-1])
    V[..., idx, idx] = d / 2
    S[..., idx, idx] = np.where(d > 0, 0.5, 0.0)
    R[..., idx, idx] = 0.0
    return V, S, R


def _backward_moments(K, A, V, S, R):
    """``P_ij = E[step_i relu_j (A Y)_i]``, ``P'_ij = E[relu_i step_j (A^T Y)_j]``,
    ``Q_ij = E[relu_i relu_j Y^T A Y]`` for Y ~ N(0, K) (Stein reductions, module docstring)."""
    AK = A @ K                                        # (..., N, N)
    AtK = np.swapaxes(A, -1, -2) @ K
    KAK = K @ AK
    dAK = np.einsum("...ii->...i", AK)
    dAtK = np.einsum("...ii->...i", AtK)
    dKAK = np.einsum("...ii->...i", KAK)
    P = dAK[..., :, None] * R + AK * S
    Rt = np.swapaxes(R, -1, -2)
    P2 = dAtK[..., None, :] * Rt + np.swapaxes(AtK, -1, -2) * S
    inner = np.einsum("...ab,...ab->...", A, K)[..., None, None]
    Q = inner * V + dKAK[..., :, None] * R + dKAK[..., None, :] * Rt + (
        KAK + np.swapaxes(KAK, -1, -2)) * S
    return P, P2, Q


# ------------------------------------------------------------------ quadrature
def _nodes(h: float):
    """exp-sinh nodes s_k and weights w_k (ds = w dx) on the grid x = k h, |x| <= X_MAX."""
    n = int(math.floor(X_MAX / h))
    x = h * np.arange(-n, n + 1)
    s = np.exp(np.pi / 2 * np.sinh(x))
    w = h * np.pi / 2 * np.cosh(x) * s
    return x, s, w


def _nested(evaluate, tol: float, dims: int):
    """Trapezoid sums on finer and finer grids until two agree.  ``evaluate(s, w)`` (dims = 1) or
    ``evaluate(s, ws, t, wt)`` (dims = 2, the tensor grid) returns the weighted sum of the
    integrand; the coarse sum uses every other node (in each axis) of the same grid."""
    h = H_START
    while True:
        x, s, w = _nodes(h)
        even = np.round(x / h).astype(int) % 2 == 0
        if dims == 1:
            full = evaluate(s, w)
            coarse = 2 * evaluate(s[even], w[even])
        else:
            full = evaluate(s, w, s, w)
            coarse = 4 * evaluate(s[even], w[even], s[even], w[even])
        err = float(np.max(np.abs(full - coarse)))
        scale = max(1.0, float(np.max(np.abs(full))))
        if err <= tol * scale:
            return full, err
        if h <= H_MIN:
            raise QuadratureError(f"batchnorm quadrature did not converge: error estimate {err:.2e} "
                                  f"at step {h}")
        h /= 2


def _factor(C: np.ndarray) -> np.ndarray:
    """F with C = F F^T for a symmetric PSD C (eigenvalues clipped at 0; no inversion)."""
    lam, U = np.linalg.eigh((C + C.T) / 2)
    return U * np.sqrt(np.clip(lam, 0.0, None))


def _centering(B: int) -> np.ndarray:
    return np.eye(B) - np.full((B, B), 1.0 / B)


@dataclass(frozen=True)
class BNKernels:
    """Result of one batch-coupled map with its quadrature error estimate."""
    value: np.ndarray
    error: float


def _single_setup(Sigma: np.ndarray):
    B = Sigma.shape[0]
    G = _centering(B)
    C = G @ Sigma @ G
    lam, U = np.linalg.eigh((C + C.T) / 2)
    # rounding-level eigenvalues (the null direction 1 of G, and any other of a rank-deficient
    # batch) are exact zeros: kept at 1e-17 they would act as a further dimension for s > 1e16
    lam = np.where(lam > RANK_TOL * max(lam.max(), 0.0), lam, 0.0)
    return B, G, lam, U


def forward_single(Sigma, epsilon: float = 0.0, tol: float = TOL) -> BNKernels:
    """``E relu(zeta~) relu(zeta~)^T`` for one batch, TP2 Eq. 36:
    ``B int_0^inf e^{-uB eps} det(I + 2uC)^{-1/2} V_relu(K(u)) du``."""
    B, G, lam, U = _single_setup(np.asarray(Sigma, dtype=np.float64))

    def evaluate(u, w):
        den = 1.0 + 2.0 * u[:, None] * lam[None, :]
        rows = U[None] * np.sqrt(lam[None, :] / den)[:, None, :]
        K = rows @ np.swapaxes(rows, 1, 2)
        weight = w * B * np.exp(-u * B * epsilon - 0.5 * np.log(den).sum(axis=1))
        V, _, _ = relu_moments(K, rows)
        return np.einsum("n,nij->ij", weight, V)

    value, err = _nested(evaluate, tol, 1)
    return BNKernels((value + value.T) / 2, err)


def ntk_single(Sigma, Theta, epsilon: float = 0.0, tol: float = TOL) -> BNKernels:
    """``E[J G Theta G J^T]`` for one batch (the same-batch NTK step through relu o BN)."""
    B, G, lam, U = _single_setup(np.asarray(Sigma, dtype=np.float64))
    A = G @ np.asarray(Theta, dtype=np.float64) @ G
    A = (A + A.T) / 2

    def evaluate(u, w):
        den = 1.0 + 2.0 * u[:, None] * lam[None, :]
        rows = U[None] * np.sqrt(lam[None, :] / den)[:, None, :]
        K = rows @ np.swapaxes(rows, 1, 2)
        weight = w * B * np.exp(-u * B * epsilon - 0.5 * np.log(den).sum(axis=1))
        V, S, R = relu_moments(K, rows)
        P, P2, Q = _backward_moments(K, A[None], V, S, R)
        u3 = u[:, None, None]
        f = A[None] * S - u3 * (P + P2) + 0.5 * u3 ** 2 * Q
        return np.einsum("n,nij->ij", weight, f)

    value, err = _nested(evaluate, tol, 1)
    return BNKernels((value + value.T) / 2, err)


def _cross_setup(Xi, Sigma1, Sigma2):
    """The joint batch-centred covariance C of (y, y') as F F^T with F = [[F1, 0], [F2a, F2b]]:
    y = F1 z1, y' = F2a z1 + F2b z2 (z1, z2 standard normal on the ranges: only nonzero
    eigenvalues of the centred Grams are used, nothing singular is inverted)."""
    B1, B2 = Sigma1.shape[0], Sigma2.shape[0]
    G1, G2 = _centering(B1), _centering(B2)
    C11, C22, C12 = G1 @ Sigma1 @ G1, G2 @ Sigma2 @ G2, G1 @ Xi @ G2
    lam1, U1 = np.linalg.eigh((C11 + C11.T) / 2)
    keep = lam1 > RANK_TOL * max(lam1.max(), 0.0)
    lam1, U1 = lam1[keep], U1[:, keep]
    F2a = C12.T @ U1 / np.sqrt(lam1)
    Cc = C22 - F2a @ F2a.T
    lam2, U2 = np.linalg.eigh((Cc + Cc.T) / 2)
    keep2 = lam2 > RANK_TOL * max(np.abs(np.diag(C22)).max(), 0.0)
    F = np.zeros((B1 + B2, len(lam1) + keep2.sum()))
    F[:B1, :len(lam1)] = U1 * np.sqrt(lam1)
    F[B1:, :len(lam1)] = F2a
    F[B1:, len(lam1):] = U2[:, keep2] * np.sqrt(lam2[keep2])
    return B1, B2, G1, G2, F, lam1


def _tilted_grid(F, lam1, B1, s, t):
    """For s (n_s,) and t (n_t,): det(I + 2DC)^{-1/2} (n_s, n_t), Pi = C (I + 2DC)^{-1}
    (n_s, n_t, N, N), D = s I_B1 (+) t I_B2, and rows H with Pi = H H^T.  First the tilt by s,
    exact in the eigenbasis of batch 1: K_s = F_s F_s^T, F_s = F diag(1/sqrt(1 + 2 s lam1), 1);
    then the tilt by t through the eigenpairs (nu, Q) of F_s2^T F_s2 (F_s2: batch 2's rows):
    with Y = F_s Q, Pi = Y diag(1 / (1 + 2 t nu)) Y^T (push-through identity), and
    det = prod(1 + 2 s lam1) prod(1 + 2 t nu).  Every factor is >= 1; nothing is subtracted."""
    r1 = len(lam1)
    d = np.ones((len(s), F.shape[1]))
    d[:, :r1] = 1.0 / (1.0 + 2.0 * s[:, None] * lam1[None, :])
    Fs = F[None] * np.sqrt(d)[:, None, :]                              # (n_s, N, r)
    logdet_s = np.log1p(2.0 * s[:, None] * lam1[None, :]).sum(axis=1)
    F2 = Fs[:, B1:]
    nu, Q = np.linalg.eigh(np.swapaxes(F2, 1, 2) @ F2)
    nu = np.where(nu <= RANK_TOL * np.maximum(nu.max(axis=1, keepdims=True), 0.0), 0.0, nu)
    Y = Fs @ Q                                                         # (n_s, N, r)
    g = 1.0 / (1.0 + 2.0 * t[None, :, None] * nu[:, None, :])         # (n_s, n_t, r)
    rows = Y[:, None] * np.sqrt(g)[:, :, None, :]                      # (n_s, n_t, N, r)
    Pi = rows @ np.swapaxes(rows, 2, 3)
    logdet_t = np.log1p(2.0 * t[None, :, None] * nu[:, None, :]).sum(axis=2)
    return np.exp(-0.5 * (logdet_s[:, None] + logdet_t)), Pi, rows


def _cross_integral(F, lam1, B1, B2, epsilon, tol, integrand):
    """sqrt(B1 B2)/pi int int (st)^{-1/2} det(I + 2DC)^{-1/2} e^{-eps(B1 s + B2 t)} f(s, t, Pi),
    f = integrand(s, t, Pi, rows) of shape (n_s, n_t, B1, B2), chunked over s."""
    pref = math.sqrt(B1 * B2) / math.pi

    def evaluate(s, ws, t, wt):
        out = np.zeros((B1, B2))
        step = max(1, 4096 // len(t))
        for i0 in range(0, len(s), step):
            ss, ww = s[i0:i0 + step], ws[i0:i0 + step]
            det, Pi, rows = _tilted_grid(F, lam1, B1, ss, t)
            weight = (pref * det * np.outer(ww / np.sqrt(ss), wt / np.sqrt(t))
                      * np.exp(-epsilon * (B1 * ss[:, None] + B2 * t[None, :])))
            out += np.einsum("nm,nmij->ij", weight, integrand(ss, t, Pi, rows))
        return out

    return _nested(evaluate, tol, 2)


def forward_cross(Xi, Sigma1, Sigma2, epsilon: float = 0.0, tol: float = TOL) -> BNKernels:
    """``E relu(zeta~) relu(zeta~')^T`` for two batches, TP2 Eq. 37:
    ``sqrt(B B')/pi int int (st)^{-1/2} det(I + 2DC)^{-1/2} V_relu(Pi)_{12} ds dt``."""
    Xi, Sigma1, Sigma2 = (np.asarray(a, dtype=np.float64) for a in (Xi, Sigma1, Sigma2))
    B1, B2, _, _, F, lam1 = _cross_setup(Xi, Sigma1, Sigma2)

    def integrand(s, t, Pi, rows):
        V, _, _ = relu_moments(Pi, rows)
        return V[..., :B1, B1:]

    value, err = _cross_integral(F, lam1, B1, B2, epsilon, tol, integrand)
    return BNKernels(value, err)


def ntk_cross(Xi, Sigma1, Sigma2, Theta, epsilon: float = 0.0, tol: float = TOL) -> BNKernels:
    """``E[J G Theta G' J'^T]`` for two batches (the cross-batch NTK step, adjoint of TP2 Eq. 39)."""
    Xi, Sigma1, Sigma2, Theta = (np.asarray(a, dtype=np.float64)
                                 for a in (Xi, Sigma1, Sigma2, Theta))
    B1, B2, G1, G2, F, lam1 = _cross_setup(Xi, Sigma1, Sigma2)
    N = B1 + B2
    Ahat = np.zeros((N, N))
    Ahat[:B1, B1:] = G1 @ Theta @ G2

    def integrand(s, t, Pi, rows):
        V, S, R = relu_moments(Pi, rows)
        P, P2, Q = _backward_moments(Pi, Ahat, V, S, R)
        s4, t4 = s[:, None, None, None], t[None, :, None, None]
        blk = (Ellipsis, slice(None, B1), slice(B1, None))
        return (Ahat[blk] * S[blk] - 2 * t4 * P[blk] - 2 * s4 * P2[blk]
                + 4 * s4 * t4 * Q[blk])

    value, err = _cross_integral(F, lam1, B1, B2, epsilon, tol, integrand)
    return BNKernels(value, err)
