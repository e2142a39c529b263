"""Infinite-width NNGP and NTK of the simple RNN, written from the paper's formulas in plain NumPy.

An independent reference for tests: it uses no symntk code.  Network (TP2 §6.2.1 Eq. 14,
App. E.2, and the NTK4A notebook ``RNN-NTK.ipynb``), Tensor-Programs ("tp") parametrization, every
omega trained directly, no readout bias:

    h~^t = W s^{t-1} + U xi^t + b,   s^t = phi(h~^t),   s^0 = 0,
    f = v . s^T / sqrt(n)   (LastState)   or   f = v . (1/T) sum_t s^t / sqrt(n)   (AvgPool),

with W = omega_W / sqrt(n), omega_W ~ N(0, var_w); U = omega_U / sqrt(d), omega_U ~ N(0, var_u);
b ~ N(0, var_b); v ~ N(0, var_v).  For two sequences xi (length T) and xi' (length T'):

Forward (TP2 App. E.2):
    Sigma^{t,r} = var_w C^{t-1,r-1} + var_u xi^t . xi'^r / d + var_b,   C^{0,.} = C^{.,0} = 0,
    C^{t,r} = E phi(u) phi(u'),  (u, u') ~ N(0, [[Sigma_xx^{t,t}, Sigma^{t,r}], [., Sigma_x'x'^{r,r}]]).
Backward (the gradient-independence rules, valid here since the readout v is independent):
    D^{h~t,h~r} = E phi'(u) phi'(u') D^{s^t,s^r},
    D^{s^t,s^r} = init^{t,r} + var_w D^{h~(t+1), h~(r+1)}   (second term only if t < T, r < T'),
    init = var_v at (T, T') and 0 elsewhere (LastState), var_v / (T T') everywhere (AvgPool).
NTK (TP convention; the terms of W, U, b and v):
    Theta = sum_{t,r} D^{h~t,h~r} (C^{t-1,r-1} + xi^t . xi'^r / d + 1) + C^{T,T'}  (LastState)
                                                                    or mean_{t,r} C^{t,r} (AvgPool).
NNGP: var_v C^{T,T'} or var_v mean_{t,r} C^{t,r}.

Gaussian expectations in closed form (Williams 1997 for erf; Cho & Saul 2009 for ReLU):
    E erf(u) erf(u') = (2/pi) arcsin(2 S12 / sqrt((1 + 2 S11)(1 + 2 S22))),
    E erf'(u) erf'(u') = (4/pi) / sqrt((1 + 2 S11)(1 + 2 S22) - 4 S12^2),
    E relu(u) relu(u') = sqrt(S11 S22) (sin th + (pi - th) cos th) / (2 pi),  cos th = S12/sqrt(S11 S22),
    E relu'(u) relu'(u') = (pi - th) / (2 pi).
"""
from __future__ import annotations

import numpy as np

__all__ = ["V_PAIRS", "rnn_nngp_ntk"]


def _v_erf(s11, s12, s22):
    return 2 / np.pi * np.arcsin(2 * s12 / np.sqrt((1 + 2 * s11) * (1 + 2 * s22)))


def _v_derf(s11, s12, s22):
    return 4 / np.pi / np.sqrt((1 + 2 * s11) * (1 + 2 * s22) - 4 * s12 ** 2)


def _theta(s11, s12, s22):
    return np.arccos(np.clip(s12 / np.sqrt(s11 * s22), -1.0, 1.0))


def _v_relu(s11, s12, s22):
    th = _theta(s11, s12, s22)
    return np.sqrt(s11 * s22) * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)


def _v_drelu(s11, s12, s22):
    return (np.pi - _theta(s11, s12, s22)) / (2 * np.pi)


#: activation -> (E phi phi, E phi' phi') as functions of (S11, S12, S22)
V_PAIRS = {"erf": (_v_erf, _v_derf), "relu": (_v_relu, _v_drelu)}


def _variances(x, vphi, var_w, var_u, var_b):
    """Sigma^{t,t} of one sequence (only the diagonal of C enters it)."""
    q, c_prev = np.empty(len(x)), 0.0
    for t in range(len(x)):
        q[t] = var_w * c_prev + var_u * x[t] @ x[t] / x.shape[1] + var_b
        c_prev = vphi(q[t], q[t], q[t])
    return q


def _pair(x, y, activation, var_w, var_u, var_b, var_v, readout):
    vphi, vdphi = V_PAIRS[activation]
    T1, T2, d = len(x), len(y), x.shape[1]
    qx, qy = (_variances(z, vphi, var_w, var_u, var_b) for z in (x, y))
    C = np.zeros((T1 + 1, T2 + 1))        # C[t, r] = C^{s^t, s'^r}, row/column 0 = the zero state
    dphi = np.zeros((T1 + 1, T2 + 1))     # E phi'(h~^t) phi'(h~'^r)
    gram = x @ y.T / d
    for t in range(1, T1 + 1):
        for r in range(1, T2 + 1):
            sigma = var_w * C[t - 1, r - 1] + var_u * gram[t - 1, r - 1] + var_b
            C[t, r] = vphi(qx[t - 1], sigma, qy[r - 1])
            dphi[t, r] = vdphi(qx[t - 1], sigma, qy[r - 1])
    Ds = np.zeros((T1 + 2, T2 + 2))       # D^{s^t, s'^r}; index T+1 is past the end (zero)
    Dh = np.zeros((T1 + 2, T2 + 2))       # D^{h~^t, h~'^r}
    for t in range(T1, 0, -1):
        for r in range(T2, 0, -1):
            if readout == "last":
                init = var_v if (t == T1 and r == T2) else 0.0
            else:
                init = var_v / (T1 * T2)
            Ds[t, r] = init + var_w * Dh[t + 1, r + 1]
            Dh[t, r] = dphi[t, r] * Ds[t, r]
    inner = C[:T1, :T2] + gram + 1.0      # C^{t-1, r-1} + xi^t . xi'^r / d + 1 (W, U, b)
    c_out = C[T1, T2] if readout == "last" else C[1:, 1:].mean()
    return var_v * c_out, float((Dh[1:T1 + 1, 1:T2 + 1] * inner).sum() + c_out)


def rnn_nngp_ntk(X1, X2=None, activation="erf", var_w=1.0, var_u=1.0, var_b=0.0, var_v=1.0,
                 readout="last"):
    """(NNGP, NTK) Gram matrices of the simple RNN between the sequences X1 (M1, T1, d) and
    X2 (M2, T2, d) (T1 and T2 may differ; so may the lengths inside a list of sequences)."""
    if activation not in V_PAIRS:
        raise ValueError(f"activation must be one of {sorted(V_PAIRS)}, got {activation!r}")
    if readout not in ("last", "mean"):
        raise ValueError(f"readout must be 'last' or 'mean', got {readout!r}")
    X2 = X1 if X2 is None else X2
    nngp, ntk = np.zeros((len(X1), len(X2))), np.zeros((len(X1), len(X2)))
    for i, x in enumerate(X1):
        for j, y in enumerate(X2):
            nngp[i, j], ntk[i, j] = _pair(np.asarray(x, float), np.asarray(y, float), activation,
                                          var_w, var_u, var_b, var_v, readout)
    return nngp, ntk
