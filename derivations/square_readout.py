"""A minimal O(1) NTK counterexample to the Simple GIA Check (TP2 Condition 1): exact 3c^2,
GIA 2c^2.

x^1 = U xi, h = W x^1, f = sum_a h_a^2 / (2 sqrt n): the fixed all-ones readout has nonzero mean,
so the Simple GIA Check fails and W^T in backprop is not independent of W.

Run:  python derivations/square_readout.py [--width 2048 --seeds 8]
"""
import sys

import numpy as np

from _gia_vs_exact import arguments, ntk_case
from symntk import examples

if __name__ == "__main__":
    args = arguments(__doc__)
    X = np.array([[1.0], [0.5]])       # d = 1: exact [[3, .75], [.75, .1875]]
    sys.exit(0 if ntk_case(examples.square_readout(), X, args.width, args.seeds, args.out) else 1)
