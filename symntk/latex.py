"""LaTeX and plain-text printing of a :class:`~symntk.derivation.Derivation`.

The printer reads only the derivation's data (equations, loops, symbol meanings), never the
engine.  Kernel symbols are shown in the papers' notation (TP2 §4 and §6.1, Eqs. 6-12):

* ``sigma`` (default): Sigma for covariances of Gaussian vectors (preactivations), C for other
  second moments, mu for means, D for gradient (cotangent) kernels, K for the NNGP, Theta the NTK;
* ``cd``: C for every forward second moment (TP2's C / D notation).

Node names carry the layer as a superscript (``h^{l}``, ``x^{l-1}``); the input pair is (xi, xi').

By default the recursion reads like the papers (Jacot et al. 2018, TP2 App. E): the input kernel
is the named quantity Sigma^0(xi, xi') = xi^T xi' / d, every closed form of
:data:`symntk.gaussian.PAIR_RULES` that has a name is printed as its dual activation
``V(q, q', rho)`` applied to the variances and the correlation ``rho`` of a kernel, and these are
defined once, in a "where" block at the end.  The names and definitions come from the table
entries themselves (:class:`symntk.gaussian.ClosedForm`), so a new closed form needs no printer
change.  ``expand=True`` prints every closed form expanded in place instead.
"""
from __future__ import annotations

import re

import sympy as sp

from .equations import Derivation, Equation, Loop
from .gaussian import ClosedForm, DualActivation, GaussianExpectation, reduce_node

__all__ = ["derivation_latex", "derivation_text", "named_closed_forms", "expand_duals", "paper_form", "NOTATIONS"]

NOTATIONS = ("sigma", "cd")
_COPY = {0: r"\xi", 1: r"\xi'", None: ""}


def _node_latex(stem: str, iteration) -> str:
    """'x1' -> x^{1}; ('h', l-1) -> h^{l-1}; 'W1xi' stays, digits become a superscript."""
    m = re.fullmatch(r"([A-Za-z]+?)_?(\d+)", stem)
    base, sup = (m.group(1), m.group(2)) if m else (stem, None)
    base = _greek(base)
    if iteration is not None:
        sup = sp.latex(iteration) if not isinstance(iteration, str) else iteration
    return f"{base}^{{{sup}}}" if sup is not None else base


def _greek(name: str) -> str:
    return "\\" + name if name in {"xi", "zeta", "eta", "theta", "phi", "psi", "alpha", "beta",
                                   "gamma", "delta", "sigma", "mu", "nu", "omega"} else name


def _kernel_latex(info, nodes_display, index, notation) -> str:
    letter, sup, args = _kernel_parts(info, nodes_display, index, notation)
    return f"{letter}^{{{sup}}}({args})" if args else f"{letter}^{{{sup}}}"


def _kernel_parts(info, nodes_display, index, notation) -> tuple[str, str, str]:
    r"""(letter, superscript, arguments) of a kernel symbol, e.g. (\Sigma, h^{l}, \xi,\xi')."""
    copies = info.copies
    backward = info.extra.get("backward") and info.kind == "mu"
    if backward:
        nodes_display = [("d" + stem, it) for stem, it in nodes_display]
    if info.kind == "M":
        letter = r"\theta"
    elif info.kind == "mu":
        letter = r"\mu"
    elif info.kind == "D":
        letter = "D"
    elif notation == "sigma" and info.gaussian:
        letter = r"\Sigma"
    else:
        letter = "C"
    if info.extra.get("hat"):
        letter = rf"\hat{{{letter}}}"
    shown = []
    for (stem, it) in nodes_display:
        shown.append(_node_latex(stem, index if index is not None else it))
    sup = ",".join(dict.fromkeys(shown)) if len(set(shown)) == 1 else ",".join(shown)
    args = ",".join(_COPY[c] for c in copies if c is not None)
    if info.kind in ("mu", "M"):
        args = _COPY[copies[0]]
    return letter, sup, args


def _input_latex(info) -> str:
    i, j = info.copies
    if i == j:
        return rf"\frac{{\|{_COPY[i]}\|^{{2}}}}{{d}}"
    return rf"\frac{{{_COPY[i]}^{{\top}}{_COPY[j]}}}{{d}}"


#: Formal parameters of a dual activation V(q, q', rho): the two variances and the correlation.
_Q, _Q2, _RHO = sp.Symbol("q", positive=True), sp.Symbol("q'", positive=True), sp.Symbol("rho", real=True)


#: Order of the "where" block: the input kernel, correlations, then dual activations.
_WHERE_ORDER = {"input": 0, "input-tokens": 0, "rho": 1, "dual": 2}


def _dual_params(entry: ClosedForm) -> tuple:
    """The formal parameters the entry's dual depends on, in the order (q, q', rho)."""
    used = entry.dual(_Q, _Q2, _RHO).free_symbols
    return tuple(p for p in (_Q, _Q2, _RHO) if p in used)


class _Names:
    """Replace kernel symbols, Indexed entries and dual activations by placeholder Symbols with
    verbatim LaTeX names (``names``) and remember what each stands for (``definitions``).

    ``paper=True`` also names the input kernel Sigma^0 and the correlations rho of kernels, and
    collects the "where" block (``where``: key -> (lhs, rhs, note), in order of first use).
    """

    def __init__(self, d: Derivation, notation: str, paper: bool = False):
        self.d, self.notation, self.paper = d, notation, paper
        self.names: dict = {}
        self.definitions: dict = {}
        self.where: dict = {}
        self._cache: dict = {}
        self._single_input = len({n.name for info in d.inputs.values() for n in info.nodes}) <= 1

    def __call__(self, expr: sp.Expr, named: bool = True) -> sp.Expr:
        if self.paper and named:
            expr = expr.xreplace({n: self._dual(n)
                                  for n in sorted(expr.atoms(DualActivation), key=sp.default_sort_key)})
            expr = expr.replace(lambda e: e.is_Mul, self._rho_in)
        sub = {}
        for ind in sorted(expr.atoms(sp.Indexed), key=str):
            label = ind.base.label
            if self._positioned(label):
                sub[ind] = self._positioned_kernel(ind, label, ind.indices)
            else:
                sub[ind] = self._kernel(ind, label, ind.indices[0])
        labels = {ind.base.label for ind in expr.atoms(sp.Indexed)}
        for s in sorted(expr.free_symbols - labels, key=str):
            if isinstance(s, sp.Symbol) and (s in self.d.info or s in self.d.inputs):
                sub[s] = self._kernel(s, s, None)
        return expr.xreplace(sub)

    def tex(self, expr: sp.Expr, named: bool = True) -> str:
        return _tex(self(expr, named), self)

    def _placeholder(self, key, text: str, value: sp.Expr) -> sp.Symbol:
        # A placeholder named after what it stands for (not a Dummy): SymPy orders terms by name,
        # so the printed formula is the same in every process.
        dummy = sp.Symbol(f"symntk_{key}", real=True)
        self.names[dummy], self.definitions[dummy], self._cache[key] = text, value, dummy
        return dummy

    def _kernel(self, key, label, index):
        if key in self._cache:
            return self._cache[key]
        if label in self.d.inputs:
            text = self._input(self.d.inputs[label]) if self.paper else _input_latex(self.d.inputs[label])
        else:
            text = _kernel_latex(self.d.info[label], self._shown(label), index, self.notation)
        return self._placeholder(key, text, key)

    def _positioned(self, label) -> bool:
        info = self.d.inputs.get(label) or self.d.info.get(label)
        return bool(info is not None and info.extra.get("positions"))

    def _positioned_kernel(self, key, label, indices):
        """A kernel between vectors at positions: C^{s}(xi^{t-1}, xi'^{r-1}) (TP2 §6.2.1 writes
        C^{s^t, s-bar^r}); the input kernel of tokens Sigma^0(xi^t, xi'^r) = xi^t . xi'^r / d."""
        if key in self._cache:
            return self._cache[key]
        if label in self.d.inputs:
            info = self.d.inputs[label]
            args = [rf"{_COPY[c]}^{{{sp.latex(i)}}}" for c, i in zip(info.copies, indices)]
            if self.paper:
                letter = r"\Sigma" if self.notation == "sigma" else "C"
                sup = self._input_sup(info)
                self.where.setdefault(("input-tokens", sup), (
                    rf"{letter}^{{{sup}}}(\xi^{{t}},\xi'^{{r}})",
                    r"\frac{\xi^{t\top}\xi'^{r}}{d}", "input kernel of tokens"))
                text = rf"{letter}^{{{sup}}}({','.join(args)})"
            else:
                text = rf"\frac{{{{{args[0]}}}^{{\top}}{args[1]}}}{{d}}"
            return self._placeholder(key, text, key)
        info = self.d.info[label]
        letter, sup, _ = _kernel_parts(info, self._shown(label), None, self.notation)
        at = dict(zip(info.extra.get("generic", ()), indices))
        args = []
        for c, pos in zip(info.copies, info.extra.get("atom_positions", ())):
            if c is None:
                continue
            name = _COPY[c]
            args.append(name if pos is None else
                        rf"{name}^{{{sp.latex(sp.sympify(pos).xreplace(at))}}}")
        return self._placeholder(key, f"{letter}^{{{sup}}}({','.join(args)})", key)

    def _shown(self, label):
        return self.d.names.get(label) or [("z", None)]

    # ---- paper form: named quantities, each defined once in the "where" block
    def _input_sup(self, info) -> str:
        return "0" if self._single_input else ",".join(dict.fromkeys(_greek(n.name) for n in info.nodes))

    def _input(self, info) -> str:
        """Sigma^0(xi, xi') = xi^T xi' / d, the input kernel (Jacot et al. 2018's Sigma^(0))."""
        letter = r"\Sigma" if self.notation == "sigma" else "C"
        sup = self._input_sup(info)
        self.where.setdefault(("input", sup), (rf"{letter}^{{{sup}}}(\xi,\xi')",
                                               r"\frac{\xi^{\top}\xi'}{d}", "input kernel"))
        return f"{letter}^{{{sup}}}({','.join(_COPY[c] for c in info.copies)})"

    def _dual(self, node: DualActivation) -> sp.Symbol:
        """V(q, q', rho) applied to the variances and the correlation of its Gaussian pair."""
        key = f"V_{node}"
        if key in self._cache:
            return self._cache[key]
        entry = node.entry
        s11, s12, s22, c = node.stats
        rho = self._rho(s11, s12, s22)
        actual = {_Q: s11, _Q2: s22, _RHO: c if rho is None else rho}
        params = _dual_params(entry)
        if ("dual",) not in self.where:
            self.where[("dual",)] = (
                r"V_{\phi,\psi}(q,q',\rho)",
                r"\mathbb{E}\left[\phi(u)\,\psi(v)\right] \text{ for centred jointly Gaussian } u, v"
                r" \text{ with } \mathbb{E}u^{2} = q,\ \mathbb{E}v^{2} = q',\ \mathbb{E}uv = \rho\sqrt{q q'}",
                "dual activation, TP2 Def. E.1")
        self.where.setdefault(("dual", entry.name), (
            rf"{entry.name}({','.join(sp.latex(p) for p in params)})",
            _tex(entry.dual(_Q, _Q2, _RHO), self), entry.reference))
        text = rf"{entry.name}\left({', '.join(self.tex(actual[p]) for p in params)}\right)"
        # What the printed line says: the where-block definition at the actual arguments.
        return self._placeholder(key, text, entry.dual(actual[_Q], actual[_Q2], actual[_RHO]))

    def _kernel_atom(self, x):
        """(label, index, info) of a kernel symbol or Indexed entry, else None."""
        label, index = (x.base.label, x.indices[0]) if isinstance(x, sp.Indexed) else (x, None)
        if not isinstance(label, sp.Symbol):
            return None
        info = self.d.inputs.get(label) or self.d.info.get(label)
        return None if info is None else (label, index, info)

    def _rho(self, s11, s12, s22) -> sp.Symbol | None:
        """The placeholder of rho^k(xi, xi') if (s11, s12, s22) are the entries of one kernel k."""
        atoms = [self._kernel_atom(x) for x in (s11, s12, s22)]
        if (None in atoms or len({(a[1], a[2].nodes, a[2].kind) for a in atoms}) != 1
                or [a[2].copies for a in atoms] != [(0, 0), (0, 1), (1, 1)]):
            return None
        key = f"rho_{s12}"
        if key in self._cache:
            return self._cache[key]
        label, index, info = atoms[1]
        generic, g_index = (s11, s12, s22), index
        if info.kind == "input":
            sup = g_sup = self._input_sup(info)
        else:
            if index is not None and self.d.loops:   # one definition for the family, in the loop index
                g_index = self.d.loops[0].index
                generic = tuple(x.base[g_index] for x in generic)
            sup = _kernel_parts(info, self._shown(label), index, self.notation)[1]
            g_sup = _kernel_parts(info, self._shown(label), g_index, self.notation)[1]
        where_key = ("rho", label, None if g_index is None or g_index.free_symbols else g_index)
        if where_key not in self.where:
            k11, k12, k22 = generic
            self.where[where_key] = (rf"\rho^{{{g_sup}}}(\xi,\xi')",
                                     self.tex(k12 / (sp.sqrt(k11) * sp.sqrt(k22)), named=False),
                                     "correlation")
        return self._placeholder(key, rf"\rho^{{{sup}}}(\xi,\xi')", s12 / (sp.sqrt(s11) * sp.sqrt(s22)))

    def _rho_in(self, mul: sp.Mul) -> sp.Expr:
        """``k12^n k11^(-n/2) k22^(-n/2)`` inside a product -> ``rho^n`` (expanded closed forms)."""
        powers = mul.as_powers_dict()
        for b12, n in powers.items():
            a12 = self._kernel_atom(b12)
            if a12 is None or a12[2].copies != (0, 1):
                continue
            diag = {}
            for b, m in powers.items():
                a = self._kernel_atom(b)
                if (a is not None and m == -n / 2 and (a[1], a[2].nodes, a[2].kind)
                        == (a12[1], a12[2].nodes, a12[2].kind) and a[2].copies in ((0, 0), (1, 1))):
                    diag[a[2].copies] = b
            if len(diag) == 2:
                rho = self._rho(diag[(0, 0)], b12, diag[(1, 1)])
                if rho is not None:
                    rest = [b ** m for b, m in powers.items() if b not in (b12, diag[(0, 0)], diag[(1, 1)])]
                    return sp.Mul(rho ** n, *rest)
        return mul


def _loop_header(loop: Loop) -> str:
    l = sp.latex(loop.index)
    if loop.direction > 0:
        return rf"&\text{{for }} {l} = {sp.latex(loop.start)}, \dots, {sp.latex(loop.stop)}:"
    return rf"&\text{{for }} {l} = {sp.latex(loop.stop)}, \dots, {sp.latex(loop.start)}" \
           r"\ \text{(backward)}:"


def named_closed_forms(d: Derivation) -> tuple[list, sp.Expr | None, sp.Expr]:
    """``(steps, nngp, ntk)`` of ``d.reduced()``, with every closed form that has a name left as a
    :class:`~symntk.gaussian.DualActivation` node.

    Substituting ``.doit()`` into those nodes gives ``d.reduced()`` exactly: an expression for
    which it would not (a change of the reduction policy) is taken from ``d.reduced()`` as is.
    """
    red = d.reduced()
    if d.closed_forms:
        return red.steps, red.nngp, red.ntk

    def named(expr, ref):
        out = {}
        for n in expr.atoms(GaussianExpectation):
            out[n] = reduce_node(n, named=True)      # the derivation's policy
        candidate = expr.xreplace(out)
        return candidate if expand_duals(candidate) == ref else ref

    steps = []
    for s, r in zip(d.steps, red.steps):
        if isinstance(s, Loop):
            steps.append(Loop(s.index, s.start, s.stop, s.direction,
                              tuple(Equation(e.lhs, named(e.rhs, f.rhs))
                                    for e, f in zip(s.equations, r.equations))))
        else:
            steps.append(Equation(s.lhs, named(s.rhs, r.rhs)))
    nngp = None if d.nngp is None else named(d.nngp, red.nngp)
    return steps, nngp, named(d.ntk, red.ntk)


def paper_form(d: Derivation, notation: str = "sigma") -> tuple[list[tuple[sp.Expr, sp.Expr]], dict]:
    """What the default :func:`derivation_latex` prints, as SymPy.

    Returns ``(rows, definitions)``: ``rows`` pairs every equation's left-hand side (and the
    symbols ``K``, ``Theta``) with its printed right-hand side, an expression in placeholder
    Symbols; ``definitions`` maps each placeholder to what it stands for (a kernel symbol, the
    input kernel, ``rho = k12 / sqrt(k11 k22)``, or a dual activation's where-block definition
    at its arguments), possibly in other placeholders.  Substituting them back gives
    ``d.reduced()``'s equations.
    """
    steps, nngp, ntk = named_closed_forms(d)
    names = _Names(d.reduced(), notation, paper=True)
    rows = [(e.lhs, names(e.rhs)) for s in steps for e in (s.equations if isinstance(s, Loop) else [s])]
    if nngp is not None:
        rows.append((sp.Symbol("K"), names(nngp)))
    rows.append((sp.Symbol("Theta"), names(ntk)))
    return rows, dict(names.definitions)


def expand_duals(expr: sp.Expr) -> sp.Expr:
    """Every :class:`~symntk.gaussian.DualActivation` node replaced by its closed form."""
    return expr.xreplace({n: n.doit() for n in expr.atoms(DualActivation)})


def _jumps_line(jumps) -> str:
    """One line naming the nonlinearities that jump and the convention their NTK uses."""
    which = ", ".join(dict.fromkeys(
        rf"{sp.latex(expr)} \text{{ at }} " + r",\ ".join(sp.latex(p) for p in pts)
        for _, expr, pts in jumps))
    return (rf"&\text{{jumps: }} {which} \quad \text{{(derivative almost everywhere: 0 at a "
            r"jump, as autodiff and Neural Tangents)}")


def derivation_latex(d: Derivation, notation: str = "sigma", closed_forms: bool = True,
                     environment: str = "aligned", standalone: bool = False,
                     highlight_zdot: bool = False, expand: bool = False) -> str:
    """The recursion as LaTeX.

    By default it reads like the papers: the input kernel Sigma^0, the correlations rho and the
    dual activations V of the closed-form table (arc-cosine kernels, Cho & Saul 2009; Williams
    1997) are named in the equations and defined once in a final "where" block.
    ``expand=True``: every closed form written out in place, inputs as xi^T xi'/d.
    ``closed_forms``: substitute the closed-form table for Gaussian expectations (else they are
    printed as E over N(0, Sigma)).  ``environment``: ``aligned`` (inside math mode) or ``align*``.
    ``standalone=True``: a complete document that compiles with pdflatex.
    ``highlight_zdot``: colour the equations of exact mode that carry Zdot terms (TP3 Box 1).
    """
    if notation not in NOTATIONS:
        raise ValueError(f"unknown notation {notation!r}; expected one of {NOTATIONS}")
    paper = not expand
    if closed_forms and paper:
        steps, nngp, ntk = named_closed_forms(d)
        d = d.reduced()
    else:
        if closed_forms:
            d = d.reduced()
        steps, nngp, ntk = d.steps, d.nngp, d.ntk
    names = _Names(d, notation, paper=paper)
    lines = []

    def emit(eq: Equation, indent=""):
        lhs, rhs = names.tex(eq.lhs), names.tex(eq.rhs)
        info = d.info.get(eq.family)
        if highlight_zdot and info is not None and info.extra.get("zdot"):
            lhs, rhs = rf"{{\color{{red}}{lhs}}}", rf"{{\color{{red}}{rhs}}}"
        lines.append(f"{indent}{lhs} &= {rhs}")

    forward = [s for s in steps if not _is_backward(d, s)]
    backward = [s for s in steps if _is_backward(d, s)]
    for title, group in (("forward (NNGP) recursion", forward), ("backward (gradient) recursion", backward)):
        if not group:
            continue
        lines.append(rf"&\textbf{{{title}}}")
        for s in group:
            if isinstance(s, Loop):
                lines.append(_loop_header(s))
                for e in s.equations:
                    emit(e, r"\quad ")
            else:
                emit(s)
    lines.append(r"&\textbf{kernels}")
    if nngp is not None:
        lines.append(rf"K(\xi,\xi') &= {names.tex(nngp)}")
    lines.append(rf"\Theta(\xi,\xi') &= {names.tex(ntk)}")
    if d.jumps:
        lines.append(_jumps_line(d.jumps))
    if names.where:
        lines.append(r"&\textbf{where}")
        for _, (lhs, rhs, note) in sorted(names.where.items(), key=lambda kv: _WHERE_ORDER[kv[0][0]]):
            lines.append(rf"{lhs} &= {rhs}" + (rf" \quad \text{{({_escape(note)})}}" if note else ""))
    body = " \\\\\n".join(lines)
    if standalone:
        return _document(body, d)
    if environment == "align*":
        return "\\begin{align*}\n" + body + "\n\\end{align*}"
    return "\\begin{aligned}\n" + body + "\n\\end{aligned}"


def _tex(expr, names: _Names) -> str:
    return sp.latex(expr, symbol_names=names.names, inv_trig_style="full")


def _is_backward(d: Derivation, step) -> bool:
    eqs = step.equations if isinstance(step, Loop) else [step]
    return all(d.info.get(e.family) is not None and d.info[e.family].kind == "D" for e in eqs)


def _document(body: str, d: Derivation) -> str:
    return "\n".join([
        r"\documentclass[10pt]{article}",
        r"\usepackage[margin=1.5cm,landscape]{geometry}",
        r"\usepackage{amsmath,amssymb,color}",
        r"\allowdisplaybreaks",
        r"\begin{document}",
        rf"\section*{{NNGP and NTK of \texttt{{{_escape(d.program.name)}}} ({d.mode.upper()})}}",
        r"\begin{align*}",
        body,
        r"\end{align*}",
        r"\end{document}",
        "",
    ])


def _escape(text: str) -> str:
    return re.sub(r"([_#%&$])", r"\\\1", text)


def derivation_text(d: Derivation) -> str:
    """Plain-text listing of the equations (for terminals and logs)."""
    lines = [f"{d.program.name} ({d.mode})"]
    for s in d.steps:
        if isinstance(s, Loop):
            rng = f"{s.start}..{s.stop}" if s.direction > 0 else f"{s.stop}..{s.start} (backward)"
            lines.append(f"for {s.index} = {rng}:")
            lines.extend(f"    {e.lhs} = {e.rhs}" for e in s.equations)
        else:
            lines.append(f"{s.lhs} = {s.rhs}")
    if d.nngp is not None:
        lines.append(f"nngp = {d.nngp}")
    lines.append(f"ntk = {d.ntk}")
    return "\n".join(lines)


def conv_latex(d, environment: str = "align*") -> str:
    """The pixel-pair recursion of a convolutional derivation (:mod:`symntk.convolution`), one
    line per rule and layer, indices p, q over pixels and k over filter offsets."""
    lines = []
    for lhs, rhs, note in d.equations:
        tail = r" && \text{%s}" % _escape(note) if note else ""
        lines.append(f"{sp.latex(lhs)} &= {sp.latex(rhs)}{tail}")
    body = " \\\\\n".join(lines)
    return f"\\begin{{{environment}}}\n{body}\n\\end{{{environment}}}"
