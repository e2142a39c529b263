"""The precompiled part of Mehler's formula (:mod:`symntk.codegen.mehler`): the Hermite transform
of sampled integrands, one routine for every generated kernel, compiled once per install (Numba's
cache), so that a new architecture does not pay for a parallel loop of its own."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .mehler import COEFF_CHECK, HALF_WIDTH, ORDER, STEP

__all__ = ["hermite_tables", "grid"]


def grid() -> np.ndarray:
    """The nodes ``z_n = n h - Z`` at which the generated code samples ``f(s z)``."""
    n = int(round(2 * HALF_WIDTH / STEP)) + 1
    return np.arange(n) * STEP - HALF_WIDTH


@njit(cache=True, fastmath={"reassoc", "contract"})
def _coefficients(fv, z, w, out):
    """out[:K] = sum_n w_n f(z_n) h_k(z_n) (trapezoid, step h; h_k orthonormal Hermite),
    out[K] the tail envelope (twice the largest of the last 16; inf if the step-2h sums differ by
    more than COEFF_CHECK of the norm or f is not finite), out[K+1] = ||f|| = sqrt(E f^2).
    (Sums reassociated: their order is immaterial at this accuracy.)"""
    K = out.shape[0] - 2
    m = fv.shape[0]
    g = np.empty(m)
    hp = np.zeros(m)
    hc = np.ones(m)
    norm2 = 0.0
    finite = True
    for n in range(m):
        g[n] = fv[n] * w[n]
        norm2 += fv[n] * fv[n] * w[n]
        if not math.isfinite(fv[n]):
            finite = False
    err = 0.0
    env = 0.0
    for k in range(K):
        ev = 0.0
        od = 0.0
        for n in range(0, m, 2):
            ev += g[n] * hc[n]
        for n in range(1, m, 2):
            od += g[n] * hc[n]
        a = ev + od
        out[k] = a
        err = max(err, abs(ev - od))              # step 2h (even nodes) minus step h
        if k >= K - 16:
            env = max(env, abs(a))
        sk, sk1 = math.sqrt(k), math.sqrt(k + 1.0)
        for n in range(m):
            h = (z[n] * hc[n] - sk * hp[n]) / sk1
            hp[n] = hc[n]
            hc[n] = h
    norm = math.sqrt(norm2)
    ok = finite and err <= COEFF_CHECK * norm
    out[K] = 2.0 * env if ok else math.inf
    out[K + 1] = norm


@njit(cache=True, parallel=True)
def hermite_tables(fv, out):
    """``out[i, s] = coefficients of fv[i, s]`` (see :func:`_coefficients`), in parallel over
    inputs; ``fv[i, s, n] = f_s(s_i z_n)`` on :func:`grid`, ``out`` of length ORDER + 2."""
    m = fv.shape[2]
    z = np.empty(m)
    w = np.empty(m)
    for n in range(m):
        z[n] = n * STEP - HALF_WIDTH
        w[n] = STEP / math.sqrt(2.0 * math.pi) * math.exp(-0.5 * z[n] * z[n])
    for i in prange(fv.shape[0]):
        for s in range(fv.shape[1]):
            _coefficients(fv[i, s], z, w, out[i, s])


assert ORDER % 2 == 0        # _mehler's Horner runs in pairs of coefficients
