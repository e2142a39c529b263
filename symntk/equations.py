"""The derived system of equations, as plain data (the output of :func:`symntk.derive`).

A :class:`Derivation` is what the Z calculus says about a program (TP2 Box 1, Eqs. 10-12; TP3
Box 1): kernel symbols defined by equations in evaluation order, recursions kept as loops in the
layer index ``l`` or as families over positions ``(t, r)``, and the NNGP and NTK as expressions in
those symbols.  It is frozen and knows nothing about LaTeX or Numba: printers, evaluators and code
generators read it (the thin methods below only dispatch to them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy as sp

from .program import Program

__all__ = ["Equation", "Loop", "Derivation"]


# ----------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Equation:
    """``lhs = rhs``.  ``lhs`` is a Symbol or an Indexed ``F[l + k]`` inside a loop."""
    lhs: sp.Expr
    rhs: sp.Expr

    @property
    def family(self) -> sp.Symbol:
        return self.lhs.base.label if isinstance(self.lhs, sp.Indexed) else self.lhs


@dataclass(frozen=True)
class Loop:
    """``for l in range(start, stop + 1)`` (or downwards if ``direction < 0``): equations in ``l``."""
    index: sp.Symbol
    start: sp.Expr
    stop: sp.Expr
    direction: int
    equations: tuple[Equation, ...]


@dataclass(frozen=True, repr=False)
class Derivation:
    """The derived NNGP/NTK of a program for a pair of inputs (xi, xi').

    ``steps`` is the evaluation order: ``Equation``s and ``Loop``s.  ``nngp`` and ``ntk`` are
    expressions in the step symbols (``ntk`` may contain ``Sum`` over a loop index);
    ``ntk_terms`` splits the NTK by parameter.  ``info`` maps every symbol (or ``IndexedBase``
    label) to a :class:`~symntk.zcalculus.SymbolInfo`; ``inputs`` maps the data symbols
    ``xi_i . xi_j / d`` to the input copies.
    """
    program: Program
    mode: str
    steps: list
    nngp: sp.Expr | None
    ntk: sp.Expr
    ntk_terms: dict
    info: dict
    inputs: dict
    names: dict                       # symbol / IndexedBase label -> display name (node label)
    unrolled_repeats: tuple = ()
    loop_indices: tuple = ()
    closed_forms: bool = False
    diagonal: "Derivation | None" = None   # the same system for k(xi, xi): exact diagonals
    position_symbols: tuple = ()           # position indices and lengths (t, r, T, Tbar)
    #: nonlinearities that jump, as (label, phi, jump points): their NTK uses the derivative
    #: almost everywhere (zero at the jump), as autodiff and Neural Tangents' Sign do
    jumps: tuple = ()
    _reduced: object = field(default=None, repr=False, compare=False)
    _numeric: object = field(default=None, repr=False, compare=False)

    def reduced(self) -> "Derivation":
        """The same equations with the closed-form table applied to every Gaussian expectation
        that has a closed form (TP2 Facts E.2, E.3); the rest stay explicit nodes for quadrature."""
        if self.closed_forms:
            return self
        if self._reduced is None:
            from .zcalculus import reduce_expectations as r

            def step(s):
                if isinstance(s, Loop):
                    return Loop(s.index, s.start, s.stop, s.direction,
                                tuple(Equation(e.lhs, r(e.rhs)) for e in s.equations))
                return Equation(s.lhs, r(s.rhs))
            object.__setattr__(self, "_reduced", replace(   # a cache: the data stay frozen
                self, steps=[step(s) for s in self.steps],
                nngp=None if self.nngp is None else r(self.nngp), ntk=r(self.ntk),
                ntk_terms={k: r(v) for k, v in self.ntk_terms.items()}, closed_forms=True,
                diagonal=None if self.diagonal is None else self.diagonal.reduced(),
                _reduced=None, _numeric=None))
        return self._reduced

    def numeric(self) -> "Derivation":
        """What the numeric paths evaluate: :meth:`reduced` with stable correlations near 1 and
        the zero-variance limits of the closed-form table (:func:`symntk.numerics.numeric_form`)."""
        from .numerics import numeric_form
        return numeric_form(self)

    def __repr__(self) -> str:
        return (f"<Derivation of {self.program.name!r} ({self.mode}): {len(self.equations)} "
                f"equations, {len(self.loops)} loops, NTK terms {sorted(self.ntk_terms)}>")

    @property
    def equations(self) -> list[Equation]:
        """All equations, loops flattened (loop bodies listed once)."""
        out = []
        for s in self.steps:
            out.extend(s.equations if isinstance(s, Loop) else [s])
        return out

    @property
    def loops(self) -> list[Loop]:
        return [s for s in self.steps if isinstance(s, Loop)]

    def parameters(self) -> set[sp.Symbol]:
        """Free model symbols (variances, widths) that must be bound to get numbers."""
        known = set(self.info) | set(self.inputs) | set(self.loop_indices) | \
            set(self.position_symbols)
        free = set()
        for e in self.equations:
            free |= e.rhs.free_symbols
        free |= self.ntk.free_symbols
        if self.nngp is not None:
            free |= self.nngp.free_symbols
        return {s for s in free
                if s not in known and not isinstance(s, (sp.Idx, sp.Indexed, sp.IndexedBase))}

    # Printing and numbers live in their own modules; these are thin conveniences.
    def latex(self, **options) -> str:
        from .latex import derivation_latex
        return derivation_latex(self, **options)

    def _repr_latex_(self) -> str:
        return "$\\displaystyle " + self.latex(environment="aligned") + "$"

    def __str__(self) -> str:
        from .latex import derivation_text
        return derivation_text(self)

    def gram(self, X1, X2=None, **options):
        """NNGP and NTK Gram matrices by direct evaluation of the equations (NumPy)."""
        from .evaluate_positions import gram as positions_gram, has_positions
        if has_positions(self):
            return positions_gram(self, X1, X2, **options)
        from .evaluate import gram
        return gram(self, X1, X2, **options)

    def evaluate(self, x1, x2=None, **options):
        """NNGP and NTK for one pair of inputs."""
        from .evaluate import evaluate_pair
        return evaluate_pair(self, x1, x2, **options)

    def kernel_function(self, stacklevel: int = 2):
        """``k(X1, X2=None, params=None, diagonal=False)``: the compiled kernel, or, where the code
        generator does not handle this derivation yet, the NumPy evaluator (with a RuntimeWarning
        that says why)."""
        import warnings
        try:
            return self.compile()
        except NotImplementedError as exc:
            warnings.warn(f"compiled kernel unavailable ({exc}); using the NumPy evaluator",
                          RuntimeWarning, stacklevel=stacklevel + 1)

        def reference(X1, X2=None, params=None, diagonal=False):
            return self.gram(X1, X2, params=params, diagonal=diagonal)
        return reference

    def compile(self, **options):
        """A Numba kernel for these equations (cached on disk): ``k = d.compile(); k(X1, X2)``."""
        if any(inp.positions for inp in self.program.inputs):
            from .codegen.positions import compile_positions
            return compile_positions(self, **options)
        from .kernels import compile as _compile
        return _compile(self, **options)
