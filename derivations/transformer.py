"""NTK4A's Transformer (TP2 App. E.5), derived, printed, evaluated and held against finite-width
networks of the same program.

At every token i and layer l = 1..L:

    k = U x,  y = Attn(k) + k,  z = LN(y),  h = W2 relu(W1 z),  x = LN(h + z),
    f = (1/T) sum_i v . x^L_i / sqrt(n),

attention with queries = keys = values = k and logits k_i . k_j / n (softmax), LayerNorm without
eps, no biases; U ~ sigma_u^2 / fan_in, W1, W2 ~ sigma_w^2 / n, v ~ sigma_v^2, every entry trained
(the TP convention of NTK4A's notebook).  The script, for depth 1 and 2 and sigma_u^2 in {1, 2}:

1. derives the program and prints the token-pair recursion in LaTeX (depth 1);
2. evaluates the NTK with the compiled kernel and with TP2 App. E.5's vectorised formulas in
   NumPy (:func:`symntk.attention.ntk4a_vectorised`); they must agree to 1e-10;
3. measures the deviation of the empirical NTK of width-n networks (real softmax attention,
   LayerNorm with centring) from it, n = 64..4096 (``--quick``: 64..512), slope -1/2 expected,
   and writes ``derivations/out/transformer_convergence.png``.

Where NTK4A's notebook differs.  Its ``getkers`` propagates the backward kernel through the
first linear map of a block as ``Dxs += [vu**2 * Dks[-1]]``, with ``vu`` the *variance*
sigma_u^2 of U.  Backpropagating through k = U x multiplies the cotangent by U^T, whose entries
have variance sigma_u^2 / n, so D^{x^{l-1}} = sigma_u^2 D^{k^l}: the notebook's factor is
sigma_u^4.  At its default vu = 1 the two agree, which is why its figure is unaffected; at
sigma_u^2 = 2 the depth-2 NTK differs by tens of per cent (printed below), and the finite-width
networks agree with sigma_u^2, not with sigma_u^4.  At depth 1 the factor multiplies nothing
(no layer below U^1), so only depth >= 2 shows it.

Run:  python derivations/transformer.py [--quick] [--seeds 4] [--out DIR]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import sympy as sp

import symntk
from symntk.attention import ntk4a_vectorised, transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 64..512, 3 seeds")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per width (default 4)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "derivations" / "out")
    args = parser.parse_args(argv)
    max_log2, seeds = (9, 3) if args.quick else (12, args.seeds)

    rng = np.random.default_rng(2020)
    d, T = 3, 5                                  # NTK4A: RGB pixels as tokens
    X = rng.standard_normal((3, T, d))
    ok = True
    records = []
    for depth in (1, 2):
        program = transformer(depth, sigma_u2=sp.Symbol("sigma_u2", positive=True))
        derivation = symntk.derive(program)
        if depth == 1:
            print(f"== depth 1: {len(derivation.equations)} equations; "
                  f"{symntk.gia_check(program)}")
            print(derivation.latex())
        kernel = derivation.compile()
        for su2 in (1.0, 2.0):
            start = time.perf_counter()
            r = kernel(X, params={"sigma_u2": su2})
            nngp, ntk = ntk4a_vectorised(X, depth, su2)
            _, bug = ntk4a_vectorised(X, depth, su2, sigma_u_power=2)
            err = max(np.abs(r.ntk - ntk).max() / np.abs(ntk).max(),
                      np.abs(r.nngp - nngp).max() / np.abs(nngp).max())
            print(f"\n== depth {depth}, sigma_u^2 = {su2:g} "
                  f"[{time.perf_counter() - start:.2f} s]\nNTK:\n"
                  f"{np.array2string(r.ntk, precision=6)}")
            print(f"compiled kernel vs vectorised NumPy formulas: max relative difference "
                  f"{err:.1e}")
            print(f"NTK4A's sigma_u^4 variant differs by up to "
                  f"{np.abs(bug / ntk - 1).max():.2%}")
            ok &= err < 1e-10
            widths = 2 ** np.arange(6, max_log2 + 1)
            start = time.perf_counter()
            record = symntk.convergence(transformer(depth, sigma_u2=su2), X, widths, seeds,
                                        reference=r.ntk,
                                        label=f"depth {depth}, sigma_u^2 = {su2:g}")
            print(record.table())
            print(f"[{time.perf_counter() - start:.1f} s] slope {record.slope:+.3f} "
                  f"+- {record.slope_stderr:.3f} (CLT rate -1/2)")
            ok &= -0.85 <= record.slope <= -0.25
            records.append(record)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "transformer_convergence.png"
    try:
        symntk.plot_convergence(records, path, title=f"NTK4A Transformer (ReLU), {len(X)} "
                                                     f"sequences of {T} tokens, {seeds} seeds")
        print(f"figure written to {path}")
    except ImportError as exc:
        print(f"no figure: {exc}")
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
