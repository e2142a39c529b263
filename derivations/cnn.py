"""A convolutional network (Novak et al. 2019; Arora et al. 2019), derived, printed, compiled and
held against finite-width networks of the same program.

    h^1 = W^1 * x + b^1,  x^1 = relu(h^1),  h^2 = W^2 * x^1 + b^2,  x^2 = relu(h^2),
    f = v . GAP(x^2) / sqrt(n) + b_out,

3x3 filters, SAME padding, Neural Tangents' conventions (fan-in C_in * 9, input kernel x.x'/C per
pixel pair, NTK parametrization).  The script

1. derives the CNTK and prints the pixel-pair recursion in LaTeX (one equation per rule and
   layer: an index over pixel pairs p, q and one over filter offsets k);
2. evaluates it with the compiled kernel on 8x8x3 images;
3. measures the deviation of the empirical NTK of width-n networks (the finite-width referee
   convolves with real filters) from it for n = 16..256: it shrinks like n^{-1/2}.

Run:  python derivations/cnn.py [--seeds 4]   (about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import symntk


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="networks per width (default 4)")
    args = parser.parse_args(argv)
    program = symntk.cnn(channels=(symntk.WIDTH, symntk.WIDTH), filter_shape=(3, 3),
                         padding="SAME", activation="relu", weight_std=2 ** 0.5, bias_std=0.1,
                         readout="gap")
    start = time.perf_counter()
    d = symntk.derive(program)
    print(f"== {d!r}, derived in {time.perf_counter() - start:.1f} s")
    print(d.latex())
    X = np.random.default_rng(2019).standard_normal((4, 8, 8, 3))
    k = d.compile()(X)
    print("NTK:\n" + np.array2string(k.ntk, precision=5))
    print("NNGP:\n" + np.array2string(k.nngp, precision=5))
    devs = []
    for n in (16, 64, 256):
        errs = []
        for seed in range(args.seeds):
            e = symntk.empirical_ntk(program, X, width=n, seed=seed)
            errs.append(np.linalg.norm(e.ntk - k.ntk) / np.linalg.norm(k.ntk))
        devs.append(np.mean(errs))
        print(f"width {n:4d}: mean relative deviation of the empirical NTK {devs[-1]:.3f}")
    slope = np.polyfit(np.log([16, 64, 256]), np.log(devs), 1)[0]
    print(f"log-log slope {slope:.2f} (expected about -0.5)")
    ok = -0.9 < slope < -0.2 and devs[0] > devs[1] > devs[2]
    print("all checks passed" if ok else "FAILED: the deviation does not shrink like n^{-1/2}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
