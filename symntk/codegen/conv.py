"""Numba kernels for convolutional derivations (:mod:`symntk.convolution`).

The generated module has three functions:

* ``body(x1, x2, same, theta, dims, <tables>, <scratch>, res)``: the pixel-pair recursion of one
  image pair, step by step, in the given scratch arrays: (H, W, H, W) per family for all pixel
  pairs (``full``), (H, W) for same pixels only (``diagonal``, a flatten readout without
  average pooling).  Window sums over filter offsets run axis by axis (a Conv's shared offset
  moves both images' pixels together; AvgPool's two offsets move them separately), zero outside
  the image for SAME, wrapped for CIRCULAR.  With ``same`` (an image with itself) it also writes
  the image's per-pixel tables: the variances q_p = Sigma_{p,p}(xi, xi) of every Gaussian a
  nonlinearity reads, and the subexpressions of the closed forms that depend on one image only
  (sqrt(q), 1/sqrt(1 + 2q), ...), hoisted out of the pixel-pair loops; a pixel with itself uses
  the one-variance closed forms (exact at correlation 1).
* ``selfpass(X, ...)``: ``prange`` over images, ``body(x, x, same=True)``: the tables and the
  Gram diagonal, once per image.
* a fixed map over positions (``Aggregate``, kind "mix") reads the two examples' matrices
  ``g1[k]``, ``g2[k]`` (k: the k-th mix step; (P, P) each, already normalised by the driver) and
  writes C = g1 C^x g2^T (and Theta) through one (P, P) scratch matrix: two passes of P^2 times
  the number of nonzero entries of a graph's matrix (zeros are skipped: graphs are sparse);
* ``pairs(X1, X2, ...)``: ``prange`` over rows; each thread allocates its scratch once and reuses
  it for every column (the upper triangle when X2 is X1).  Nothing of size N^2 P^2 exists.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..convolution import Q, Q1, Q2, S12, ConvDerivation

__all__ = ["compile_conv", "ConvKernel", "STEP_EMITTERS"]

CODEGEN_VERSION = "c2"

#: Step kinds emitted by other modules: kind -> an object with ``emit(out, i, step, steps, full,
#: printer)`` (writes the step's lines of ``body``; ``same`` is True on an image's pass with
#: itself, when the step fills its per-image table ``ha{i}``, read back as ``hb{i}`` for the
#: second image), ``scratch`` (extra per-thread arrays ``<name>{i}``, shaped like C) and
#: ``width`` (table columns; None: one per position); optionally ``masked = True``: the step reads
#: the per-position weights ``w1``/``w2`` (1 on a real position, 0 on padding), so the kernel
#: takes ``mask1``/``mask2``.
STEP_EMITTERS: dict = {}

_WINDOWS = '''

@njit(cache=CACHE)
def _tap(o, d, s, pad, n, circ):
    i = s * o + d - pad
    if circ:
        return i % n
    if i < 0 or i >= n:
        return -1
    return i


@njit(cache=CACHE)
def _win_pair0(src, dst, f, s, pad, circ):
    """dst[o1, j, o3, l] = sum_d src[s o1 + d - pad, j, s o3 + d - pad, l] (one offset d for
    both images: a Conv's filter tap along axis 0)."""
    n, W, Ho = src.shape[0], src.shape[1], dst.shape[0]
    dst[:] = 0.0
    for o1 in range(Ho):
        for o3 in range(Ho):
            for d in range(f):
                i1 = _tap(o1, d, s, pad, n, circ)
                i3 = _tap(o3, d, s, pad, n, circ)
                if i1 < 0 or i3 < 0:
                    continue
                for j in range(W):
                    for l in range(W):
                        dst[o1, j, o3, l] += src[i1, j, i3, l]


@njit(cache=CACHE)
def _win_pair1(src, dst, f, s, pad, circ):
    """dst[i, o2, k, o4] = sum_d src[i, s o2 + d - pad, k, s o4 + d - pad] (axis 1)."""
    H, n, Wo = src.shape[0], src.shape[1], dst.shape[1]
    dst[:] = 0.0
    for d in range(f):
        # the outputs o whose tap s o + d - pad lies inside: one contiguous range (no branch in
        # the inner loop); CIRCULAR wraps every tap
        lo, hi = 0, Wo
        if not circ:
            lo = max(0, -((d - pad) // s))
            hi = min(Wo, (n - 1 - d + pad) // s + 1)
        for i in range(H):
            for k in range(H):
                for o2 in range(Wo):
                    j = _tap(o2, d, s, pad, n, circ)
                    if j < 0:
                        continue
                    if circ:
                        for o4 in range(Wo):
                            dst[i, o2, k, o4] += src[i, j, k, (s * o4 + d - pad) % n]
                    else:
                        for o4 in range(lo, hi):
                            dst[i, o2, k, o4] += src[i, j, k, s * o4 + d - pad]


@njit(cache=CACHE)
def _win_axis0(src, dst, f, s, pad, circ):
    """dst[o, ...] = sum_d src[s o + d - pad, ...] over the leading axis (one image's pixel:
    an average pooling window moves each image's pixel on its own)."""
    n, Ho = src.shape[0], dst.shape[0]
    A, B, C = src.shape[1], src.shape[2], src.shape[3]
    dst[:] = 0.0
    for o in range(Ho):
        for d in range(f):
            i = _tap(o, d, s, pad, n, circ)
            if i < 0:
                continue
            for a in range(A):
                for b in range(B):
                    for c in range(C):
                        dst[o, a, b, c] += src[i, a, b, c]


@njit(cache=CACHE)
def _win_diag0(src, dst, f, s, pad, circ):
    """Same pixels only: dst[o, j] = sum_d src[s o + d - pad, j]."""
    n, W, Ho = src.shape[0], src.shape[1], dst.shape[0]
    dst[:] = 0.0
    for o in range(Ho):
        for d in range(f):
            i = _tap(o, d, s, pad, n, circ)
            if i < 0:
                continue
            for j in range(W):
                dst[o, j] += src[i, j]


@njit(cache=CACHE)
def _win_diag1(src, dst, f, s, pad, circ):
    """Same pixels only: dst[i, o] = sum_d src[i, s o + d - pad]."""
    H, n, Wo = src.shape[0], src.shape[1], dst.shape[1]
    dst[:] = 0.0
    for i in range(H):
        for o in range(Wo):
            acc = 0.0
            for d in range(f):
                j = _tap(o, d, s, pad, n, circ)
                if j >= 0:
                    acc += src[i, j]
            dst[i, o] = acc
'''


# ================================================================================= hoisting
def _costly(expr) -> bool:
    return any(isinstance(a, sp.Function) or (isinstance(a, sp.Pow) and not a.exp.is_Integer)
               for a in sp.preorder_traversal(expr))


def _hoist(exprs: list) -> tuple[list, list]:
    """Replace costly subexpressions of one image's variance (q_1 only, or q_2 only) by table
    reads: returns the rewritten expressions and the per-pixel functions g_m(q) of the table
    (g_0 = q).  The same function of q_1 and of q_2 shares one table column."""
    funcs = [Q]
    a_syms = [sp.Symbol("ha_0", real=True)]
    b_syms = [sp.Symbol("hb_0", real=True)]

    def column(g):
        if g not in funcs:
            funcs.append(g)
            a_syms.append(sp.Symbol(f"ha_{len(funcs) - 1}", real=True))
            b_syms.append(sp.Symbol(f"hb_{len(funcs) - 1}", real=True))
        return funcs.index(g)

    def visit(e):
        if e.is_Atom:
            if e == Q1:
                return a_syms[0]
            if e == Q2:
                return b_syms[0]
            return e
        fs = e.free_symbols
        if fs == {Q1} and _costly(e):
            return a_syms[column(e.xreplace({Q1: Q}))]
        if fs == {Q2} and _costly(e):
            return b_syms[column(e.xreplace({Q2: Q}))]
        return e.func(*[visit(a) for a in e.args])

    out = [visit(sp.sympify(e)) for e in exprs]
    return out, funcs


# ================================================================================= emission
class _Src:
    def __init__(self):
        self.lines = []

    def __call__(self, depth, text):
        self.lines.append("    " * depth + text)


def _printer(names):
    from .printer import NumbaPrinter
    return NumbaPrinter(dict(names))


def _assign_cse(out: _Src, depth: int, exprs: list, targets: list, names: dict, tag: str):
    """targets[i] = exprs[i] with common subexpressions (one acos for C and dC) computed once."""
    repl, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(f"_{tag}"))
    pr = _printer(names)
    for sym, e in repl:
        pr.names[sym] = str(sym)
        out(depth, f"{sym} = {pr.doprint(e)}")
    for t, e in zip(targets, reduced):
        out(depth, f"{t} = {pr.doprint(e)}")


def _source(d: ConvDerivation, params: list) -> tuple[str, dict]:
    steps = d.steps
    full = d.spatial == "full"
    theta_names = {p: f"theta[{k}]" for k, p in enumerate(params)}
    out = _Src()
    out(0, "import math")
    out(0, "import numpy as np")
    out(0, "from numba import njit, prange")
    out(0, "CACHE = True")
    from .module import helpers_source
    out.lines.extend(helpers_source().splitlines())
    out.lines.extend(_WINDOWS.splitlines())

    arrays = [i for i, s in enumerate(steps) if s.kind in ("input", "conv", "affine", "phi",
                                                           "avgpool", "mix") or s.kind in STEP_EMITTERS]
    mixes = [i for i, s in enumerate(steps) if s.kind == "mix"]
    if mixes and not full:
        raise NotImplementedError("a fixed map over positions needs all position pairs")
    # per-position weights w1/w2 (1 on a real position, 0 on padding): read by the pooling and
    # by the steps whose emitter says ``masked`` (attention excludes padded keys)
    weighted = bool(mixes) or any(getattr(STEP_EMITTERS.get(s.kind), "masked", False)
                                  for s in steps)
    # steps with per-image tables (written by the image's pass with itself)
    phis = [i for i, s in enumerate(steps) if s.kind == "phi" or s.kind in STEP_EMITTERS]
    hoisted = {}
    for i in phis:
        s = steps[i]
        if s.kind in STEP_EMITTERS:
            continue
        (C, dC), funcs = _hoist([s.C, s.dC])
        hoisted[i] = (C, dC, funcs)
    # scratch: per array step C_i (and T_i), plus the window passes' intermediates
    scratch = []
    for i in arrays:
        s = steps[i]
        scratch.append(f"C{i}")
        if s.has_theta:
            scratch.append(f"T{i}")
        if s.kind == "conv":
            scratch.append(f"U{i}")
            if steps[s.reads[0]].has_theta:
                scratch.append(f"V{i}")
        if s.kind == "avgpool":
            scratch += [f"A{i}", f"B{i}", f"D{i}"]
        if s.kind == "mix":
            scratch.append(f"M{i}")
        if s.kind in STEP_EMITTERS:
            scratch += [f"{name}{i}" for name in STEP_EMITTERS[s.kind].scratch]
    tables_a = [f"ha{i}" for i in phis]
    tables_b = [f"hb{i}" for i in phis]

    def shape_of(name: str, i: int) -> str:
        s = steps[i]
        H, W = f"dims[{i}, 0]", f"dims[{i}, 1]"
        if name.startswith(("C", "T", "M")) or s.kind in STEP_EMITTERS:
            return f"({H}, {W}, {H}, {W})" if full else f"({H}, {W})"
        src = s.reads[0]
        Hs, Ws = f"dims[{src}, 0]", f"dims[{src}, 1]"
        if name.startswith(("U", "V")):        # conv: after the axis-0 pass
            return f"({H}, {Ws}, {H}, {Ws})" if full else f"({H}, {Ws})"
        if name.startswith("A"):
            return f"({H}, {Ws}, {Hs}, {Ws})"
        if name.startswith("B"):
            return f"({H}, {Ws}, {H}, {Ws})"
        return f"({H}, {W}, {H}, {Ws})"         # D

    def alloc(depth):
        for name in scratch:
            i = int(name[1:])
            out(depth, f"{name} = np.empty({shape_of(name, i)})")

    # ------------------------------------------------------------------ body
    graphs = (["g1", "g2"] if mixes else []) + (["w1", "w2"] if weighted else [])
    args = ["x1", "x2", "same", "theta", "dims"] + graphs + tables_a + tables_b + scratch + ["res"]
    out(0, "")
    out(0, "@njit(cache=CACHE, error_model='numpy')")
    out(0, f"def body({', '.join(args)}):")
    for i, s in enumerate(steps):
        if s.kind == "input":
            out(1, "H, W, chans = x1.shape")
            if full:
                out(1, "for i in range(H):")
                out(2, "for j in range(W):")
                out(3, "for k in range(H):")
                out(4, "for l in range(W):")
                out(5, "acc = 0.0")
                out(5, "for c in range(chans):")
                out(6, "acc += x1[i, j, c] * x2[k, l, c]")
                out(5, f"C{i}[i, j, k, l] = acc / chans")
            else:
                out(1, "for i in range(H):")
                out(2, "for j in range(W):")
                out(3, "acc = 0.0")
                out(3, "for c in range(chans):")
                out(4, "acc += x1[i, j, c] * x2[i, j, c]")
                out(3, f"C{i}[i, j] = acc / chans")
        elif s.kind == "conv":
            src = s.reads[0]
            circ = "True" if s.padding == "CIRCULAR" else "False"
            f0, f1 = s.window
            s0, s1 = s.strides
            p0, p1 = f"dims[{i}, 2]", f"dims[{i}, 3]"
            w0, w1 = ("_win_pair0", "_win_pair1") if full else ("_win_diag0", "_win_diag1")
            out(1, f"{w0}(C{src}, U{i}, {f0}, {s0}, {p0}, {circ})")
            out(1, f"{w1}(U{i}, C{i}, {f1}, {s1}, {p1}, {circ})")
            has_t = steps[src].has_theta
            if has_t:
                out(1, f"{w0}(T{src}, V{i}, {f0}, {s0}, {p0}, {circ})")
                out(1, f"{w1}(V{i}, T{i}, {f1}, {s1}, {p1}, {circ})")
            F = sp.Integer(f0 * f1)
            pr = _printer(theta_names)
            wC = pr.doprint(sp.sympify(s.weight) / F)
            wT = pr.doprint(sp.sympify(s.weight_factor) / F)
            out(1, f"cf = C{i}.reshape(-1)")
            out(1, f"tf = T{i}.reshape(-1)")
            out(1, f"wc = {wC}")
            out(1, f"wt = {wT}")
            out(1, "for m in range(cf.size):")
            out(2, "tf[m] = wt * cf[m]" + (" + wc * tf[m]" if has_t else ""))
            out(2, "cf[m] = wc * cf[m]")
        elif s.kind == "avgpool":
            src = s.reads[0]
            circ = "True" if s.padding == "CIRCULAR" else "False"
            f0, f1 = s.window
            s0, s1 = s.strides
            p0, p1 = f"dims[{i}, 2]", f"dims[{i}, 3]"
            F2 = float(f0 * f1) ** 2
            for fam in ("C", "T") if s.has_theta else ("C",):
                out(1, f"_win_axis0({fam}{src}, A{i}, {f0}, {s0}, {p0}, {circ})")
                out(1, f"_win_axis0(A{i}.transpose(2, 1, 0, 3), B{i}.transpose(2, 1, 0, 3), "
                       f"{f0}, {s0}, {p0}, {circ})")
                out(1, f"_win_axis0(B{i}.transpose(1, 0, 2, 3), D{i}.transpose(1, 0, 2, 3), "
                       f"{f1}, {s1}, {p1}, {circ})")
                out(1, f"_win_axis0(D{i}.transpose(3, 1, 2, 0), {fam}{i}.transpose(3, 1, 2, 0), "
                       f"{f1}, {s1}, {p1}, {circ})")
                out(1, f"ff = {fam}{i}.reshape(-1)")
                out(1, "for m in range(ff.size):")
                out(2, f"ff[m] = ff[m] / {F2!r}")
        elif s.kind == "affine":
            pr = _printer(theta_names)
            c_terms, t_terms, c_const, t_const = [], [], sp.S.Zero, sp.S.Zero
            for r, c in zip(s.reads, s.coeffs):
                src = steps[r]
                if src.kind == "bias":
                    c_const += c ** 2 * src.bias
                    t_const += c ** 2 * src.bias_factor
                else:
                    c_terms.append(f"{pr.doprint(c ** 2)} * C{r}.reshape(-1)[m]")
                    if src.has_theta:
                        t_terms.append(f"{pr.doprint(c ** 2)} * T{r}.reshape(-1)[m]")
            out(1, f"cf = C{i}.reshape(-1)")
            out(1, f"tf = T{i}.reshape(-1)")
            srcs = [r for r in s.reads if steps[r].kind != "bias"]
            for r in srcs:
                out(1, f"cs{r} = C{r}.reshape(-1)")
                if steps[r].has_theta:
                    out(1, f"ts{r} = T{r}.reshape(-1)")
            out(1, f"cb = {pr.doprint(c_const)}")
            out(1, f"tb = {pr.doprint(t_const)}")
            out(1, "for m in range(cf.size):")
            c_sum = " + ".join([t.replace(f"C{r}.reshape(-1)[m]", f"cs{r}[m]")
                                for t, r in zip(c_terms, srcs)] + ["cb"])
            t_list = []
            for r in srcs:
                if steps[r].has_theta:
                    c = s.coeffs[list(s.reads).index(r)]
                    t_list.append(f"{pr.doprint(c ** 2)} * ts{r}[m]")
            out(2, f"cf[m] = {c_sum}")
            out(2, f"tf[m] = {' + '.join(t_list + ['tb'])}")
        elif s.kind == "phi":
            src = s.reads[0]
            C, dC, funcs = hoisted[i]
            names = dict(theta_names)
            names[S12] = "s"
            for m in range(len(funcs)):
                names[sp.Symbol(f"ha_{m}", real=True)] = f"ha{i}[i, j, {m}]"
                names[sp.Symbol(f"hb_{m}", real=True)] = f"hb{i}[k, l, {m}]" if full else \
                    f"hb{i}[i, j, {m}]"
            same_names = dict(theta_names)
            same_names[Q] = "s"
            has_t = steps[src].has_theta
            # the image's own tables, from its diagonal (same pixel, same image)
            out(1, "if same:")
            out(2, f"for i in range(dims[{i}, 0]):")
            out(3, f"for j in range(dims[{i}, 1]):")
            out(4, f"q = C{src}[i, j, i, j]" if full else f"q = C{src}[i, j]")
            fpr = _printer({**theta_names, Q: "q"})
            for m, g in enumerate(funcs):
                out(4, f"ha{i}[i, j, {m}] = {fpr.doprint(g)}")
            if full:
                out(1, f"for i in range(dims[{i}, 0]):")
                out(2, f"for j in range(dims[{i}, 1]):")
                out(3, f"for k in range(dims[{i}, 0]):")
                out(4, f"for l in range(dims[{i}, 1]):")
                out(5, f"s = C{src}[i, j, k, l]")
                _assign_cse(out, 5, [C, dC], ["v", "dv"], names, "c")
                out(5, f"C{i}[i, j, k, l] = v")
                out(5, f"T{i}[i, j, k, l] = dv * T{src}[i, j, k, l]" if has_t else
                    f"T{i}[i, j, k, l] = 0.0")
                # a pixel with itself in one image: the one-variance forms (branch-free above,
                # so the pixel-pair loop vectorises)
                out(1, "if same:")
                out(2, f"for i in range(dims[{i}, 0]):")
                out(3, f"for j in range(dims[{i}, 1]):")
                out(4, f"s = C{src}[i, j, i, j]")
                _assign_cse(out, 4, [s.C_same, s.dC_same], ["v", "dv"], same_names, "e")
                out(4, f"C{i}[i, j, i, j] = v")
                out(4, f"T{i}[i, j, i, j] = dv * T{src}[i, j, i, j]" if has_t else
                    f"T{i}[i, j, i, j] = 0.0")
            else:
                out(1, f"for i in range(dims[{i}, 0]):")
                out(2, f"for j in range(dims[{i}, 1]):")
                out(3, f"s = C{src}[i, j]")
                out(3, "if same:")
                _assign_cse(out, 4, [s.C_same, s.dC_same], ["v", "dv"], same_names, "e")
                out(3, "else:")
                _assign_cse(out, 4, [C, dC], ["v", "dv"], names, "c")
                out(3, f"C{i}[i, j] = v")
                out(3, f"T{i}[i, j] = dv * T{src}[i, j]" if has_t else f"T{i}[i, j] = 0.0")
        elif s.kind == "mix":
            src = s.reads[0]
            k = mixes.index(i)
            out(1, f"P = dims[{i}, 0] * dims[{i}, 1]")
            out(1, f"mt = M{i}.reshape(P, P)")
            for fam in ("C", "T") if s.has_theta else ("C",):
                # mt = g1 X, then X' = mt g2^T: C^y = A1 C^x A2^T (Theta likewise)
                out(1, f"xs = {fam}{src}.reshape(P, P)")
                out(1, f"xd = {fam}{i}.reshape(P, P)")
                out(1, "for p in range(P):")
                out(2, "for t in range(P):")
                out(3, "mt[p, t] = 0.0")
                out(2, "for u in range(P):")
                out(3, f"a = g1[{k}, p, u]")
                out(3, "if a != 0.0:")
                out(4, "for t in range(P):")
                out(5, "mt[p, t] += a * xs[u, t]")
                out(1, "for p in range(P):")
                out(2, "for q in range(P):")
                out(3, "xd[p, q] = 0.0")
                out(1, "for q in range(P):")           # skips the zeros of a sparse graph
                out(2, "for t in range(P):")
                out(3, f"a = g2[{k}, q, t]")
                out(3, "if a != 0.0:")
                out(4, "for p in range(P):")
                out(5, "xd[p, q] += mt[p, t] * a")
        elif s.kind == "pool" and weighted:
            # a graph or masked program: pool over the real positions only (w = 1 on a node or
            # token, 0 on padding)
            src = s.reads[0]
            out(1, f"Pp = dims[{src}, 0] * dims[{src}, 1]")
            out(1, f"cs = C{src}.reshape(Pp, Pp)")
            out(1, f"ts = T{src}.reshape(Pp, Pp)")
            out(1, "cpool = 0.0")
            out(1, "tpool = 0.0")
            out(1, "for p in range(Pp):")
            if s.how == "flatten":
                out(2, "cpool += w1[p] * w2[p] * cs[p, p]")
                out(2, "tpool += w1[p] * w2[p] * ts[p, p]")
            else:
                out(2, "if w1[p] != 0.0:")
                out(3, "for q in range(Pp):")
                out(4, "if w2[q] != 0.0:")
                out(5, "cpool += cs[p, q]")
                out(5, "tpool += ts[p, q]")
            if s.how == "mean":             # (1/L1 L2) sum over the real node pairs
                out(1, "n1 = 0.0")
                out(1, "n2 = 0.0")
                out(1, "for p in range(Pp):")
                out(2, "n1 += w1[p]")
                out(2, "n2 += w2[p]")
                out(1, "cpool /= n1 * n2")
                out(1, "tpool /= n1 * n2")
            elif s.how == "flatten":        # no masks with flatten (the driver refuses them)
                out(1, "cpool /= Pp")
                out(1, "tpool /= Pp")
        elif s.kind in STEP_EMITTERS:
            STEP_EMITTERS[s.kind].emit(out, i, s, steps, full, _printer(theta_names))
        elif s.kind == "pool":
            src = s.reads[0]
            out(1, f"Hp, Wp = dims[{src}, 0], dims[{src}, 1]")
            out(1, "cpool = 0.0")
            out(1, "tpool = 0.0")
            if s.how == "mean":
                out(1, f"cf = C{src}.reshape(-1)")
                out(1, f"tf = T{src}.reshape(-1)")
                out(1, "for m in range(cf.size):")
                out(2, "cpool += cf[m]")
                out(2, "tpool += tf[m]")
                out(1, "cpool /= (Hp * Wp) ** 2")
                out(1, "tpool /= (Hp * Wp) ** 2")
            elif s.how == "sum":
                out(1, f"cf = C{src}.reshape(-1)")
                out(1, f"tf = T{src}.reshape(-1)")
                out(1, "for m in range(cf.size):")
                out(2, "cpool += cf[m]")
                out(2, "tpool += tf[m]")
            else:
                out(1, "for i in range(Hp):")
                out(2, "for j in range(Wp):")
                idx = "i, j, i, j" if full else "i, j"
                out(3, f"cpool += C{src}[{idx}]")
                out(3, f"tpool += T{src}[{idx}]")
                out(1, "cpool /= Hp * Wp")
                out(1, "tpool /= Hp * Wp")
    names = dict(theta_names)
    names[ConvDerivation.C_POOL] = "cpool"
    names[ConvDerivation.THETA_POOL] = "tpool"
    pr = _printer(names)
    out(1, f"res[0] = {pr.doprint(d.nngp)}")
    out(1, f"res[1] = {pr.doprint(d.ntk)}")
    out(1, "return 0")

    call = ", ".join(["{x1}", "{x2}", "{same}", "theta", "dims"] +
                     (["{g1}", "{g2}"] if mixes else []) +
                     (["{w1}", "{w2}"] if weighted else []) +
                     [f"ha{i}[{{a}}]" for i in phis] + [f"{{hb}}{i}[{{b}}]" for i in phis] +
                     scratch + ["res"])
    # ------------------------------------------------------------------ selfpass
    out(0, "")
    out(0, "@njit(cache=CACHE, parallel=True, error_model='numpy')")
    graph_args = (["G"] if mixes else []) + (["NW"] if weighted else [])   # per example
    out(0, f"def selfpass(X, theta, dims, {', '.join(graph_args + tables_a + ['out'])}):")
    out(1, "for a in prange(X.shape[0]):")
    alloc(2)
    out(2, "res = np.zeros(2)")
    out(2, call.format(x1="X[a]", x2="X[a]", same="True", a="a", b="a", hb="ha", g1="G[a]",
                       g2="G[a]", w1="NW[a]", w2="NW[a]")
        .join(["body(", ")"]))
    out(2, "out[0, a] = res[0]")
    out(2, "out[1, a] = res[1]")
    out(1, "return 0")
    # ------------------------------------------------------------------ pairs
    pair_graph_args = (["G1", "G2"] if mixes else []) + (["NW1", "NW2"] if weighted else [])
    out(0, "")
    out(0, "@njit(cache=CACHE, parallel=True, error_model='numpy')")
    out(0, f"def pairs(X1, X2, theta, dims, symmetric, "
           f"{', '.join(pair_graph_args + tables_a + tables_b + ['out'])}):")
    out(1, "N1, N2 = X1.shape[0], X2.shape[0]")
    out(1, "for a in prange(N1):")
    alloc(2)
    out(2, "res = np.zeros(2)")
    out(2, "for b in range(a + 1 if symmetric else 0, N2):")
    out(3, call.format(x1="X1[a]", x2="X2[b]", same="False", a="a", b="b", hb="hb",
                       g1="G1[a]", g2="G2[b]", w1="NW1[a]", w2="NW2[b]")
        .join(["body(", ")"]))
    out(3, "out[0, a, b] = res[0]")
    out(3, "out[1, a, b] = res[1]")
    out(1, "return 0")
    meta = {"phis": phis, "widths": {i: (len(hoisted[i][2]) if i in hoisted else
                                          STEP_EMITTERS[steps[i].kind].width) for i in phis},
            "mixes": mixes, "weighted": weighted}
    return "\n".join(out.lines) + "\n", meta


# ================================================================================= driver
def _out_size(n: int, f: int, s: int, padding: str, what: str) -> tuple[int, int]:
    """(output size, padding before) along one axis, as Neural Tangents / XLA compute them."""
    if padding == "VALID":
        if n < f:
            raise ValueError(f"{what}: a VALID window of {f} does not fit {n} positions")
        return (n - f) // s + 1, 0
    out = -(-n // s)
    total = max((out - 1) * s + f - n, 0)
    return out, total // 2


def _dims(d: ConvDerivation, H: int, W: int) -> np.ndarray:
    dims = np.zeros((len(d.steps), 4), dtype=np.int64)
    for i, s in enumerate(d.steps):
        if s.kind == "input":
            dims[i, :2] = (H, W)
        elif s.kind in ("conv", "avgpool"):
            h, w = dims[s.reads[0], :2]
            what = f"{type(s.node).__name__} {s.node.label()!r}"
            dims[i, 0], dims[i, 2] = _out_size(int(h), s.window[0], s.strides[0], s.padding, what)
            dims[i, 1], dims[i, 3] = _out_size(int(w), s.window[1], s.strides[1], s.padding, what)
        elif s.kind == "mix":
            dims[i, :2] = dims[s.reads[0], :2]
        elif s.kind in ("affine", "phi") or s.kind in STEP_EMITTERS:
            shapes = {tuple(dims[r, :2]) for r in s.reads if d.steps[r].kind != "bias"}
            if len(shapes) > 1:
                raise ValueError(f"{s.node.label()!r} combines vectors of different spatial "
                                 f"shapes {sorted(shapes)}")
            dims[i, :2] = shapes.pop()
    return dims


def check_images(X, name: str, rank: int, channels) -> np.ndarray:
    """Images (N, H, W, C) (rank 2) or signals (N, T, C) (rank 1): finite float64, returned as
    (N, H, W, C) (a signal is T x 1)."""
    X = np.asarray(X, dtype=np.float64)
    shape = "(N, H, W, C)" if rank == 2 else "(N, T, C)"
    if X.ndim != rank + 2:
        raise ValueError(f"{name} must be a batch of {'images' if rank == 2 else 'signals'} of "
                         f"shape {shape}, got an array of shape {X.shape}")
    if 0 in X.shape:
        raise ValueError(f"{name} is empty (shape {X.shape})")
    if not np.all(np.isfinite(X)):
        bad = np.argwhere(~np.isfinite(X))[0]
        raise ValueError(f"{name} contains NaN or inf (first at {tuple(int(b) for b in bad)})")
    if channels is not None and sp.sympify(channels).is_Integer and X.shape[-1] != int(channels):
        raise ValueError(f"{name} has {X.shape[-1]} channels but the program's input has "
                         f"{channels}")
    if rank == 1:
        X = X[:, :, None, :]
    return np.ascontiguousarray(X)


class ConvKernel:
    """A compiled convolutional derivation: ``k(X1, X2=None, params=None, diagonal=False)`` ->
    :class:`~symntk.result.KernelResult` (``ntk_terms`` is empty: the kernel accumulates the NTK
    layer by layer).  A program with ``Aggregate`` steps (a graph network) also takes the graphs'
    adjacency matrices, ``adjacency1`` (N1, P, P) for X1 and ``adjacency2`` for X2
    (:mod:`symntk.graphs`)."""

    def __init__(self, derivation: ConvDerivation, module, params: list, meta: dict):
        self.derivation = derivation
        self.module = module
        self.params = params
        self.meta = meta

    def _theta(self, params, channels: int) -> np.ndarray:
        from ..binding import bind
        inp = self.derivation.program.inputs[0]
        values = dict(params or {})
        if isinstance(inp.dim, sp.Symbol):
            values.setdefault(inp.dim.name, channels)
        bound, missing = bind(self.params, values)
        if missing:
            raise ValueError(f"unbound symbols {missing}: pass them in params=")
        return np.array([float(bound[p]) for p in self.params], dtype=np.float64)

    def _tables(self, N: int, dims) -> list:
        # a width of None: one column per position (a per-image P x P matrix)
        return [np.zeros((N, dims[i, 0], dims[i, 1], self.meta["widths"][i] or
                          int(dims[i, 0] * dims[i, 1]))) for i in self.meta["phis"]]

    @property
    def takes_graphs(self) -> bool:
        """True if the program has a fixed map over positions (it needs adjacency matrices)."""
        return bool(self.meta["mixes"])

    @property
    def takes_masks(self) -> bool:
        """True if the compiled kernel reads per-position masks itself (graphs, attention)."""
        return bool(self.meta.get("weighted"))

    def _graphs(self, A, mask, X, side: str):
        """(X with padded nodes filled, the normalised matrix of every mix step (N, n_mix, P, P),
        node weights (N, P)), or (X, None, None) for a program without mix steps."""
        from ..graphs import prepare_graphs
        if not self.takes_graphs:
            if A is not None:
                raise ValueError(f"adjacency{side} given but the program has no Aggregate step")
            if self.takes_masks:
                from ..masks import prepare_tokens
                if mask is not None and \
                        self.derivation.steps[self.derivation.pooled].how == "flatten":
                    raise ValueError("token masks need a 'sum' or 'mean' pooling readout, not "
                                     "'flatten'")
                X, W = prepare_tokens(X, mask, f"mask{side}", self._pointwise())
                return X, None, W
            if mask is not None:
                raise ValueError(f"mask{side} given to a convolutional kernel without Aggregate "
                                 "steps: use symntk.kernel(..., mask1=...) for sequences")
            return X, None, None
        steps = self.derivation.steps
        if mask is not None and steps[self.derivation.pooled].how == "flatten":
            raise ValueError("node masks need a 'sum' or 'mean' pooling readout, not 'flatten'")
        return prepare_graphs(X, A, mask, [steps[i] for i in self.meta["mixes"]], side,
                              self._pointwise())

    def _pointwise(self) -> bool:
        """True if no step reads neighbouring positions (every Conv and AvgPool is 1 x 1)."""
        return all(s.kind not in ("conv", "avgpool") or tuple(s.window) == (1, 1)
                   for s in self.derivation.steps)

    def __call__(self, X1, X2=None, params=None, diagonal: bool = False, adjacency1=None,
                 adjacency2=None, mask1=None, mask2=None):
        d = self.derivation
        channels = d.program.inputs[0].dim
        X1 = check_images(X1, "X1", d.rank, channels)
        symmetric = X2 is None
        X2 = X1 if symmetric else check_images(X2, "X2", d.rank, channels)
        if symmetric and (adjacency2 is not None or mask2 is not None):
            raise ValueError("adjacency2 or mask2 given without X2")
        X1, G1, W1 = self._graphs(adjacency1, mask1, X1, "1")
        X2, G2, W2 = (X1, G1, W1) if symmetric else self._graphs(adjacency2, mask2, X2, "2")
        graphs = ([] if G1 is None else [G1]) + ([] if W1 is None else [W1])
        if X2.shape[1:] != X1.shape[1:]:
            raise ValueError(f"X1 has images of shape {X1.shape[1:]} but X2 of {X2.shape[1:]}")
        theta = self._theta(params, X1.shape[-1])
        dims = _dims(d, X1.shape[1], X1.shape[2])
        m = self.module
        tab1 = self._tables(X1.shape[0], dims)
        dg = np.zeros((2, X1.shape[0]))
        m.selfpass(X1, theta, dims, *graphs, *tab1, dg)
        if diagonal:
            return self._result(dg[0], dg[1])
        if symmetric:
            tab2 = tab1
        else:
            tab2 = self._tables(X2.shape[0], dims)
            m.selfpass(X2, theta, dims, *([] if G2 is None else [G2]),
                       *([] if W2 is None else [W2]), *tab2,
                       np.zeros((2, X2.shape[0])))
        out = np.zeros((2, X1.shape[0], X2.shape[0]))
        m.pairs(X1, X2, theta, dims, symmetric, *([] if G1 is None else [G1, G2]),
                *([] if W1 is None else [W1, W2]), *tab1,
                *tab2,
                out)
        if symmetric:
            from ..kernels import symmetrize
            for k in range(2):
                symmetrize(out[k], dg[k])
        return self._result(out[0], out[1])

    def _result(self, nngp, ntk):
        from ..result import KernelResult
        if not (np.all(np.isfinite(nngp)) and np.all(np.isfinite(ntk))):
            raise ValueError("the compiled kernel produced NaN/inf (an all-zero image without "
                             "biases makes a correlation 0/0)")
        return KernelResult(nngp, ntk, {})


def compile_conv(derivation: ConvDerivation, cache: bool = True) -> ConvKernel:
    """Generate the Numba module of a convolutional derivation and load it through the kernel
    cache (:func:`symntk.codegen.cache.load_module`)."""
    from .cache import load_module, source_hash
    from .module import ModuleSource
    params = sorted(derivation.parameters(), key=str)
    source, meta = _source(derivation, params)
    module, _ = load_module(
        ModuleSource(source, source_hash(CODEGEN_VERSION + source), "conv"), cache)
    return ConvKernel(derivation, module, params, meta)
