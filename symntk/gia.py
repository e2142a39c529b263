"""The Simple GIA Check (TP2 Condition 1, TP2 §5, TP3 App. C), decided statically on the program graph.

GIA (the gradient independence assumption, TP2 Heuristic 4.1) computes the NTK as if W^T in backprop were
independent of W.  TP2 §5 / TP3 App. C: this gives the right limit when

1. the output layer is a trained weight v, sampled with zero mean independently of everything
   else, and not used anywhere inside the network (the output v^T x does not let x depend on v);
2. no weight matrix is (the transpose of) another one used in the forward pass.

Then the forward+backward program is BP-like (TP2 Def. A.3): every backward vector is linear, hence
odd, in v, and no forward vector depends on v, so every Zdot vanishes (TP2 Thm 7.2, TP3 Thm D.1).
"""
from __future__ import annotations

from dataclasses import dataclass

from .program import Embedding, FixedReadout, MatMul, Program, Readout, VectorReadout

__all__ = ["GIACheck", "gia_check"]


@dataclass(frozen=True)
class GIACheck:
    """``holds``: the Simple GIA Check passes (GIA is exact); ``reasons``: what breaks it."""
    holds: bool
    reasons: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.holds

    def __str__(self) -> str:
        if self.holds:
            return ("Simple GIA Check holds: the readout is an independent zero-mean trained "
                    "weight and no weight is used transposed in the forward pass, so the program "
                    "is BP-like and GIA gives the exact NTK (TP2 Thm 7.2).")
        return "Simple GIA Check FAILS; GIA may give a wrong NTK:\n" + \
            "\n".join(f"  - {r}" for r in self.reasons)


def _fixed_readout(prog: Program, out: FixedReadout) -> list[str]:
    return [f"the readout is a fixed sum over the coordinates of {out.vector.label()!r} "
            "(an all-ones, nonzero-mean readout), not a zero-mean trained weight"]


def _vector_readout(prog: Program, out: VectorReadout) -> list[str]:
    u = out.weight
    embeds = sorted({n.weight.label() for n in prog.nodes if isinstance(n, Embedding)
                     and n in u.atoms(Embedding)})
    what = f"the input embedding ({', '.join(embeds)})" if embeds else "a vector of the network"
    return [f"the readout vector {u.label()!r} is {what}, computed by the network and "
            "not an independent zero-mean trained weight"]


def _trained_readout(prog: Program, out: Readout) -> list[str]:
    v = out.weight
    inside = [n for n in prog.nodes if isinstance(n, (MatMul, Embedding)) and n.weight == v]
    if inside:
        return [f"the readout weight {v.label()!r} is also used inside the network "
                f"(in {inside[0].label()!r})"]
    return []


#: readout kind -> the reasons it breaks TP2 Condition 1 (empty: it satisfies it).
READOUT_FACTS = {
    Readout: _trained_readout,
    VectorReadout: _vector_readout,
    FixedReadout: _fixed_readout,
}


def gia_check(program: Program) -> GIACheck:
    """Decide the Simple GIA Check for ``program``, naming every node that breaks it."""
    prog = program.unrolled()
    reasons = list(READOUT_FACTS[type(prog.output)](prog, prog.output))
    seen = set()
    for n in prog.nodes:
        if isinstance(n, MatMul) and n.transposed and n.weight not in seen:
            seen.add(n.weight)
            w = n.weight.label()
            reasons.append(f"{w} is used as {w}.T in the forward pass (in {n.label()!r}), so W and "
                           "W^T interact outside backprop")
    return GIACheck(not reasons, tuple(reasons))
