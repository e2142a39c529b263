"""Matrix-free kernel regression: preconditioned conjugate gradients on blockwise Gram products.

Kernel (ridge) regression with the infinite-width NTK is the t -> inf limit of a wide network
trained by gradient descent on squared loss (Jacot et al. 2018; Lee et al. 2019 Eq. 16 at
t -> inf):

    mu(x) = Theta(x, X) alpha,        (Theta(X, X) + ridge I) alpha = Y,

(``kind="nngp"``: the NNGP K, the GP posterior mean with noise variance ``ridge``).  For N
beyond memory the N x N matrix is never stored: conjugate gradients (Hestenes & Stiefel 1952)
need only products (Theta + ridge I) V, and each product recomputes Theta block by block from
the per-input tables (computed once; :meth:`symntk.kernels.CompiledKernel.tables`), using each
upper-triangle block twice (K_ij V_j and K_ij^T V_i).  Memory: O(N width) tables plus one block.

Preconditioner (``preconditioner=``):

* ``"cholesky"`` (default): a rank-r pivoted Cholesky factor L L^T ~ Theta (greedy on the largest
  remaining diagonal; Harbrecht, Peters & Schneider 2012, Alg. 1; as a CG preconditioner, Gardner
  et al. 2018 Sec. 4), P = L L^T + ridge I, applied by the Woodbury identity
  P^-1 v = (v - L (ridge I + L^T L)^-1 L^T v) / ridge.  It needs r kernel columns (r N entries)
  and removes the r largest directions of the spectrum, which for NTK Gram matrices (a few huge
  eigenvalues, N x the mean kernel) is what slows CG down;
* ``"jacobi"``: the diagonal of Theta + ridge I (the exact diagonal of the tables);
* ``None``: plain CG.

Predictions are streamed: the test inputs go in blocks, each block's tables and its kernel
against the training blocks computed and dropped.  ``progress=True`` shows a progress bar (tqdm
if installed, else a line on stderr).
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .kernels import as_compiled, block_size
from .result import check_inputs

__all__ = ["KernelRegression", "BlockGram", "conjugate_gradients", "pivoted_cholesky",
           "progress_bar", "PRECONDITIONERS"]

PRECONDITIONERS = ("cholesky", "jacobi", None)


# ============================================================================== progress
class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


class _LineBar:
    """A minimal progress line on stderr (when tqdm is not installed)."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self.last = time.monotonic()
        self.post = ""
        self._draw()

    def _draw(self):
        el = time.monotonic() - self.t0
        sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} [{el:.1f} s] {self.post}")
        sys.stderr.flush()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last > 0.2 or self.n >= self.total:
            self.last = now
            self._draw()

    def set_postfix_str(self, s):
        self.post = s

    def close(self):
        if self.n < self.total:
            self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A progress bar with ``update(n)``, ``set_postfix_str(s)`` and ``close()``: tqdm's when it
    is installed, else a plain line on stderr; a no-op when not ``enabled``."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr)


# ============================================================================ the operator
def _bounds(n: int, c: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + c)) for i in range(0, n, c)]


class BlockGram:
    """The Gram matrix of one kind (``"ntk"`` or ``"nngp"``) of a compiled kernel on X, as an
    operator that never stores it: ``matvec(V)``, ``column(p)``, ``cross(X2)`` blocks, and the
    exact ``diagonal``.  Blocks are ``block`` x ``block``; the per-input tables of X are computed
    once (O(N width))."""

    def __init__(self, k, X, *, kind: str = "ntk", params=None, block: int = 2048):
        if kind not in ("ntk", "nngp"):
            raise ValueError(f"kind must be 'ntk' or 'nngp', got {kind!r}")
        if kind == "nngp" and not k.generated.has_nngp:
            raise ValueError("this program has no NNGP kernel; use kind='ntk'")
        self.k, self.kind, self.block = k, kind, block_size(block)
        self.X = check_inputs(X, "X", k._dim)
        self.theta = k.theta(params, self.X.shape[1])
        self.tables = k.tables(self.X, self.theta)
        self.n = self.X.shape[0]
        self.bounds = _bounds(self.n, self.block)
        self.diagonal = np.array(getattr(self.tables, kind))
        self.products = 0                        # matvecs so far (each: N^2/2 kernel entries)

    def _block(self, t1, t2):
        res, bad = self.k.block(t1, t2, self.theta)
        if bad:
            raise FloatingPointError(f"{bad} kernel entries are not finite")
        return getattr(res, self.kind)

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """K V for V of shape (N,) or (N, m): upper-triangle blocks, each used twice."""
        V = np.asarray(V, dtype=np.float64)
        vec = V.ndim == 1
        V2 = V[:, None] if vec else V
        out = np.zeros_like(V2)
        tb = [self.tables.rows(a, b) for a, b in self.bounds]
        for i, (a, b) in enumerate(self.bounds):
            for j in range(i, len(self.bounds)):
                c, d = self.bounds[j]
                Kij = self._block(tb[i], None if i == j else tb[j])
                out[a:b] += Kij @ V2[c:d]
                if j != i:
                    out[c:d] += Kij.T @ V2[a:b]
        self.products += 1
        return out[:, 0] if vec else out

    def column(self, p: int) -> np.ndarray:
        """K[:, p] (N,): one kernel row against all of X, in blocks; exact at p."""
        tp = self.tables.rows(p, p + 1)
        col = np.concatenate([self._block(self.tables.rows(a, b), tp)[:, 0]
                              for a, b in self.bounds])
        col[p] = self.diagonal[p]
        return col

    def cross(self, X2, block: int | None = None):
        """Yield ``(rows, K(X2[rows], X))`` for blocks of rows of X2 (streamed)."""
        X2 = check_inputs(X2, "X_test", self.k._dim)
        if X2.shape[1] != self.X.shape[1]:
            raise ValueError(f"X_test has {X2.shape[1]} features but X_train has {self.X.shape[1]}")
        tb = [self.tables.rows(a, b) for a, b in self.bounds]
        for a, b in _bounds(X2.shape[0], int(block or self.block)):
            t2 = self.k.tables(X2[a:b], self.theta)
            yield slice(a, b), np.hstack([self._block(t2, t) for t in tb])


# ======================================================================= preconditioning
def pivoted_cholesky(op: BlockGram, rank: int, tol: float = 1e-12) -> np.ndarray:
    """L (N, r) with L L^T ~ K: greedy pivoted Cholesky on the largest remaining diagonal
    (Harbrecht, Peters & Schneider 2012, Alg. 1); stops at ``rank`` columns or when the trace of
    the remainder is below ``tol`` times the trace of K.  Needs r columns of K."""
    n = op.n
    rank = max(0, min(int(rank), n))
    d = op.diagonal.astype(np.float64).copy()
    total = float(d.sum())
    L = np.zeros((n, rank))
    for m in range(rank):
        p = int(np.argmax(d))
        if d[p] <= 0 or d.sum() <= tol * total:
            return L[:, :m]
        col = op.column(p) - L[:, :m] @ L[p, :m]
        L[:, m] = col / math.sqrt(d[p])
        d -= L[:, m] ** 2
        d[p] = 0.0
    return L


def _preconditioner(op: BlockGram, kind, ridge: float, rank: int):
    if kind is None:
        return lambda R: R
    if kind == "jacobi":
        dinv = 1.0 / (op.diagonal + ridge)
        return lambda R: R * (dinv[:, None] if R.ndim == 2 else dinv)
    if kind == "cholesky":
        if ridge <= 0:
            raise ValueError("the pivoted-Cholesky preconditioner needs ridge > 0 (P = L L^T + "
                             "ridge I); use preconditioner='jacobi'")
        L = pivoted_cholesky(op, rank)
        import scipy.linalg
        C = scipy.linalg.cho_factor(ridge * np.eye(L.shape[1]) + L.T @ L)

        def apply(R):
            return (R - L @ scipy.linalg.cho_solve(C, L.T @ R)) / ridge
        return apply
    raise ValueError(f"unknown preconditioner {kind!r}; expected one of {PRECONDITIONERS}")


# ==================================================================================== CG
def conjugate_gradients(matvec, B: np.ndarray, precondition=None, *, tol: float = 1e-10,
                        maxiter: int | None = None, progress: bool = False):
    """Solve A X = B (A symmetric positive definite, given by ``matvec``) by preconditioned CG,
    one independent recursion per column of B (Hestenes & Stiefel 1952; Saad 2003, Alg. 9.1).

    Stops when every column's residual ||B - A X|| <= ``tol`` ||B||.  Returns
    ``(X, iterations, history)`` with ``history`` the largest relative residual per iteration
    (the recursive residual; the last one is recomputed from A X).
    """
    B = np.asarray(B, dtype=np.float64)
    vec = B.ndim == 1
    B2 = B[:, None] if vec else B
    M = precondition or (lambda R: R)
    n = B2.shape[0]
    maxiter = 10 * n if maxiter is None else int(maxiter)
    bnorm = np.linalg.norm(B2, axis=0)
    bnorm[bnorm == 0] = 1.0
    X = np.zeros_like(B2)
    R = B2.copy()
    Z = M(R)
    P = Z.copy()
    rz = np.einsum("ij,ij->j", R, Z)
    history = []
    bar = progress_bar(maxiter, "CG", enabled=progress)
    it = 0
    try:
        rel = np.linalg.norm(R, axis=0) / bnorm
        while it < maxiter and rel.max() > tol:
            AP = matvec(P)
            pap = np.einsum("ij,ij->j", P, AP)
            active = rel > tol
            a = np.where(active, rz / np.where(pap > 0, pap, 1.0), 0.0)
            X += P * a
            R -= AP * a
            it += 1
            rel = np.linalg.norm(R, axis=0) / bnorm
            if not rel.max() > tol:
                # confirm on the true residual (the recursive one drifts at the last digits)
                R = B2 - matvec(X)
                rel = np.linalg.norm(R, axis=0) / bnorm
                history.append(float(rel.max()))
                bar.update(1)
                if not rel.max() > tol:
                    break
                Z = M(R)
                P = Z.copy()
                rz = np.einsum("ij,ij->j", R, Z)
                continue
            history.append(float(rel.max()))
            bar.update(1)
            bar.set_postfix_str(f"residual {rel.max():.2e}")
            Z = M(R)
            rz_new = np.einsum("ij,ij->j", R, Z)
            beta = np.where(active, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
            rz = rz_new
            P = Z + P * beta
    finally:
        bar.close()
    if rel.max() > tol:
        import warnings
        warnings.warn(f"CG did not reach tol={tol:g} in {maxiter} iterations (relative residual "
                      f"{rel.max():.3g})", RuntimeWarning, stacklevel=2)
    return (X[:, 0] if vec else X), it, history


# ============================================================================ regression
class KernelRegression:
    """Kernel ridge regression with a derived kernel, never storing the Gram matrix.

    ``KernelRegression(kernel, X_train, Y_train, ridge=..., kind="ntk", params=None,
    block=2048, preconditioner="cholesky", rank=100, tol=1e-10, maxiter=None, progress=False)``

    solves (K(X, X) + ridge I) alpha = Y by preconditioned CG with blockwise recomputed
    products (module docstring); ``ridge`` is required (>= 0; the direct solve of the same system
    is what this equals).  ``kernel``: a Program, a Derivation or a compiled kernel.
    ``predict(X_test)`` streams K(X_test, X) alpha in blocks of test rows.  The mean equals
    :class:`symntk.Predictor`'s at ``t = inf`` with the same ``ridge`` (``training=kind``).

    Attributes: ``alpha`` (N,) or (N, k), ``iterations``, ``residuals`` (per CG iteration),
    ``products`` (Gram-vector products computed, each N^2/2 kernel entries), ``rank`` (of the
    preconditioner).
    """

    def __init__(self, kernel, X_train, Y_train, *, ridge: float, kind: str = "ntk",
                 params=None, block: int = 2048, preconditioner="cholesky", rank: int = 100,
                 tol: float = 1e-10, maxiter: int | None = None, progress: bool = False,
                 mode: str = "gia", **compile_options):
        ridge = float(ridge)
        if not (ridge >= 0 and math.isfinite(ridge)):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"unknown preconditioner {preconditioner!r}; expected one of "
                             f"{PRECONDITIONERS}")
        self.k = as_compiled(kernel, mode=mode, **compile_options)
        self.gram = BlockGram(self.k, X_train, kind=kind, params=params, block=block)
        Y = np.asarray(Y_train, dtype=np.float64)
        if Y.ndim not in (1, 2) or Y.shape[0] != self.gram.n:
            raise ValueError(f"Y_train must have shape ({self.gram.n},) or ({self.gram.n}, k), "
                             f"got {Y.shape}")
        if not np.all(np.isfinite(Y)):
            raise ValueError("Y_train contains NaN or inf")
        self.ridge, self.kind, self.progress = ridge, kind, progress
        M = _preconditioner(self.gram, preconditioner, ridge, rank)
        self.rank = (min(int(rank), self.gram.n) if preconditioner == "cholesky" else 0)

        def matvec(V):
            return self.gram.matvec(V) + ridge * V
        self.alpha, self.iterations, self.residuals = conjugate_gradients(
            matvec, Y, M, tol=tol, maxiter=maxiter, progress=progress)
        self.products = self.gram.products

    def predict(self, X_test, block: int | None = None) -> np.ndarray:
        """mu(x) = K(x, X) alpha for the rows of ``X_test``, in blocks of ``block`` rows."""
        X_test = check_inputs(X_test, "X_test", self.k._dim)
        A = self.alpha[:, None] if self.alpha.ndim == 1 else self.alpha
        out = np.empty((X_test.shape[0], A.shape[1]))
        nblocks = len(_bounds(X_test.shape[0], int(block or self.gram.block)))
        bar = progress_bar(nblocks, "predict", enabled=self.progress)
        try:
            for rows, Kx in self.gram.cross(X_test, block):
                out[rows] = Kx @ A
                bar.update(1)
        finally:
            bar.close()
        return out[:, 0] if self.alpha.ndim == 1 else out
