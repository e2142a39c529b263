"""A readout tied to the (activated) input embedding: GIA is wrong, exact mode is right.

e = U xi, x = relu(e), h = W x, f = x^T relu(h) / sqrt(n).  The readout vector x is computed by
the network, so Zdot^{W^T dh} = sigma^2 Z^x E[relu''(h)] E[relu(e)] does not vanish.

Run:  python derivations/tied_readout_embedding.py [--width 2048 --seeds 8]
"""
import sys

import numpy as np

from _gia_vs_exact import arguments, ntk_case
from symntk import examples

if __name__ == "__main__":
    args = arguments(__doc__)
    X = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 1.5]])
    sys.exit(0 if ntk_case(examples.tied_readout_embedding("relu"), X, args.width, args.seeds,
                           args.out) else 1)
