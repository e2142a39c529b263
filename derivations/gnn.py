"""The Graph Neural Tangent Kernel (Du et al. 2019) on synthetic graphs, with a small
classification run.

    h^{l} = relu(W^l AGG(h^{l-1}) ),  AGG(h)_u = sum_{v in N(u) u {u}} h_v,  l = 1, 2,
    f = v . sum_u h^2_u / sqrt(n) + b_out,

weight variance 2 (Du et al.'s c_sigma for ReLU), no hidden biases, Neural Tangents' conventions
otherwise.  The script

1. derives the GNTK and prints the node-pair recursion in LaTeX;
2. draws two families of graphs of 8..14 nodes with the same mean degree, Erdos-Renyi graphs
   (Poisson-like degrees) and Watts-Strogatz small worlds (ring lattices of degree 4 with a few
   edges rewired: nearly constant degree), every node's feature the one-hot code of its degree
   (as Du et al. for graphs without node labels), padded to one node count with node masks;
3. fits kernel regression with the NTK (the infinite-width network trained to convergence on
   the labels +-1, Jacot et al. 2018) on half of them and classifies the other half;
4. checks a few entries against finite-width networks of the same program (width 1024).

Run:  python derivations/gnn.py [--quick]   (about 30 s on 2 cores, most of it compiling)
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import symntk
from symntk.graphs import graph_inputs


def erdos_renyi(rng, p, degree):
    a = np.triu(rng.random((p, p)) < degree / (p - 1), 1)
    return (a + a.T).astype(float)


def small_world(rng, p, degree, rewire=0.1):
    """A ring lattice (each node joined to its degree/2 nearest neighbours on either side) with
    each edge rewired to a random node with probability ``rewire`` (Watts & Strogatz 1998)."""
    a = np.zeros((p, p))
    for u in range(p):
        for k in range(1, degree // 2 + 1):
            v = (u + k) % p
            if rng.random() < rewire:
                v = int(rng.integers(p))
                if v == u or a[u, v]:
                    v = (u + k) % p
            a[u, v] = a[v, u] = 1.0
    return a


DEGREES = 8          # one-hot degree features: 0, 1, ..., 7 and more


def dataset(n_per_family, seed, p_min=8, p_max=14, degree=4):
    """Padded batch (X, A, mask, labels): one-hot degrees on the real nodes."""
    rng = np.random.default_rng(seed)
    graphs, labels = [], []
    for _ in range(n_per_family):
        for label, family in ((1.0, erdos_renyi), (-1.0, small_world)):
            graphs.append(family(rng, int(rng.integers(p_min, p_max + 1)), degree))
            labels.append(label)
    N, P = len(graphs), p_max
    X, A = np.zeros((N, P, DEGREES)), np.zeros((N, P, P))
    mask = np.zeros((N, P), dtype=bool)
    for i, a in enumerate(graphs):
        p = len(a)
        A[i, :p, :p], mask[i, :p] = a, True
        X[i, np.arange(p), np.minimum(a.sum(1), DEGREES - 1).astype(int)] = 1.0
    order = rng.permutation(N)
    return X[order], A[order], mask[order], np.array(labels)[order]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer graphs and seeds")
    args = parser.parse_args(argv)
    program = symntk.gnn(2, "relu", aggregation="sum", readout="sum", weight_std=2 ** 0.5)
    start = time.perf_counter()
    d = symntk.derive(program)
    print(f"== {d!r}, derived in {time.perf_counter() - start:.2f} s")
    print(d.latex())

    n = 20 if args.quick else 40
    X, A, mask, y = dataset(n, seed=2019)
    start = time.perf_counter()
    K = symntk.kernel(program, X, adjacency1=A, mask1=mask)
    print(f"GNTK of {len(X)} graphs in {time.perf_counter() - start:.1f} s (compile included)")
    half = len(X) // 2
    tr, te = slice(0, half), slice(half, None)
    diag = np.sqrt(np.diag(K.ntk))
    ntk = K.ntk / np.outer(diag, diag)           # cosine-normalised: graphs of any size
    alpha = np.linalg.solve(ntk[tr, tr] + 1e-3 * np.eye(half), y[tr])
    pred = np.sign(ntk[te, tr] @ alpha)
    acc = float(np.mean(pred == y[te]))
    print(f"kernel regression with the NTK: test accuracy {acc:.3f} on {len(X) - half} graphs "
          f"(Erdos-Renyi vs small world, trained on {half})")

    # finite-width networks on three graphs cut to their real nodes
    devs = []
    for i in range(3):
        keep = np.flatnonzero(mask[i])
        xi, ai = X[i:i + 1, keep], A[i:i + 1][:, keep][:, :, keep]
        ki = symntk.kernel(program, xi, adjacency1=ai).ntk[0, 0]
        seeds = 2 if args.quick else 4
        e = [symntk.empirical_ntk(program, graph_inputs(xi, ai), width=1024, seed=s).ntk[0, 0]
             for s in range(seeds)]
        devs.append(abs(np.mean(e) - ki) / ki)
        print(f"graph {i} ({len(keep)} nodes): GNTK {ki:.4f}, finite width 1024 mean "
              f"{np.mean(e):.4f} over {seeds} seeds")
    ok = acc >= 0.8 and max(devs) < 0.1
    print("all checks passed" if ok else "FAILED: accuracy below 0.8 or finite width off by "
                                         "more than 10%")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
