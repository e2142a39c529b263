"""scikit-learn integration (optional extra ``symntk[sklearn]``): any derived kernel as a
:class:`sklearn.gaussian_process.kernels.Kernel`.

``TensorProgramKernel(program, kind="nngp", **values)`` evaluates the NNGP (or NTK) of a program
whose variances are SymPy symbols; every free symbol of the derivation (except the input
dimension, which comes from the data) is a hyperparameter, named by the symbol, with
``<name>_bounds``.  Following scikit-learn, ``theta`` is the log of the hyperparameters, so they
must be positive.

``eval_gradient=True`` returns dK/dtheta_p = p dK/dp from *forward-mode differentiation of the
recursion*: every equation F = rhs(G_1, ..., p) of the derivation gets a tangent equation
dF/dp = d rhs/dp + sum_j (d rhs/dG_j) dG_j/dp (chain rule, each partial expanded so that the
removable singularities of the arc-cosine closed forms at correlation 1 cancel symbolically),
evaluated by the NumPy reference evaluator alongside the kernel.  Expectations without a closed
form (quadrature nodes) have no symbolic derivative here: such kernels raise
``NotImplementedError`` for ``eval_gradient``.

The kernel works in ``GaussianProcessRegressor`` (marginal-likelihood fit of the variances) and,
through ``kernel(X, Y)``, as a precomputed Gram matrix for ``SVC(kernel="precomputed")`` or
``KernelRidge(kernel="precomputed")``.
"""
from __future__ import annotations

import weakref

import numpy as np
import sympy as sp

try:
    from sklearn.gaussian_process.kernels import Hyperparameter, Kernel
except ImportError as exc:                      # pragma: no cover - exercised without the extra
    raise ImportError("symntk.sklearn_kernel needs scikit-learn: pip install 'symntk[sklearn]'") \
        from exc

from .derivation import derive
from .equations import Derivation, Equation, Loop
from .program import Program

__all__ = ["TensorProgramKernel", "tangent_derivation", "hyperparameter_symbols"]

KINDS = ("nngp", "ntk")
_DERIVATIONS = weakref.WeakKeyDictionary()   # program -> mode -> [derivation, compiled, tangents]


# ------------------------------------------------------------------------ forward mode
def hyperparameter_symbols(derivation: Derivation) -> list[sp.Symbol]:
    """The derivation's free symbols that can be hyperparameters: not an input dimension (known
    from the data) and not in a loop bound (an integer depth)."""
    dims = {s for inp in derivation.program.inputs for s in sp.sympify(inp.dim).free_symbols}
    bounds = set()
    for loop in derivation.loops:
        bounds |= sp.sympify(loop.start).free_symbols | sp.sympify(loop.stop).free_symbols
    return sorted(derivation.parameters() - dims - bounds, key=str)


def _expectations(expr):
    from .gaussian import GaussianExpectation
    return expr.atoms(GaussianExpectation)


def tangent_derivation(derivation: Derivation, symbols) -> Derivation:
    """The derivation extended by forward-mode tangent equations d(.)/dp for each p in
    ``symbols``; its ``ntk_terms`` are ``{"nngp/p": dK/dp, "ntk/p": dTheta/dp}`` (and the same for
    its diagonal system), so :func:`symntk.evaluate.gram` evaluates kernel and derivatives in
    one pass."""
    r = derivation.reduced()
    symbols = list(symbols)
    eqs = r.equations
    left = [e for e in eqs if _expectations(e.rhs)]
    if left:
        raise NotImplementedError(
            f"{len(left)} equation(s) keep a Gaussian expectation without a closed form "
            f"(e.g. {left[0].lhs}); their derivative needs quadrature of a derivative, which is "
            "not implemented: use a kernel whose expectations have closed forms")
    tangents: dict = {}                       # (symbol or IndexedBase label, p) -> tangent
    info = dict(r.info)
    for e in eqs:
        key = e.family
        for p in symbols:
            if (key, p) in tangents:
                continue
            if isinstance(e.lhs, sp.Indexed):
                tangents[key, p] = sp.IndexedBase(sp.Dummy(f"d_{key}_d_{p}"))
                info[tangents[key, p].label] = r.info.get(key)
            else:
                tangents[key, p] = sp.Dummy(f"d_{key}_d_{p}")
                info[tangents[key, p]] = r.info.get(key)

    def tangent_of(atom, p):
        if isinstance(atom, sp.Indexed):
            base = tangents.get((atom.base.label, p))
            return None if base is None else base[atom.indices]
        return tangents.get((atom, p))

    def d(expr, p):
        expr = sp.sympify(expr)
        if isinstance(expr, sp.Add) and any(isinstance(a, sp.Sum) for a in expr.args):
            return sp.Add(*(d(a, p) for a in expr.args))
        if isinstance(expr, sp.Sum):
            return sp.Sum(d(expr.function, p), *expr.limits)
        out = sp.expand(sp.diff(expr, p))
        atoms = set(expr.atoms(sp.Indexed)) | {s for s in expr.free_symbols
                                              if (s, p) in tangents}
        for atom in sorted(atoms, key=sp.default_sort_key):
            t = tangent_of(atom, p)
            if t is not None:
                out += sp.expand(sp.diff(expr, atom)) * t
        return out

    def lhs_tangent(lhs, p):
        return tangent_of(lhs, p)

    def extend(eq):
        return [eq] + [Equation(lhs_tangent(eq.lhs, p), d(eq.rhs, p)) for p in symbols]

    steps = []
    for s in r.steps:
        if isinstance(s, Loop):
            body = [x for e in s.equations for x in extend(e)]
            steps.append(Loop(s.index, s.start, s.stop, s.direction, tuple(body)))
        else:
            steps.extend(extend(s))
    terms = {}
    for p in symbols:
        if r.nngp is not None:
            terms[f"nngp/{p}"] = d(r.nngp, p)
        terms[f"ntk/{p}"] = d(r.ntk, p)
    diagonal = None if r.diagonal is None else tangent_derivation(r.diagonal, symbols)
    return Derivation(r.program, r.mode, steps, r.nngp, r.ntk, terms, info, r.inputs, r.names,
                      r.unrolled_repeats, r.loop_indices, closed_forms=True, diagonal=diagonal)


# ------------------------------------------------------------------------ the kernel
def _derived(program, mode):
    if isinstance(program, Derivation):
        return program, None
    if not isinstance(program, Program):
        raise TypeError(f"program must be a symntk Program or Derivation, got "
                        f"{type(program).__name__}")
    slots = _DERIVATIONS.setdefault(program, {})
    if mode not in slots:
        slots[mode] = [derive(program, mode=mode), None, {}]
    return slots[mode][0], slots[mode]


class TensorProgramKernel(Kernel):
    """The NNGP (``kind="nngp"``, default: the GP prior of the network) or NTK of a program, as a
    scikit-learn kernel.  Keyword arguments give each hyperparameter's value (by symbol name) and
    optionally ``<name>_bounds`` (a pair, or ``"fixed"``; default (1e-5, 1e5)).

    >>> import sympy as sp, symntk
    >>> w, b = sp.symbols("weight_variance bias_variance", positive=True)
    >>> program = symntk.mlp(2, "relu", weight_std=sp.sqrt(w), bias_std=sp.sqrt(b))
    >>> k = TensorProgramKernel(program, weight_variance=2.0, bias_variance=0.1)
    """

    def __init__(self, program, kind: str = "nngp", mode: str = "gia", **hyperparameters):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.program = program
        self.kind = kind
        self.mode = mode
        derivation, _ = _derived(program, mode)
        names = [str(s) for s in hyperparameter_symbols(derivation)]
        self._names = names
        unknown = set(hyperparameters) - set(names) - {f"{n}_bounds" for n in names}
        if unknown:
            raise TypeError(f"unknown hyperparameter(s) {sorted(unknown)}; this kernel has "
                            f"{names} (and <name>_bounds)")
        missing = [n for n in names if n not in hyperparameters]
        if missing:
            raise TypeError(f"give a value for every hyperparameter: missing {missing}")
        for n in names:
            setattr(self, n, hyperparameters[n])
            setattr(self, f"{n}_bounds", hyperparameters.get(f"{n}_bounds", (1e-5, 1e5)))

    # -- scikit-learn's parameter protocol (the hyperparameters depend on the program) ----
    def get_params(self, deep=True):
        params = {"program": self.program, "kind": self.kind, "mode": self.mode}
        for n in self._names:
            params[n] = getattr(self, n)
            params[f"{n}_bounds"] = getattr(self, f"{n}_bounds")
        return params

    @property
    def hyperparameters(self):
        return [Hyperparameter(n, "numeric", getattr(self, f"{n}_bounds")) for n in self._names]

    def __sklearn_clone__(self):
        # no deep copy of the program: it is immutable, and a copy would be a different program
        # (programs compare by identity) that has to be derived again
        return type(self)(**self.get_params(deep=False))

    def clone_with_theta(self, theta):
        cloned = self.__sklearn_clone__()
        cloned.theta = theta
        return cloned

    def __repr__(self):
        values = ", ".join(f"{n}={getattr(self, n):.3g}" for n in self._names)
        name = getattr(self._derivation(), "program", None)
        name = getattr(name, "name", "?")
        return f"TensorProgramKernel({name!r}, kind={self.kind!r}, {values})"

    def is_stationary(self):
        return False

    @property
    def requires_vector_input(self):
        return True

    # -- evaluation ------------------------------------------------------------------------
    def _derivation(self) -> Derivation:
        return _derived(self.program, self.mode)[0]

    def _params(self) -> dict:
        values = {}
        for n in self._names:
            v = getattr(self, n)
            if not (np.isscalar(v) and np.isfinite(v) and v > 0):
                raise ValueError(f"hyperparameter {n} must be a positive number, got {v!r}")
            values[n] = float(v)
        return values

    def _compiled(self):
        derivation, slot = _derived(self.program, self.mode)
        if slot is not None and slot[1] is not None:
            return slot[1]
        k = derivation.kernel_function(stacklevel=3)
        if slot is not None:
            slot[1] = k
        return k

    def _tangents(self) -> Derivation:
        derivation, slot = _derived(self.program, self.mode)
        key = tuple(self._names)
        cache = slot[2] if slot is not None else {}
        if key not in cache:
            cache[key] = tangent_derivation(derivation, hyperparameter_symbols(derivation))
        return cache[key]

    def _pick(self, result):
        K = getattr(result, self.kind)
        if K is None:
            raise ValueError(f"this program has no {self.kind.upper()} (e.g. a fixed readout)")
        return np.asarray(K, dtype=np.float64)

    def __call__(self, X, Y=None, eval_gradient=False):
        X = np.asarray(X, dtype=np.float64)
        if eval_gradient and Y is not None:
            raise ValueError("Gradient can only be evaluated when Y is None.")
        params = self._params()
        if not eval_gradient:
            return self._pick(self._compiled()(X, None if Y is None else
                                               np.asarray(Y, dtype=np.float64), params=params))
        from .evaluate import gram
        with np.errstate(divide="ignore", invalid="ignore"):
            # the pair formulas also run on the diagonal (correlation 1), where the slope of acos
            # is infinite; gram() overwrites those entries with the diagonal system's
            r = gram(self._tangents(), X, None, params=params)
        K = self._pick(r)
        free = [h.name for h in self.hyperparameters if not h.fixed]
        grad = np.empty(K.shape + (len(free),))
        for j, n in enumerate(free):
            dK = np.array(r.ntk_terms[f"{self.kind}/{n}"], dtype=np.float64)
            bad = ~np.isfinite(dK)
            if bad.any():
                dK = _repair_duplicates(X, dK, bad, n)
            grad[..., j] = params[n] * dK            # d/d log p = p d/dp
        return K, grad

    def diag(self, X):
        X = np.asarray(X, dtype=np.float64)
        return self._pick(self._compiled()(X, params=self._params(), diagonal=True))


def _repair_duplicates(X, dK, bad, name):
    """A pair of identical inputs has correlation exactly 1, where the chain rule multiplies a
    zero tangent of the correlation by the infinite slope of acos; its value is the diagonal's."""
    for i, j in zip(*np.nonzero(bad)):
        if i != j and np.array_equal(X[i], X[j]) and np.isfinite(dK[i, i]):
            dK[i, j] = dK[i, i]
        else:
            raise FloatingPointError(
                f"dK/d{name} is not finite at entry ({i}, {j}) of the Gram matrix")
    return dK
