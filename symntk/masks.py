"""Variable-length sequences passed as one padded batch with a mask.

A batch of sequences of lengths L_1, ..., L_N is one array (N, T, d), T = max L_i, with the tokens
of sequence i in positions 1..L_i and padding after them, and a mask (N, T) that is 1 on the real
tokens and 0 on the padding.  The kernels of a sequence program are those of the *unpadded*
sequences: padded positions take no part in pooling ((1/L_i) sum_{t <= L_i} for a mean, t = L_i
for the last state) nor in the recurrence (a Scan stops at L_i).  Since the recursion over
positions (TP2 Eq. 14) already runs over the real lengths (T and Tbar may differ), the masked Gram
matrix is assembled from blocks of sequences of equal lengths, each computed with its padding cut
off: exact, not an approximation of padding by zeros.

Programs run by the pixel-pair engine with attention (:mod:`symntk.attention`) read the mask
inside the compiled kernel instead (:func:`prepare_tokens`): a padded token is excluded as a key
from every attention (weight 0, the softmax normalised over the real tokens) and from the pooling,
so the mask may be any 0/1 pattern and X1, X2 may hold sequences of different lengths.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .result import KernelResult

__all__ = ["sequence_lengths", "masked_gram", "masked_outputs", "token_mask", "position_mask", "prepare_tokens"]


def sequence_lengths(mask, X, name: str = "mask") -> np.ndarray:
    """The length L_i of every sequence from its mask; a clear error for a mask of the wrong shape,
    values other than 0/1, padding before a token, or a sequence without tokens."""
    X = np.asarray(X)
    if X.ndim != 3:
        raise ValueError(f"a {name} goes with a batch of sequences (N, T, d), got data of shape "
                         f"{X.shape}")
    m = np.asarray(mask)
    if m.shape != X.shape[:2]:
        raise ValueError(f"{name} must have shape (N, T) = {X.shape[:2]} to match the sequences "
                         f"of shape {X.shape}, got shape {m.shape}")
    m = _as_boolean(m, name, "token")
    lengths = m.sum(axis=1)
    if np.any(lengths == 0):
        raise ValueError(f"{name} row {int(np.argmax(lengths == 0))} has no tokens")
    prefix = np.arange(m.shape[1])[None, :] < lengths[:, None]
    if not np.array_equal(m, prefix):
        bad = int(np.argmax(np.any(m != prefix, axis=1)))
        raise ValueError(f"{name} row {bad} is not a prefix of ones: padding must come after the "
                         f"tokens (got {m[bad].astype(int).tolist()})")
    return lengths.astype(int)


def masked_gram(k: Callable, X1, X2=None, mask1=None, mask2=None, **options) -> KernelResult:
    """``k(X1, X2, **options)`` for padded batches with masks: block (a, b) of sequences of
    lengths (L_a, L_b) is ``k`` of those sequences cut to their lengths.  With ``X2=None`` the
    blocks of one length are ``k(Xa)`` (one example with itself on the diagonal)."""
    symmetric = X2 is None
    X1 = np.asarray(X1, dtype=np.float64)
    X2a = X1 if symmetric else np.asarray(X2, dtype=np.float64)
    if symmetric and mask2 is not None:
        raise ValueError("mask2 given without X2")
    L1 = sequence_lengths(mask1, X1, "mask1") if mask1 is not None else np.full(len(X1), X1.shape[1])
    L2 = L1 if symmetric else (sequence_lengths(mask2, X2a, "mask2") if mask2 is not None
                               else np.full(len(X2a), X2a.shape[1]))
    groups1 = {int(L): np.flatnonzero(L1 == L) for L in np.unique(L1)}
    groups2 = groups1 if symmetric else {int(L): np.flatnonzero(L2 == L) for L in np.unique(L2)}
    out: dict = {}
    for a, i1 in groups1.items():
        for b, i2 in groups2.items():
            if symmetric and a == b:
                r = k(X1[i1, :a], None, **options)
            else:
                r = k(X1[i1, :a], X2a[i2, :b], **options)
            for key, value in (("nngp", r.nngp), ("ntk", r.ntk),
                               *((("term", t), v) for t, v in r.ntk_terms.items())):
                if value is None:
                    out.setdefault(key, None)
                    continue
                full = out.get(key)
                if full is None:
                    full = out[key] = np.empty((len(X1), len(X2a)))
                full[np.ix_(i1, i2)] = value
    return KernelResult(out.get("nngp"), out["ntk"],
                        {key[1]: v for key, v in out.items() if isinstance(key, tuple)})


def masked_outputs(f: Callable, X, mask) -> np.ndarray:
    """``f`` (a network, outputs (N,)) of each sequence of a padded batch cut to its length."""
    if mask is None:
        return f(X)
    lengths = sequence_lengths(mask, X)
    out = np.empty(len(X))
    for L in np.unique(lengths):
        idx = np.flatnonzero(lengths == L)
        out[idx] = f(X[idx, :L])
    return out


def _as_boolean(m: np.ndarray, name: str, unit: str) -> np.ndarray:
    """A 0/1 (or boolean) mask as booleans; a clear error for any other value."""
    if m.dtype == bool:
        return m
    if m.dtype.kind not in "biuf" or not np.all((m == 0) | (m == 1)):
        raise ValueError(f"{name} must hold 0/1 (or booleans): 1 for a {unit}, 0 for padding")
    return m.astype(bool)


def position_mask(mask, N: int, P: int, name: str = "mask", unit: str = "token",
                  axis: str = "T", batch: str | None = None) -> np.ndarray:
    """The (N, P) boolean mask over the positions (``unit``: token, node) of N examples, all True
    for None; a clear error for a mask of the wrong shape, values other than 0/1, or an example
    without positions.  Padding may sit anywhere.  ``batch`` describes the examples in the shape
    error (default: "({N} sequences of {P} tokens)")."""
    if mask is None:
        return np.ones((N, P), dtype=bool)
    m = np.asarray(mask)
    if m.shape != (N, P):
        batch = batch or f"sequences ({N} sequences of {P} {unit}s)"
        raise ValueError(f"{name} must have shape (N, {axis}) = {(N, P)} to match the {batch}, "
                         f"got shape {m.shape}")
    m = _as_boolean(m, name, unit)
    empty = ~m.any(axis=1)
    if empty.any():
        raise ValueError(f"{name} row {int(np.argmax(empty))} has no {unit}s")
    return m


def token_mask(mask, N: int, T: int, name: str = "mask") -> np.ndarray:
    """The (N, T) boolean token mask (all True for None): :func:`position_mask` over tokens."""
    return position_mask(mask, N, T, name)


def prepare_tokens(X, mask, name: str = "mask", pointwise: bool = True):
    """For a compiled kernel that reads masks itself: (X with every padded token replaced by the
    sequence's first real token, the token weights (N, T) as floats).  ``X`` is (N, T, 1, d).
    The copy keeps every intermediate value of a padded position finite (a zero token would give
    LayerNorm 0/0); no real position reads it, since attention and pooling weight it by 0."""
    N, T = X.shape[0], X.shape[1] * X.shape[2]
    m = token_mask(mask, N, T, name)
    padded = ~m.all(axis=1)
    if padded.any():
        if not pointwise:
            raise ValueError(f"{name}: padded tokens are exact only in programs whose every Conv "
                             "and AvgPool reads one position (filter 1); a wider window would "
                             "read the padding")
        X = X.copy()
        for n in np.flatnonzero(padded):
            flat = X[n].reshape(T, -1)
            flat[~m[n]] = flat[int(np.argmax(m[n]))]
    return np.ascontiguousarray(X), m.astype(np.float64)
