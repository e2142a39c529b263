"""LaTeX and plain-text printing of a :class:`~symntk.derivation.Derivation`.

The printer reads only the derivation's data (equations, loops, symbol meanings), never the
engine.  Kernel symbols are shown in the papers' notation (theory §2-3):

* ``sigma`` (default): Sigma for covariances of Gaussian vectors (preactivations), C for other
  second moments, mu for means, D for gradient (cotangent) kernels, K for the NNGP, Theta the NTK;
* ``cd``: C for every forward second moment (TP2's C / D notation).

Node names carry the layer as a superscript (``h^{l}``, ``x^{l-1}``); the input pair is (xi, xi').
"""
from __future__ import annotations

import re

import sympy as sp

from .derivation import Derivation, Equation, Loop

__all__ = ["derivation_latex", "derivation_text", "NOTATIONS"]

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
    return f"{letter}^{{{sup}}}({args})" if args else f"{letter}^{{{sup}}}"


def _input_latex(info) -> str:
    i, j = info.copies
    if i == j:
        return rf"\frac{{\|{_COPY[i]}\|^{{2}}}}{{d}}"
    return rf"\frac{{{_COPY[i]}^{{\top}}{_COPY[j]}}}{{d}}"


class _Names:
    """Replace kernel symbols and Indexed entries by Dummies with verbatim LaTeX names."""

    def __init__(self, d: Derivation, notation: str):
        self.d, self.notation, self.names = d, notation, {}
        self._cache = {}

    def __call__(self, expr: sp.Expr) -> sp.Expr:
        sub = {}
        for ind in sorted(expr.atoms(sp.Indexed), key=str):
            sub[ind] = self._dummy(ind, ind.base.label, ind.indices[0])
        for s in sorted(expr.free_symbols, key=str):
            if isinstance(s, sp.Symbol) and (s in self.d.info or s in self.d.inputs):
                sub[s] = self._dummy(s, s, None)
        return expr.xreplace(sub)

    def _dummy(self, key, label, index):
        if key in self._cache:
            return self._cache[key]
        if label in self.d.inputs:
            text = _input_latex(self.d.inputs[label])
        else:
            info = self.d.info[label]
            text = _kernel_latex(info, self.d.names.get(label) or [("z", None)], index, self.notation)
        # A placeholder named after the kernel (not a Dummy): SymPy orders terms by name, so the
        # printed formula is the same in every process.
        dummy = sp.Symbol(f"symntk_{key}", real=True)
        self.names[dummy] = text
        self._cache[key] = dummy
        return dummy


def _loop_header(loop: Loop) -> str:
    l = sp.latex(loop.index)
    if loop.direction > 0:
        return rf"&\text{{for }} {l} = {sp.latex(loop.start)}, \dots, {sp.latex(loop.stop)}:"
    return rf"&\text{{for }} {l} = {sp.latex(loop.stop)}, \dots, {sp.latex(loop.start)}" \
           r"\ \text{(backward)}:"


def derivation_latex(d: Derivation, notation: str = "sigma", closed_forms: bool = True,
                     environment: str = "aligned", standalone: bool = False,
                     highlight_zdot: bool = False) -> str:
    """The recursion as LaTeX.

    ``closed_forms``: substitute the closed-form table for Gaussian expectations (else they are
    printed as E over N(0, Sigma)).  ``environment``: ``aligned`` (inside math mode) or ``align*``.
    ``standalone=True``: a complete document that compiles with pdflatex.
    ``highlight_zdot``: colour the equations of exact mode that carry Zdot terms (TP3 Box 1).
    """
    if notation not in NOTATIONS:
        raise ValueError(f"unknown notation {notation!r}; expected one of {NOTATIONS}")
    if closed_forms:
        d = d.reduced()
    names = _Names(d, notation)
    lines = []

    def emit(eq: Equation, indent=""):
        lhs, rhs = _tex(names(eq.lhs), names), _tex(names(eq.rhs), names)
        info = d.info.get(eq.family)
        if highlight_zdot and info is not None and info.extra.get("zdot"):
            lhs, rhs = rf"{{\color{{red}}{lhs}}}", rf"{{\color{{red}}{rhs}}}"
        lines.append(f"{indent}{lhs} &= {rhs}")

    forward = [s for s in d.steps if not _is_backward(d, s)]
    backward = [s for s in d.steps if _is_backward(d, s)]
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
    if d.nngp is not None:
        lines.append(rf"K(\xi,\xi') &= {_tex(names(d.nngp), names)}")
    lines.append(rf"\Theta(\xi,\xi') &= {_tex(names(d.ntk), names)}")
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
