"""What a kernel evaluation returns, and the checks on the data it is given.

Shared by the reference evaluator (:mod:`symntk.evaluate`) and the compiled kernels
(:mod:`symntk.kernels`), which do not import each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

__all__ = ["KernelResult", "check_inputs", "check_pair", "squared_distances"]


@dataclass(frozen=True)
class KernelResult:
    """NNGP and NTK Gram matrices (N1, N2); ``ntk_terms`` splits the NTK by parameter."""
    nngp: np.ndarray | None
    ntk: np.ndarray
    ntk_terms: dict


def check_inputs(X, name="X", dim=None) -> np.ndarray:
    """Validate a data matrix: 2-D, finite, float64; a clear error otherwise."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d), got an array of shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {X.shape})")
    if not np.all(np.isfinite(X)):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(f"{name} contains NaN or inf (first at row {bad[0]}, column {bad[1]})")
    if dim is not None and sp.sympify(dim).is_Integer and X.shape[1] != int(dim):
        raise ValueError(f"{name} has {X.shape[1]} features but the program's input dimension is {dim}")
    return X


def check_pair(X1, X2, dim=None) -> tuple[np.ndarray, np.ndarray]:
    """``(X1, X2)`` checked by :func:`check_inputs` (``X2=None``: X1) with as many features."""
    X1 = check_inputs(X1, "X1", dim)
    X2 = X1 if X2 is None else check_inputs(X2, "X2", dim)
    if X2.shape[1] != X1.shape[1]:
        raise ValueError(f"X1 has {X1.shape[1]} features but X2 has {X2.shape[1]}")
    return X1, X2


def squared_distances(X1: np.ndarray, X2: np.ndarray, out: np.ndarray | None = None,
                      dots: np.ndarray | None = None) -> np.ndarray:
    """``||X1[i] - X2[j]||^2 / d`` to rounding, also for (near-)duplicate rows.

    ``|x|^2 + |x'|^2 - 2 x.x'`` (one BLAS call) loses all digits when the rows are close; every
    entry where it is below 1% of ``|x|^2 + |x'|^2`` (at most two digits lost) is recomputed
    from the difference of the rows.  Identical rows give exactly 0.  Works in blocks of rows,
    so the temporaries stay below ~100 kB; ``out`` (N1, N2) is filled in place if given.
    ``dots`` (N1, N2), if given, holds ``X1 @ X2.T`` already (the compiled kernel's staged,
    tiled products): then every entry is a function of its own two rows and its dot product,
    whatever the blocking.
    """
    n1, d = X1.shape
    block = max(1, 8192 // max(1, X2.shape[0]))
    out = np.empty((n1, X2.shape[0])) if out is None else out
    q2 = np.einsum("ij,ij->i", X2, X2)
    for r0 in range(0, n1, block):
        r1 = min(n1, r0 + block)
        A, o = X1[r0:r1], out[r0:r1]
        q1 = np.einsum("ij,ij->i", A, A)
        if dots is None:
            np.matmul(A, X2.T, out=o)
        else:
            o[...] = dots[r0:r1]
        with np.errstate(invalid="ignore", over="ignore"):   # unread lower half of a symmetric
            o *= -2.0                                         # block may hold anything
            scale = q1[:, None] + q2[None, :]
            o += scale
            i, j = np.nonzero(o <= 0.01 * scale)
        if i.size:
            diff = A[i] - X2[j]
            o[i, j] = np.einsum("ij,ij->i", diff, diff)
    out /= d
    return out
