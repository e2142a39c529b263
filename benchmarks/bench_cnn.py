"""CNTK benchmark: N images of 8x8x3, two SAME ReLU 3x3 conv layers, global average pooling,
Dense(1) readout (NTK parametrization, Neural Tangents' conventions).

Times the compiled symntk kernel (warm: after a first call that loads or compiles the Numba
module) and, in the same process, a vectorised NumPy CNTK of the same conventions that stores
the full N^2 (HW)^2 pixel-pair covariance in blocks of rows (the layout of Neural Tangents'
``kernel_fn``).  Prints times, the ratio, the agreement and the process's peak RSS.

    python benchmarks/bench_cnn.py [N ...]        (default: 200 500)
"""
import resource
import sys
import time

import numpy as np

import symntk


def numpy_cntk(X, block=8):
    """NNGP and NTK of Conv(3x3, SAME) -> ReLU -> Conv -> ReLU -> GAP -> Dense, no biases,
    W_std = 1: the full pixel-pair kernel, vectorised over a block of rows at a time."""
    N, H, W, C = X.shape

    def conv(K):                     # (..., H, W, H, W): zero-pad, 3x3 shared-offset window
        lead = K.ndim - 4
        Kp = np.pad(K, [(0, 0)] * lead + [(1, 1)] * 4)
        out = 0.0
        for di in range(3):
            for dj in range(3):
                out = out + Kp[..., di:di + H, dj:dj + W, di:di + H, dj:dj + W]
        return out / 9

    def relu(K, q1, q2):
        n = np.sqrt(q1 * q2)
        c = np.clip(K / n, -1, 1)
        th = np.arccos(c)
        return n * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)

    Kself = np.einsum("aijc,aklc->aijkl", X, X) / C
    qs = []
    for _ in range(2):
        Kself = conv(Kself)
        q = np.einsum("aijij->aij", Kself)
        qs.append(q)
        Kself = relu(Kself, q[:, :, :, None, None], q[:, None, None, :, :])[0]
    nngp, ntk = np.zeros((N, N)), np.zeros((N, N))
    for a0 in range(0, N, block):
        xa = X[a0:a0 + block]
        K = np.einsum("aijc,bklc->abijkl", xa, X) / C
        T = np.zeros_like(K)
        for q in qs:
            K = conv(K)
            T = conv(T) + K
            q1 = q[a0:a0 + block][:, None, :, :, None, None]
            q2 = q[None, :, None, None, :, :]
            K, dK = relu(K, q1, q2)
            T = T * dK
        cp, tp = K.mean(axis=(2, 3, 4, 5)), T.mean(axis=(2, 3, 4, 5))
        nngp[a0:a0 + block] = cp
        ntk[a0:a0 + block] = cp + tp
    return nngp, ntk


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(sizes):
    k = symntk.derive(symntk.cnn(filter_shape=(3, 3), padding="SAME", readout="gap")).compile()
    rng = np.random.default_rng(0)
    k(rng.standard_normal((4, 8, 8, 3)))        # load / compile once
    print(f"peak RSS after compiling: {peak_rss_mb():.0f} MB")
    for N in sizes:
        X = rng.standard_normal((N, 8, 8, 3))
        t, c = time.perf_counter(), time.process_time()
        r = k(X)
        t_sym, c_sym = time.perf_counter() - t, time.process_time() - c
        print(f"N={N}: symntk {t_sym:.2f} s wall, {c_sym:.2f} s CPU (all threads), "
              f"peak RSS {peak_rss_mb():.0f} MB")
        if N <= 200:
            t, c = time.perf_counter(), time.process_time()
            nngp, ntk = numpy_cntk(X)
            t_np, c_np = time.perf_counter() - t, time.process_time() - c
            err = max(np.abs(r.ntk - ntk).max() / np.abs(ntk).max(),
                      np.abs(r.nngp - nngp).max() / np.abs(nngp).max())
            print(f"N={N}: NumPy (blocked full pixel-pair kernel) {t_np:.2f} s wall, "
                  f"{c_np:.2f} s CPU; ratio {t_np / t_sym:.1f}x wall, {c_np / c_sym:.1f}x CPU; "
                  f"max rel. difference {err:.1e}; "
                  f"peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [500, 200])
