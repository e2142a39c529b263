"""A mean-pooled (all-ones, nonzero-mean) readout: GIA is wrong, exact mode is right.

x^1 = relu(U xi), h = W x^1, f = sum_a relu(h_a) / sqrt(n).  dh = relu'(h) has nonzero mean, so
Zdot^{W^T dh} = sigma^2 Z^{x^1} E[relu''(h)] is not zero.  With an odd activation (erf) the same
network has Zdot = 0 and GIA is exact although the check fails (printed at the end).

Run:  python derivations/mean_pooled_readout.py [--width 2048 --seeds 8]
"""
import sys

import numpy as np

import symntk
from _gia_vs_exact import arguments, ntk_case
from symntk import examples

if __name__ == "__main__":
    args = arguments(__doc__)
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    ok = ntk_case(examples.mean_pooled_readout("relu"), X, args.width, args.seeds, args.out)
    erf = symntk.compare(examples.mean_pooled_readout("erf"), X)
    print(f"\nwith erf instead of relu: Theta_exact - Theta_GIA = {erf.ntk_difference} "
          f"(odd activation: E erf''(h) = 0, no Zdot)")
    sys.exit(0 if ok else 1)
