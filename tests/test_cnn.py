"""Convolutional kernels (CNTK) against a plain NumPy implementation of Neural Tangents'
conventions written here (Novak et al. 2019; Arora et al. 2019), not from symntk's code:

* input kernel x_p . x'_q / C for every pixel pair (p, q);
* Conv(W_std, b_std), fan-in C_in * prod(filter): the kernel is zero- (SAME) or wrap-
  (CIRCULAR) padded along every spatial axis, then summed over filter offsets moving both
  images' pixels together and divided by the full filter size; NTK Theta <- W^2 avg(Theta) +
  (W^2 avg(K) + b^2) (NTK parametrization) or fan_in avg(K) + W^2 avg(Theta) + 1 (standard);
* ReLU / erf duals (Cho & Saul 2009; Williams 1997) with per-image variances;
* AvgPool: the two images' pixels move with separate offsets; GAP: mean over all pixel pairs;
  Flatten: mean over same-pixel pairs; Dense(1) readout with its own bias.
"""
import numpy as np
import pytest

import symntk
from symntk.program import ProgramError

RTOL = 1e-10


# ------------------------------------------------------------------ the NumPy reference
def _pad(K, pads, mode, lead):
    """Pad the spatial axes of a pixel-pair kernel (lead batch axes, then (H, W, H, W))."""
    width = [(0, 0)] * lead + list(pads) * 2
    return np.pad(K, width, mode="wrap" if mode == "CIRCULAR" else "constant")


def _geometry(n, f, s, padding):
    if padding == "VALID":
        return (n - f) // s + 1, (0, 0)
    out = -(-n // s)
    total = max((out - 1) * s + f - n, 0)
    return out, (total // 2, total - total // 2)


def _window(K, filt, strides, padding, lead, shared):
    """sum over offsets of the (H, W, H, W) kernel: shared=True (Conv: one offset for both
    images) or False (AvgPool: independent offsets); not divided."""
    spatial = K.shape[lead:lead + len(filt)]
    geo = [_geometry(n, f, s, padding) for n, f, s in zip(spatial, filt, strides)]
    Kp = _pad(K, [g[1] for g in geo], padding, lead)
    outs = [g[0] for g in geo]
    offsets = list(np.ndindex(*filt))
    pairs = [(k, k) for k in offsets] if shared else [(k, k2) for k in offsets for k2 in offsets]
    total = 0.0
    for k1, k2 in pairs:
        idx = [slice(None)] * lead
        for ks in (k1, k2):
            for d, (kk, s, o) in enumerate(zip(ks, strides, outs)):
                idx.append(slice(kk, kk + s * (o - 1) + 1, s))
        total = total + Kp[tuple(idx)]
    return total


def _dual(act, K, q1, q2, same_pixel):
    if act == "relu":
        c = np.clip(K / np.sqrt(q1 * q2), -1.0, 1.0)
        c = np.where(same_pixel, 1.0, c)
        th = np.arccos(c)
        v = np.sqrt(q1 * q2) / (2 * np.pi) * (np.sin(th) + (np.pi - th) * c)
        dv = (np.pi - th) / (2 * np.pi)
        return v, dv
    a = (1 + 2 * q1) * (1 + 2 * q2)
    v = 2 / np.pi * np.arcsin(2 * K / np.sqrt(a))
    dv = 4 / (np.pi * np.sqrt(a - 4 * K ** 2))
    return v, dv


def reference(X1, X2, layers, readout, wstd=1.0, bstd=None, act="relu", param="ntk",
              widths=None):
    """NNGP and NTK of Conv -> act [-> AvgPool] ... -> GAP|Flatten -> Dense(1), NT conventions.

    Kernels are carried for the pair (N1, N2, *spatial, *spatial) and for each image with itself
    (N, *spatial, *spatial), vectorised, with nothing shared with symntk."""
    rank = X1.ndim - 2
    C = X1.shape[-1]
    sl = "".join("ijkl"[:rank])
    sr = "".join("mnop"[:rank])
    K12 = np.einsum(f"a{sl}c,b{sr}c->ab{sl}{sr}", X1, X2) / C
    K11 = np.einsum(f"a{sl}c,a{sr}c->a{sl}{sr}", X1, X1) / C
    K22 = np.einsum(f"a{sl}c,a{sr}c->a{sl}{sr}", X2, X2) / C
    T12 = np.zeros_like(K12)
    bvar = 0.0 if bstd is None else bstd ** 2
    w2 = wstd ** 2
    c_in = C
    for li, (filt, strides, padding, pool) in enumerate(layers):
        F = np.prod(filt)
        avg = {}
        for name, K, lead in (("12", K12, 2), ("11", K11, 1), ("22", K22, 1), ("T", T12, 2)):
            avg[name] = _window(K, filt, strides, padding, lead, shared=True) / F
        K11, K22 = w2 * avg["11"] + bvar, w2 * avg["22"] + bvar
        nngp = w2 * avg["12"] + bvar
        if param == "ntk":
            T12 = w2 * avg["T"] + nngp
        else:
            T12 = c_in * F * avg["12"] + w2 * avg["T"] + (0.0 if bstd is None else 1.0)
        K12 = nngp
        # the activation, with per-image variances
        P = int(np.prod(K11.shape[1:1 + rank]))
        sp_shape = K11.shape[1:1 + rank]
        q1 = np.einsum("app->ap", K11.reshape(-1, P, P)).reshape((-1,) + sp_shape)
        q2 = np.einsum("app->ap", K22.reshape(-1, P, P)).reshape((-1,) + sp_shape)
        ex = (slice(None),) + (slice(None),) * rank + (None,) * rank
        ey = (slice(None),) + (None,) * rank + (slice(None),) * rank
        eye = np.eye(P, dtype=bool).reshape(sp_shape * 2)
        K11, _ = _dual(act, K11, q1[ex], q1[ey], eye)
        K22, _ = _dual(act, K22, q2[ex], q2[ey], eye)
        v, dv = _dual(act, K12, q1[(slice(None), None) + ex[1:]], q2[(None,) + ey],
                      np.zeros_like(eye))
        K12, T12 = v, dv * T12
        c_in = widths[li] if widths else None
        if pool is not None:
            window, pstrides, ppad = pool
            Fp = np.prod(window) ** 2
            K12 = _window(K12, window, pstrides, ppad, 2, shared=False) / Fp
            T12 = _window(T12, window, pstrides, ppad, 2, shared=False) / Fp
            K11 = _window(K11, window, pstrides, ppad, 1, shared=False) / Fp
            K22 = _window(K22, window, pstrides, ppad, 1, shared=False) / Fp
    P = int(np.prod(K12.shape[2:2 + rank]))
    K = K12.reshape(K12.shape[0], K12.shape[1], P, P)
    T = T12.reshape(K.shape)
    if readout == "gap":
        cp, tp = K.mean(axis=(2, 3)), T.mean(axis=(2, 3))
    else:
        cp = np.einsum("abpp->ab", K) / P
        tp = np.einsum("abpp->ab", T) / P
    nngp = w2 * cp + bvar
    if param == "ntk":
        ntk = w2 * cp + w2 * tp + bvar
    else:
        ntk = widths[-1] * cp + w2 * tp + (0.0 if bstd is None else 1.0)
    return nngp, ntk


# ------------------------------------------------------------------ helpers
def _close(got, want):
    scale = np.abs(want).max()
    assert np.max(np.abs(got - want)) <= RTOL * scale, np.max(np.abs(got - want)) / scale


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(12)
    return rng.standard_normal((3, 5, 6, 2)), rng.standard_normal((2, 5, 6, 2))


def _check(program, layers, readout, X1, X2, **ref):
    k = symntk.derive(program).compile()
    n_ref, t_ref = reference(X1, X2, layers, readout, **ref)
    r = k(X1, X2)
    _close(r.nngp, n_ref)
    _close(r.ntk, t_ref)
    n_ref, t_ref = reference(X1, X1, layers, readout, **ref)
    r = k(X1)
    _close(r.nngp, n_ref)
    _close(r.ntk, t_ref)
    d = k(X1, diagonal=True)
    _close(d.ntk, np.diag(t_ref))


# ------------------------------------------------------------------ tests
def test_2d_same_relu_gap(images):
    X1, X2 = images
    p = symntk.cnn(filter_shape=(3, 2), padding="SAME", bias_std=0.3, weight_std=1.3,
                   readout="gap")
    layers = [((3, 2), (1, 1), "SAME", None)] * 2
    _check(p, layers, "gap", X1, X2, wstd=1.3, bstd=0.3)


def test_2d_paddings_relu_gap(images):
    """SAME (zeros, divided by the full filter), CIRCULAR (wrapped) and VALID layers in one
    network (one compiled kernel)."""
    X1, X2 = images
    pads = ["CIRCULAR", "SAME", "VALID"]
    p = symntk.cnn(channels=(symntk.WIDTH,) * 3, filter_shape=(3, 2), padding=pads,
                   bias_std=0.3, weight_std=1.3, readout="gap")
    layers = [((3, 2), (1, 1), pad, None) for pad in pads]
    _check(p, layers, "gap", X1, X2, wstd=1.3, bstd=0.3)
    with pytest.raises(ValueError, match="does not fit"):
        symntk.derive(p).compile()(X1[:, :2])


def test_flatten_erf_strides(images):
    """A flatten readout without pooling reads same-pixel pairs only (the kernel keeps P entries
    per image pair, not P^2); erf, strides and SAME / VALID layers."""
    X1, X2 = images
    strides = [(2, 1), (1, 1), (1, 2)]
    pads = ["SAME", "SAME", "VALID"]
    filters = [(3, 3), (3, 3), (2, 2)]
    p = symntk.cnn(channels=(symntk.WIDTH,) * 3, filter_shape=filters, activation="erf",
                   strides=strides, padding=pads, bias_std=0.2, readout="flatten")
    assert symntk.derive(p).spatial == "diagonal"
    layers = list(zip(filters, strides, pads, [None] * 3))
    _check(p, layers, "flatten", X1, X2, bstd=0.2, act="erf")


def test_avgpool(images):
    """AvgPool with VALID (stride 2), SAME and CIRCULAR windows (stride 1) after three layers."""
    X1, X2 = images
    pools = [((2, 2), (1, 1), "SAME"), ((2, 2), (1, 1), "CIRCULAR"), ((2, 2), (2, 2), "VALID")]
    p = symntk.cnn(channels=(symntk.WIDTH,) * 3, filter_shape=(2, 3), pool=pools, bias_std=0.5,
                   readout="flatten")
    layers = [((2, 3), (1, 1), "SAME", pool) for pool in pools]
    assert symntk.derive(p).spatial == "full"           # pooling mixes pixels
    _check(p, layers, "flatten", X1, X2, bstd=0.5)


def test_1d():
    rng = np.random.default_rng(1)
    X1, X2 = rng.standard_normal((3, 7, 2)), rng.standard_normal((2, 7, 2))
    p = symntk.cnn(filter_shape=3, padding=["SAME", "CIRCULAR"], strides=[1, 2], bias_std=0.2)
    layers = [((3,), (1,), "SAME", None), ((3,), (2,), "CIRCULAR", None)]
    _check(p, layers, "gap", X1, X2, bstd=0.2)


def test_standard_parametrization_symbolic_variance(images):
    import sympy as sp
    X1, X2 = images
    widths = (4, 6)
    sw = sp.Symbol("sigma_w", positive=True)
    p = symntk.cnn(channels=widths, filter_shape=(2, 2), bias_std=0.4, weight_std=sw,
                   parametrization="standard")
    layers = [((2, 2), (1, 1), "SAME", None)] * 2
    k = symntk.derive(p).compile()
    for A, B in ((X1, X2), (X1, None)):     # None: the symmetric path, exact diagonal
        n_ref, t_ref = reference(A, A if B is None else B, layers, "gap", wstd=1.1, bstd=0.4,
                                 param="standard", widths=widths)
        r = k(A, B, params={"sigma_w": 1.1})
        _close(r.nngp, n_ref)
        _close(r.ntk, t_ref)
    with pytest.raises(ValueError, match="sigma_w"):
        k(X1, X2)


def test_latex_prints_the_recursion_once_per_layer():
    d = symntk.derive(symntk.cnn(filter_shape=(3, 3), bias_std=0.1))
    tex = d.latex()
    assert tex.count(r"\sum_{k \in [3\times3]}") == 2 + 2 + 1   # Sigma, Theta per conv layer
    assert "global average pooling" in tex


def test_bad_inputs(images):
    X1, _ = images
    k = symntk.derive(symntk.cnn(filter_shape=(3, 2), padding="SAME", bias_std=0.3,
                                 weight_std=1.3, readout="gap")).compile()
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        k(X1[0])
    bad = X1.copy()
    bad[0, 1, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k(bad)
    with pytest.raises(ValueError, match="shape"):
        k(X1, X1[:, :4])
    with pytest.raises(ProgramError, match="filter size"):
        x = symntk.Input("x", 3, positions=("h", "w"))
        symntk.Conv(symntk.Weight("W", fan_in=3), x, (3, 3))
    with pytest.raises(ProgramError, match="padding"):
        symntk.cnn(padding="REFLECT")


def test_finite_width_monte_carlo(images):
    """Width-128 networks of the same program (the finite referee convolves with real filters,
    backpropagates, and contracts the shared-filter gradients over positions): the mean
    empirical NTK and E f f' agree with the derived kernels within 3 standard errors."""
    X1, _ = images
    X = X1[:, :4, :4]
    p = symntk.cnn(filter_shape=(3, 2), padding="SAME", bias_std=0.3, weight_std=1.3,
                   readout="gap")
    net = symntk.sample(p, 6, seed=3, input_dim=2)
    _close(net.ntk(X).ntk, net.ntk(X, method="jacobian").ntk)   # structured == Jacobian
    mc = symntk.monte_carlo(p, X, width=128, n_samples=16, seed=5)
    k = symntk.derive(p).compile()(X)
    assert np.all(np.abs(mc.ntk_mean - k.ntk) <= 3 * mc.ntk_sem)
    assert np.all(np.abs(mc.nngp_mean - k.nngp) <= 3 * mc.nngp_sem)
