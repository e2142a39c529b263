"""Graph NTK benchmark: N random graphs of P nodes (d = 4 Gaussian features per node), Du et al.'s
network (2019): two blocks of sum aggregation (with self loops) -> Dense -> ReLU, sum pooling over
nodes, Dense(1) readout (weight variance 2, no hidden biases, NTK parametrization).

Times the compiled symntk kernel (warm: after a first call that loads or compiles the Numba
module) and, in the same process, a vectorised NumPy GNTK of the same recursion that stores the
full N^2 P^2 node-pair covariance in blocks of rows (as Neural Tangents' ``Aggregate`` layer holds
it).  Prints times, the ratio, the agreement and the process's peak RSS.

    python benchmarks/bench_gnn.py [N [P]]        (default: 200 graphs of 20 nodes)
"""
import resource
import sys
import time

import numpy as np

import symntk

W2 = 2.0


def random_graphs(rng, N, P, density=0.2):
    a = np.triu((rng.random((N, P, P)) < density).astype(float), 1)
    return rng.standard_normal((N, P, 4)), a + a.transpose(0, 2, 1)


def relu(S, q1, q2):
    n = np.sqrt(q1 * q2)
    c = np.clip(S / n, -1.0, 1.0)
    th = np.arccos(c)
    return n * (np.sin(th) + (np.pi - th) * c) / (2 * np.pi), (np.pi - th) / (2 * np.pi)


def numpy_gntk(X, A, depth=2, block=25):
    """NNGP and NTK: AGGREGATE (M = A + I), Dense (W^2 = 2), ReLU per block; sum readout."""
    N, P, d = X.shape
    M = A + np.eye(P)
    eye = np.eye(P, dtype=bool)
    # each graph with itself: the node variances q of every layer
    S = np.einsum("aud,avd->auv", X, X) / d
    qs = []
    for _ in range(depth):
        S = W2 * (M @ S @ M.transpose(0, 2, 1))
        q = np.einsum("auu->au", S)
        qs.append(q)
        S = np.where(eye, q[:, :, None] / 2, relu(S, q[:, :, None], q[:, None, :])[0])
    nngp, ntk = np.zeros((N, N)), np.zeros((N, N))
    for a0 in range(0, N, block):
        rows = slice(a0, a0 + block)
        S = np.einsum("aud,bvd->abuv", X[rows], X) / d
        T = np.zeros_like(S)
        Ma, MbT = M[rows][:, None], M.transpose(0, 2, 1)[None]
        for q in qs:             # M_a S M_b^T for every pair: batched BLAS matrix products
            S = W2 * (Ma @ S @ MbT)
            T = S + W2 * (Ma @ T @ MbT)
            S, dS = relu(S, q[rows][:, None, :, None], q[None, :, None, :])
            T = T * dS
        c, t = S.sum(axis=(2, 3)), T.sum(axis=(2, 3))
        nngp[rows] = W2 * c
        ntk[rows] = W2 * (c + t)         # readout v (variance 2), no output bias
    return nngp, ntk


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(N=200, P=20):
    program = symntk.gnn(2, "relu", aggregation="sum", readout="sum", weight_std=2 ** 0.5,
                         readout_bias=False)
    k = symntk.derive(program).compile()
    rng = np.random.default_rng(0)
    X, A = random_graphs(rng, 4, P)
    k(X, adjacency1=A)                       # load / compile once
    print(f"peak RSS after compiling: {peak_rss_mb():.0f} MB")
    X, A = random_graphs(rng, N, P)
    t, c = time.perf_counter(), time.process_time()
    r = k(X, adjacency1=A)
    t_sym, c_sym = time.perf_counter() - t, time.process_time() - c
    print(f"N={N}, P={P}: symntk {t_sym:.2f} s wall, {c_sym:.2f} s CPU (all threads), "
          f"peak RSS {peak_rss_mb():.0f} MB")
    t, c = time.perf_counter(), time.process_time()
    nngp, ntk = numpy_gntk(X, A)
    t_np, c_np = time.perf_counter() - t, time.process_time() - c
    err = max(np.abs(r.ntk - ntk).max() / np.abs(ntk).max(),
              np.abs(r.nngp - nngp).max() / np.abs(nngp).max())
    print(f"N={N}, P={P}: NumPy (blocked full node-pair kernel) {t_np:.2f} s wall, {c_np:.2f} s "
          f"CPU; ratio {t_np / t_sym:.1f}x wall, {c_np / c_sym:.1f}x CPU; max rel. difference "
          f"{err:.1e}; peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:3]])
