"""``derive(program)``: the NNGP and NTK of a tensor program as a system of equations.

Pipeline (TP2 Box 1, Eqs. 10-12; TP3 Box 1):

1. **Unroll with tags.**  Every ``Repeat`` is unrolled for a few iterations; each node instance
   remembers (repeat, template node, iteration).
2. **Z calculus** (:mod:`symntk.zcalculus`): forward and backward kernels are derived on demand,
   each symbol with its defining equation.
3. **NTK assembly**, TP2 Eqs. (10)-(12): for each weight W used as y_k = W z_k,
   ``factor_W * sum_{k,k'} D[y_k, y'_k'] C[z_k, z'_k']``; for each bias, ``factor_b * D[b, b']``; the
   readout's ``factor_v * C[x, x']`` and its bias.  The factor is the parametrization's
   (TP2 §4; Jacot et al. 2018 / Neural Tangents ``Dense``): ``sigma^2`` (ntk, Jacot/NT), ``1``
   (tp), ``fan_in`` (standard).
4. **Fold.**  Equations of consecutive iterations that agree up to a shift of the iteration index
   become one recursion in ``l``; boundary iterations that differ are kept as they are.  When the
   iterations do not agree (weight tying needs cross-layer kernels), the derivation stays unrolled
   and says so (``Derivation.unrolled_repeats``).

The result is plain data (:mod:`symntk.equations`): ``Derivation`` knows nothing about LaTeX or
Numba.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from .equations import Derivation, Equation, Loop
from .parametrization import bias_factor, weight_factor
from .activations import JumpWarning, jump_points
from .program import (Carry, Embedding, FixedReadout, MatMul, Moment, Node, Nonlin, Program,
                      ProgramError, Readout, Repeat, VectorReadout, Weight, _topological)
from .zcalculus import LENGTH, POSITION_INDEX, Engine

__all__ = ["derive", "FOLD_ITERATIONS", "JUMPS", "nonlinearity_jumps"]

#: What ``derive`` does when a nonlinearity jumps (its NTK uses the derivative almost everywhere).
JUMPS = ("warn", "error", "ignore")

#: Iterations unrolled to recognise a recursion (one peeled at each end plus two to compare).
FOLD_ITERATIONS = 4


# ----------------------------------------------------------------------------------- unrolling
@dataclass
class _Unrolled:
    program: Program
    tags: dict                       # node instance -> (repeat, template, iteration)
    repeats: list                    # (repeat, start, derived_stop, real_stop)


def _unroll(program: Program, iterations: int | None) -> _Unrolled:
    """Unroll every Repeat, at most ``iterations`` iterations each (None: all), tagging instances."""
    tags: dict = {}
    repeats: list = []
    mapping: dict = {}
    for node in program.nodes:
        if not isinstance(node, Repeat):
            continue
        rep = node.xreplace(mapping)
        if rep.atoms(Repeat) - {rep}:
            raise ProgramError(f"nested Repeats are not supported yet ({rep.label()})")
        start, stop = rep.start, rep.stop
        if not start.is_Integer:
            raise ProgramError(f"Repeat {rep.label()!r}: the start index must be an integer")
        count = None if not stop.is_Integer else int(stop) - int(start) + 1
        if count is None and iterations is None:
            raise ProgramError(f"Repeat {rep.label()!r} has a symbolic stop {stop}; it cannot be "
                               "unrolled completely")
        n_iter = count if iterations is None else (min(count, iterations) if count else iterations)
        state = rep.init
        tags.setdefault(state, (node, rep.carry, int(start) - 1))
        for k in range(int(start), int(start) + n_iter):
            inst = rep.iteration(k, state)
            _tag(rep.body, inst, rep, node, k, tags)
            tags[inst] = (node, rep.carry, k)
            state = inst
        mapping[rep] = state
        mapping[node] = state
        repeats.append((node, int(start), int(start) + n_iter - 1, stop))
    out = program.output.xreplace(mapping) if mapping else program.output
    return _Unrolled(Program(out, program.name, program.require_input), tags, repeats)


def _tag(template, inst, rep: Repeat, key: Repeat, k: int, tags: dict):
    if template == rep.carry or not isinstance(template, Node):
        return
    if not ({rep.index} & template.free_symbols) and rep.carry not in template.atoms(Carry):
        return                                   # shared across iterations
    if isinstance(inst, Node):
        tags.setdefault(inst, (key, template, k))
    for t, i in zip(template.args, inst.args):
        if isinstance(t, sp.Tuple):
            for tt, ii in zip(t, i):
                _tag(tt, ii, rep, key, k, tags)
        else:
            _tag(t, i, rep, key, k, tags)


# ----------------------------------------------------------------------------------- derive
def nonlinearity_jumps(program: Program) -> tuple:
    """The nonlinearities of ``program`` (Repeat and Scan bodies included) that jump in one of
    their arguments, as ``(label, phi, jump points)`` triples (see
    :func:`symntk.activations.jump_points`)."""
    every = list(program.nodes)
    for rep in program.repeats:
        every.extend(_topological(rep.body))
    found = {}
    for node in every:
        if not isinstance(node, (Nonlin, Moment)):
            continue
        fn = node.phi if isinstance(node, Nonlin) else node.psi
        points = tuple(p for var in fn.variables for p in jump_points(fn.expr, var))
        if points:
            found.setdefault((node.label(), fn.expr), points)
    return tuple((label, expr, points) for (label, expr), points in found.items())


def _check_jumps(program: Program, jumps: str) -> tuple:
    if jumps not in JUMPS:
        raise ValueError(f"unknown jumps={jumps!r}; expected one of {JUMPS}")
    found = nonlinearity_jumps(program)
    if found and jumps != "ignore":
        what = "; ".join(f"{label!r} ({expr}) at {', '.join(map(str, pts))}"
                         for label, expr, pts in found)
        message = (f"nonlinearities with jumps: {what}. Their NTK uses the derivative almost "
                   "everywhere (zero at the jump, as autodiff and Neural Tangents' Sign); the "
                   "weak derivative's Dirac part is not polynomially bounded (TP2 Cor. 7.3)")
        if jumps == "error":
            raise ValueError(message + " (pass jumps='warn' to derive anyway)")
        import warnings
        warnings.warn(message, JumpWarning, stacklevel=3)
    return found


def derive(program: Program, mode: str = "gia", fold: bool = True,
           jumps: str = "warn") -> Derivation:
    """Derive the NNGP and NTK recursions of ``program`` (TP2 Box 1, Eq. 12).

    ``mode="gia"``: backprop matrices W^T are independent of W (TP2 Heuristic 4.1); correct
    whenever the Simple GIA Check holds (TP2 §5, Condition 1).  ``mode="exact"``: the full NETSOR-T
    Master Theorem, every MatMul output Zhat + Zdot (TP3 Box 1, Thm 2.10); identical to GIA on
    BP-like programs (TP2 Def. A.3, Thm 7.2).
    ``fold=False`` keeps every iteration of every Repeat.

    ``jumps``: a discontinuous nonlinearity (sign, step, floor, a Piecewise jump) is differentiated
    almost everywhere (zero at the jump: what autodiff computes at finite width and Neural
    Tangents' ``Sign`` uses) and recorded in ``Derivation.jumps``; ``"warn"`` (default) also
    issues a :class:`~symntk.activations.JumpWarning`, ``"error"`` raises instead, ``"ignore"``
    is silent.
    """
    if mode not in ("gia", "exact"):
        raise ValueError(f"unknown mode {mode!r}; expected 'gia' or 'exact'")
    if not isinstance(program, Program):
        raise TypeError(f"derive needs a Program, got {type(program).__name__}")
    found = _check_jumps(program, jumps)
    from .batchnorm import derive_batchnorm, is_batch_coupled
    if is_batch_coupled(program):
        # examples of a batch coupled by batch statistics: kernels of pairs of batches
        return derive_batchnorm(program, mode)
    from .convolution import derive_conv, is_convolutional
    if is_convolutional(program):
        # pixels are positions, a Conv shares one matrix per filter offset: the pixel-pair
        # recursion of the CNTK (symntk.convolution)
        return derive_conv(program, mode)
    engine_mode = mode
    if mode == "exact" and any(inp.positions for inp in program.inputs):
        # Over positions the Zdot sums of TP3 Box 1 run over every position of a shared weight.
        # On a BP-like program they all vanish (TP2 Thm 7.2, TP3 Thm D.1), so the exact limit is
        # the GIA one; other positioned programs are not derived exactly yet.
        from .gia import gia_check
        check = gia_check(program)
        if not check.holds:
            raise NotImplementedError(
                "exact mode on a program with positions is derived only when it is BP-like "
                f"(Simple GIA Check); here: {'; '.join(check.reasons)}")
        engine_mode = "gia"
    positions = (*POSITION_INDEX, *LENGTH)
    diagonal = replace(_derive(program, engine_mode, fold, same_input=True), mode=mode,
                       position_symbols=positions, jumps=found)
    return replace(_derive(program, engine_mode, fold, same_input=False), mode=mode,
                   diagonal=diagonal, position_symbols=positions, jumps=found)


def _derive(program: Program, mode: str, fold: bool, same_input: bool) -> Derivation:
    """Fold a few unrolled iterations into a recursion; if they do not fold, unroll completely."""
    attempts = [FOLD_ITERATIONS, None] if (fold and program.repeats) else [None]
    for iterations in attempts:
        unrolled = _unroll(program, iterations)
        raw = _derive_unrolled(unrolled, mode, same_input)
        if unrolled.repeats and fold:
            folded = _fold(raw, unrolled)
            if folded is not None:
                return folded
            if any(real != sp.Integer(stop) for _, _, stop, real in unrolled.repeats):
                continue                      # truncated: derive every iteration instead
        return replace(raw.unfolded(),
                       unrolled_repeats=tuple(r for r, *_ in unrolled.repeats) if fold else ())
    raise AssertionError("unreachable: the last attempt unrolls completely")


@dataclass
class _Raw:
    """The engine's output for an unrolled program, before folding."""
    program: Program
    mode: str
    engine: Engine
    unrolled: _Unrolled
    nngp: sp.Expr | None
    ntk_terms: dict
    names: dict

    def unfolded(self) -> Derivation:
        eng = self.engine
        return Derivation(self.program, self.mode, [Equation(s, r) for s, r in eng.equations],
                          self.nngp, sp.Add(*self.ntk_terms.values()), dict(self.ntk_terms),
                          dict(eng.info), {k: eng.info[k] for k in map(_label_of,
                                                                     eng.input_kernels.values())},
                          self.names)


def _derive_unrolled(unrolled: _Unrolled, mode: str, same_input: bool = False) -> _Raw:
    prog = unrolled.program
    labels = _labels(prog, unrolled.tags)
    eng = Engine(prog, lambda n: labels[n][0] + (str(labels[n][1]) if labels[n][1] is not None else ""),
                 same_input=same_input, mode=mode)
    nngp, terms = READOUT_TERMS[type(prog.output)](eng, prog.output, unrolled)
    # Weights: TP2 Eq. (12), every pair of uses.
    uses: dict[Weight, list[Node]] = {}
    for n in prog.nodes:
        if isinstance(n, (MatMul, Embedding)):
            uses.setdefault(n.weight, []).append(n)
    for w, ws in uses.items():
        total = sp.Integer(0)
        for u in ws:
            for u2 in ws:
                total += _use_pair(eng, u, u2)
        name = _param_name(w, unrolled)
        terms[name] = terms.get(name, 0) + \
            weight_factor(w.parametrization, w.variance, w.fan_in) * total
    for b in prog.biases:
        d = eng.expect(eng.dz(b, 0) * eng.dz(b, 1))
        name = _param_name(b, unrolled)
        terms[name] = terms.get(name, 0) + bias_factor(b.parametrization, b.variance) * d
    return _Raw(prog, mode, eng, unrolled, nngp, terms,
                {s: _display(eng, s, labels) for s in eng.info})


def _output_bias_terms(out, nngp, terms: dict):
    """b_out: NNGP + sigma_b^2, NTK + the bias factor (df/db_out = 1)."""
    if out.bias is not None:
        terms[out.bias.name] = bias_factor(out.bias.parametrization, out.bias.variance)
        if nngp is not None:
            nngp += out.bias.variance
    return nngp, terms


def _trained_readout_terms(eng: Engine, out: Readout, unrolled: _Unrolled):
    """f = v . x / sqrt(n): NNGP sigma_v^2 C[x, x'] (TP1 Cor. 5.5); NTK term factor_v C[x, x']."""
    v, x = out.weight, out.vector
    c_out = eng.inner(x, x)
    terms = {_param_name(v, unrolled): weight_factor(v.parametrization, v.variance, v.fan_in) * c_out}
    return _output_bias_terms(out, v.variance * c_out, terms)


#: readout kind -> (engine, readout, unrolled) -> (NNGP or None, {parameter: NTK term}).  Only a
#: trained zero-mean readout makes the output a centred GP with an NNGP kernel (TP1 Cor. 5.5);
#: the other readouts' parameters are the network's own, counted with every other weight.
READOUT_TERMS = {
    Readout: _trained_readout_terms,
    VectorReadout: lambda eng, out, unrolled: _output_bias_terms(out, None, {}),
    FixedReadout: lambda eng, out, unrolled: (None, {}),
}


def _label_of(sym):
    return sym.label if isinstance(sym, sp.IndexedBase) else sym


def _use_pair(eng: Engine, u: Node, u2: Node) -> sp.Expr:
    """lim <grad_W f(xi) through use u, grad_W f(xi') through use u2> / factor (TP2 Eq. 12).

    A use at every position of a sequence (a weight shared over t) is one use per position:
    the term is summed over the position pairs (t, r) of the two inputs (TP2 App. E.2)."""
    limits = []
    for copy, use in ((0, u), (1, u2)):
        if use.positions is not None:
            i = POSITION_INDEX[copy]
            limits.append((i, 1, eng.length(copy)))
    term = _use_pair_at(eng, u, u2)
    if not limits or term == 0:
        return term
    return sp.Sum(term, *reversed(limits))


def _use_pair_at(eng: Engine, u: Node, u2: Node) -> sp.Expr:
    if isinstance(u, Embedding) and isinstance(u2, Embedding):
        if u.input != u2.input:
            raise NotImplementedError("an embedding matrix shared by two different inputs")
        d = eng.expect(eng.dz(u, 0) * eng.dz(u2, 1))
        t, r = (POSITION_INDEX if u.positions else (None, None))
        return d * eng.input_kernel(u.input, 0, 1, t, r)
    if isinstance(u, Embedding) or isinstance(u2, Embedding):
        raise NotImplementedError(f"weight {u.weight.label()} both embeds the input and multiplies "
                                  "a hidden vector")
    t1, t2 = u.transposed, u2.transposed
    if t1 == t2:
        ratio = sp.Integer(1) if not t1 else u.weight.fan_out / u.weight.fan_in
        d = eng.expect(eng.dz(u, 0) * eng.dz(u2, 1))
        if d == 0:
            return sp.Integer(0)
        return ratio * d * eng.inner(u.vector, u2.vector)
    # y = W z and y' = W^T z': <g z^T, z' g'^T> = (g . z')(z . g')
    w = u.weight
    ratio = sp.sqrt(w.fan_out / w.fan_in) if not t1 else sp.sqrt(w.fan_in / w.fan_out)
    a = eng.expect(eng.dz(u, 0) * eng.z(u2.vector, 1))
    if a == 0:
        return sp.Integer(0)
    return ratio * a * eng.expect(eng.z(u.vector, 0) * eng.dz(u2, 1))


def _param_name(p, unrolled: _Unrolled) -> str:
    tag = unrolled.tags.get(p)
    return p.label() if tag is None else f"{tag[1].label()}@{tag[2]}"


def _labels(prog: Program, tags: dict) -> dict:
    """node -> (display stem, iteration or None)."""
    out, auto = {}, 0
    for n in prog.nodes:
        tag = tags.get(n)
        if tag is not None:
            stem = _stem(tag[1])
            if stem is None:
                auto += 1
                stem = f"z{auto}"
            out[n] = (stem, tag[2])
            continue
        stem = _stem(n)
        if stem is None:
            auto += 1
            stem = f"z{auto}"
        out[n] = (stem, None)
    return out


def _stem(node) -> str | None:
    """A node's display name; unnamed MatMuls and Nonlins get an automatic one."""
    name = getattr(node, "name", None)
    if name:
        return name
    if isinstance(node, Embedding):
        return f"{node.weight.name}{node.input.name}"
    return None


def _display(eng: Engine, sym, labels) -> tuple:
    info = eng.info[sym]
    return tuple(labels[n] if n in labels else (getattr(n, "name", str(n)), None) for n in info.nodes)


# ----------------------------------------------------------------------------------- folding
def _fold(raw: _Raw, unrolled: _Unrolled):
    """Turn per-iteration equations into recursions in ``l``; None if the iterations differ."""
    eng = raw.engine
    tags = unrolled.tags
    if len(unrolled.repeats) != 1:
        return None                         # one loop per program for now; others stay unrolled
    rep, start, dstop, real_stop = unrolled.repeats[0]
    l = sp.Symbol("l", integer=True)

    def iteration_of(sym):
        """(family key, iteration) of a kernel symbol; iteration None if outside the loop."""
        info = eng.info[sym]
        its, fam = set(), []
        for n, c in zip(info.nodes, info.copies):
            tag = tags.get(n)
            if tag is not None and tag[0] == rep:
                its.add(tag[2])
                fam.append((tag[1], c))
            else:
                fam.append((n, c))
        if len(its) > 1:
            return "cross", None
        return (info.kind, tuple(fam)), (its.pop() if its else None)

    meta = {}
    for sym, _ in eng.equations:
        fam, it = iteration_of(sym)
        if fam == "cross":
            return None                    # cross-iteration kernels: keep the unrolled form
        meta[sym] = (fam, it)

    families: dict = {}

    def fam_id(fam):
        return families.setdefault(fam, len(families))

    def normalise(expr, k):
        """Replace every kernel symbol by a placeholder naming (family, offset from k)."""
        rep_map = {}
        for s in expr.free_symbols:
            if s in meta and meta[s][1] is not None:
                rep_map[s] = sp.Symbol(f"F{fam_id(meta[s][0])}_{meta[s][1] - k}")
        return expr.xreplace(rep_map)

    by_iter: dict[int, list] = {}
    for sym, rhs in eng.equations:
        fam, it = meta[sym]
        if it is not None and it >= start:
            by_iter.setdefault(it, []).append((sym, rhs))

    def part_of(sym):
        return "bwd" if eng.info[sym].kind == "D" else "fwd"

    def signature(k, part):
        return frozenset((fam_id(meta[s][0]), normalise(r, k)) for s, r in by_iter.get(k, [])
                         if part_of(s) == part)

    iters = list(range(start, dstop + 1))
    plan = {}
    for part in ("fwd", "bwd"):
        sigs = {k: signature(k, part) for k in iters}
        plan[part] = _find_range(sigs, iters, 1 if part == "fwd" else -1)
        if plan[part] is None:
            return None
    ntk_plan = _fold_ntk(raw, normalise, start)
    if ntk_plan is None:
        return None

    truncated = real_stop != sp.Integer(dstop)
    if truncated and any(p[1] - p[0] + 1 < 3 for p in plan.values() if p[0] <= p[1]):
        return None                            # not enough evidence to extrapolate the recursion
    if not truncated:
        # A one-iteration "loop" reads better as its concrete equations.
        plan = {part: (p if p[1] > p[0] else (p[0], p[0] - 1, None)) for part, p in plan.items()}
        if ntk_plan[1] <= ntk_plan[0]:
            ntk_plan = (start, start - 1, {})

    # ---- build the folded derivation
    bases = {}

    def base_of(fam):
        if fam not in bases:
            bases[fam] = sp.IndexedBase(_family_stem(fam))
        return bases[fam]

    def index_of(it, k_ref):
        """A derived iteration as an index of the real loop: ``l + offset`` inside a loop body;
        outside, absolute near the start and ``stop - j`` near the (possibly truncated) end."""
        if k_ref is not None:
            return l + (it - k_ref)
        if truncated and (dstop - it) < (it - start):
            return real_stop - (dstop - it)
        return sp.Integer(it)

    def rename(expr, k_ref):
        sub = {s: base_of(meta[s][0])[index_of(meta[s][1], k_ref)]
               for s in expr.free_symbols if s in meta and meta[s][1] is not None}
        return expr.xreplace(sub)

    loop_members = {}
    for part, (lo, hi, _) in plan.items():
        for k in range(lo, hi + 1):
            for s, _ in by_iter.get(k, []):
                if part_of(s) == part:
                    loop_members[s] = part

    # Order: each unit (an equation, or a loop block) provides and requires concrete
    # (family, iteration) entries of the derived iterations; sort topologically, stably.
    def ident(sym):
        return (meta[sym][0], meta[sym][1]) if sym in meta and meta[sym][1] is not None else sym

    units: list[dict] = []
    loops: dict[str, dict] = {}
    for i, (sym, rhs) in enumerate(eng.equations):
        needs = {ident(x) for x in rhs.free_symbols if x in eng.info}
        part = loop_members.get(sym)
        if part is None:
            units.append({"step": Equation(rename(sym, None), rename(rhs, None)),
                          "provides": {ident(sym)}, "requires": needs, "pos": i})
            continue
        if part not in loops:
            lo, hi, ref = plan[part]
            body = tuple(Equation(rename(s, ref), rename(r, ref)) for s, r in by_iter[ref]
                         if part_of(s) == part)
            stop = real_stop - (dstop - hi) if truncated else sp.Integer(hi)
            loops[part] = {"step": Loop(l, sp.Integer(lo), stop, 1 if part == "fwd" else -1, body),
                           "provides": set(), "requires": set(), "pos": i}
            units.append(loops[part])
        loops[part]["provides"].add(ident(sym))
        loops[part]["requires"] |= needs
    for u in loops.values():
        u["requires"] -= u["provides"]
    steps = _toposort(units)

    ntk_terms = {}
    for name, term in raw.ntk_terms.items():
        ntk_terms[name] = rename(term, None)
    summed = {}
    lo, hi, groups = ntk_plan
    for base_name, k_terms in groups.items():
        expr = rename(k_terms[hi], hi)
        summed[base_name] = sp.Sum(expr, (l, lo, real_stop - (dstop - hi) if truncated else hi))
        for k in range(lo, hi + 1):
            ntk_terms.pop(k_terms["names"][k], None)
    ntk_terms.update(summed)
    info = {}
    names = {}
    for fam, base in bases.items():
        sample = next(s for s in meta if meta[s][0] == fam)
        info[base.label] = eng.info[sample]
        names[base.label] = raw.names[sample]
    for sym in eng.info:
        if sym not in meta or meta[sym][1] is None:
            info[sym] = eng.info[sym]
            names[sym] = raw.names.get(sym)
    nngp = rename(raw.nngp, None) if raw.nngp is not None else None
    deriv = Derivation(raw.program, raw.mode, steps, nngp, sp.Add(*ntk_terms.values()), ntk_terms,
                       info, {s: eng.info[s] for s in eng.input_kernels.values()}, names,
                       loop_indices=(l,))
    return deriv


def _find_range(sigs: dict, iters: list, direction: int):
    """The longest run of iterations whose normalised equations agree: (lo, hi), loop body at hi.

    The iteration executed last (the top one going forward, the bottom one going backward) may
    need only a subset of the generic step: computing the rest there is harmless, since every
    input of the generic step exists by then.
    """
    if not any(sigs[k] for k in iters):
        return (iters[0], iters[0] - 1, None)        # nothing of this kind in the loop
    best = None
    for ref in iters:
        body = sigs[ref]
        if not body:
            continue
        lo = hi = ref
        while lo - 1 in sigs and (sigs[lo - 1] == body or (direction < 0 and sigs[lo - 1] < body)):
            lo -= 1
            if direction < 0 and sigs[lo] != body:
                break
        while hi + 1 in sigs and (sigs[hi + 1] == body or (direction > 0 and sigs[hi + 1] < body)):
            hi += 1
            if direction > 0 and sigs[hi] != body:
                break
        if best is None or hi - lo > best[1] - best[0]:
            best = (lo, hi, ref)
    return best


def _fold_ntk(raw: _Raw, normalise, start):
    """Group NTK terms of indexed parameters by iteration; check they agree up to a shift."""
    groups: dict = {}
    for name, term in raw.ntk_terms.items():
        if "@" not in name:
            continue
        stem, k = name.rsplit("@", 1)
        k = int(k)
        g = groups.setdefault(stem, {"names": {}})
        g[k] = term
        g["names"][k] = name
    if not groups:
        return (start, start - 1, {})
    ks = sorted(set().union(*[set(k for k in g if k != "names") for g in groups.values()]))
    lo, hi = ks[0], ks[-1]
    for stem, g in groups.items():
        ref = normalise(g[hi], hi)
        for k in ks:
            if k not in g or normalise(g[k], k) != ref:
                return None
    return (lo, hi, groups)


def _family_stem(fam) -> str:
    kind, members = fam
    stems = "_".join(dict.fromkeys(_stem(node) or "z" for node, _ in members))
    copies = "".join("x" if c is None else str(c) for _, c in members)
    return f"{kind}_{stems}_{copies}"


def _toposort(units: list[dict]) -> list:
    """Steps in dependency order, keeping the engine's order where dependencies allow."""
    provider = {}
    for i, u in enumerate(units):
        for key in u["provides"]:
            provider[key] = i
    order, state = [], {}

    def visit(i):
        if state.get(i) == 2:
            return
        if state.get(i) == 1:
            raise RuntimeError("circular dependency between derived equations (fold error)")
        state[i] = 1
        for key in sorted(units[i]["requires"], key=str):
            j = provider.get(key)
            if j is not None and j != i:
                visit(j)
        state[i] = 2
        order.append(units[i]["step"])

    for i in sorted(range(len(units)), key=lambda i: units[i]["pos"]):
        visit(i)
    return order
