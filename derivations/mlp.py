"""Worked derivation: the MLP (TP2 Eqs. 6, 8, 9; Jacot et al. 2018).

Run:  python derivations/mlp.py [--out DIR]

Derives the NNGP/NTK recursion of a ReLU MLP under GIA, prints it (plain text and LaTeX), writes a
standalone .tex file, and checks closed forms:
  * TP2 App. E.1: 2 hidden ReLU layers with biases, no readout bias, unit variances:
      Theta(x, x) = 3/4 |x|^2/m + 7/4, so x = (1, 2, 0) gives 3.
  * He-initialised ReLU (sigma_w^2 = 2), no biases: Theta(x, x) = 2(L+1)q (Jacot / NT) and
      (L+1)q (Tensor Programs convention), and reference off-diagonal entries.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import sympy as sp

import symntk

HE_RELU_NTK = {1: [6.666667, 0.0621634, 4.666667], 2: [10.0, 1.1560405, 7.0],
      3: [13.33333, 2.2517982, 9.33333]}


def check(name: str, got, want, rtol: float) -> bool:
    ok = np.allclose(got, want, rtol=rtol)
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {np.round(np.asarray(got, float), 7).tolist()} "
          f"(expected {want})")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    sw, sb = sp.symbols("sigma_w sigma_b", positive=True)
    d = symntk.derive(symntk.mlp(3, "relu", weight_std=sw, bias_std=sb))
    print("== ReLU MLP, depth 3, symbolic sigma_w, sigma_b (Neural Tangents conventions) ==")
    print(d.reduced())
    print("\n== LaTeX ==")
    print(d.latex())
    path = os.path.join(args.out, "mlp_relu.tex")
    with open(path, "w") as fh:
        fh.write(d.latex(standalone=True))
    print(f"\nwrote {path}")

    ok = True
    print("\n== closed forms (TP2 App. E.1; He-initialised ReLU MLP) ==")
    x = np.array([[1.0, 2.0, 0.0]])
    g1 = symntk.derive(symntk.mlp(2, "relu", weight_std=1, bias_std=1, readout_bias=False, input_dim=3))
    ok &= check("TP2 App. E.1 Theta(x,x), x=(1,2,0)", g1.gram(x).ntk[0, 0], 3.0, 1e-12)
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    for L, want in HE_RELU_NTK.items():
        K = symntk.derive(symntk.mlp(L, "relu", weight_std=sp.sqrt(2), input_dim=3)).gram(X).ntk
        ok &= check(f"He ReLU L={L} [xx, xy, yy] Jacot/NT", [K[0, 0], K[0, 1], K[1, 1]], want, 2e-6)
        tp = symntk.derive(symntk.mlp(L, "relu", weight_std=sp.sqrt(2), input_dim=3,
                                      parametrization="tp")).gram(X).ntk
        ok &= check(f"He ReLU L={L} Theta(x,x) TP convention", tp[0, 0], (L + 1) * 5 / 3, 1e-12)
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
