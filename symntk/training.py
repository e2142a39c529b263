"""Full-batch gradient descent of a finite network sampled from a program (the referee of
:mod:`symntk.predict`).

The loss gradient is a vector-Jacobian product read off the reverse sweep of
:mod:`symntk.finite`: with cotangent r_i = dL/df(x_i), a weight whose uses y = W z have factored
per-example gradients dF(x_i)/dW = sum_uses a_i b_i^T gets dL/dW = sum_uses (r * A)^T B; a bias
dL/db = r^T G_b.

Gradient descent runs on the *trained* variable omega of the parametrization (W = s omega,
theory of TP2 App. A / Jacot et al. 2018): omega <- omega - eta dL/domega, i.e. in the stored
forward-law parameter W <- W - eta s^2 dL/dW with s^2 = :func:`symntk.finite.ntk_factor`.  To first
order in eta the outputs then move by -eta Theta_n r with the network's own empirical NTK Theta_n,
so as the widths grow the run follows the kernel dynamics of :class:`symntk.predict.Predictor`
(TP2b Thm. 5.3), with ``discrete=True`` matching step for step.

Loss conventions are :mod:`symntk.predict`'s: ``"sum"`` is 1/2 sum_i (f(x_i) - y_i)^2 (TP2b),
``"mean"`` divides it by N.  Networks have one output (the program's readout), so Y has shape (N,).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .finite import FiniteNetwork, _param_label
from .program import Readout, Weight

__all__ = ["vjp", "loss_gradient", "train", "TrainingRun"]


def vjp(net: FiniteNetwork, X, cotangent) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(f(X), {label: sum_i cotangent_i dF(x_i)/dP}) for every parameter P (raw, forward-law
    gradients: the shapes of ``net.parameters``), from one forward and one reverse sweep."""
    tape = net._backward(X)
    r = np.asarray(cotangent, dtype=np.float64)
    if r.shape != (tape.n,):
        raise ValueError(f"cotangent must have shape ({tape.n},) (one entry per example), "
                         f"got {r.shape}")
    return tape.outputs, _pullback(net, tape, r)


def _pullback(net: FiniteNetwork, tape, r: np.ndarray) -> dict[str, np.ndarray]:
    grads = {}
    for p, value in net._params.items():
        if isinstance(p, Weight):
            g = np.zeros(value.shape)
            for a, b in tape.uses[p]:
                g += (a * r[:, None]).T @ b
        else:
            g = (r @ np.asarray(tape.biases[p], dtype=np.float64)).reshape(value.shape)
        grads[_param_label(p)] = g
    return grads


def _residual(f, Y, loss):
    if loss not in ("sum", "mean"):
        raise ValueError(f"loss must be 'sum' or 'mean', got {loss!r}")
    r = f - Y
    return r if loss == "sum" else r / Y.size


def loss_gradient(net: FiniteNetwork, X, Y, loss: str = "sum"):
    """(loss, f(X), raw gradients) of the squared loss (module docstring for ``loss``)."""
    tape = net._backward(X)
    Y = _check_targets(Y, tape.n)
    grads = _pullback(net, tape, _residual(tape.outputs, Y, loss))
    return _loss_value(tape.outputs, Y, loss), tape.outputs, grads


def _loss_value(f, Y, loss):
    value = 0.5 * float(np.sum((f - Y) ** 2))
    return value if loss == "sum" else value / Y.size


def _check_targets(Y, n):
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 2 and Y.shape[1] == 1:
        Y = Y[:, 0]
    if Y.ndim != 1:
        raise ValueError(f"a finite network has one output: Y must have shape (N,) or (N, 1), "
                         f"got {Y.shape} (train one network per output column)")
    if n is not None and Y.shape[0] != n:
        raise ValueError(f"Y has {Y.shape[0]} entries but X has {n} examples")
    if not np.all(np.isfinite(Y)):
        raise ValueError("Y contains NaN or inf")
    return Y


def _readout_labels(net: FiniteNetwork) -> set[str]:
    out = net.program.output
    if not (isinstance(out, Readout) and out.trained):
        raise ValueError("trainable='readout' needs a trained Readout (a Weight readout vector)")
    labels = {_param_label(out.weight)}
    if out.bias is not None:
        labels.add(_param_label(out.bias))
    return labels


@dataclass
class TrainingRun:
    """Outputs recorded during :func:`train`.

    ``steps[j]`` is the number of updates done when ``train_outputs[j]`` (f(X_train), (N,)) and
    ``test_outputs[j]`` (f(X_test), (M,), or None) were recorded; ``losses[j]`` the training loss
    there.  ``network`` is the trained network.
    """
    network: FiniteNetwork
    steps: list = field(default_factory=list)
    train_outputs: list = field(default_factory=list)
    test_outputs: list = field(default_factory=list)
    losses: list = field(default_factory=list)


def train(net: FiniteNetwork, X, Y, *, learning_rate: float, steps: int, loss: str = "sum",
          trainable="all", parametrization=None, record=None, X_test=None) -> TrainingRun:
    """``steps`` updates of full-batch gradient descent on the squared loss.

    ``trainable``: ``"all"`` (the NTK dynamics), ``"readout"`` (the readout weight and output bias
    only: the NNGP dynamics in NTK parametrization) or a collection of parameter labels.
    ``parametrization`` overrides the network's (see :func:`symntk.finite.ntk_factor`).
    ``record``: the step counts at which outputs are stored (default: 0 and ``steps``).
    The input network is not modified; ``run.network`` holds the trained parameters.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    Y = _check_targets(Y, None)
    _residual(Y, Y, loss)                                       # validates ``loss`` early
    labels = set(net.parameters)
    if trainable == "all":
        chosen = labels
    elif trainable == "readout":
        chosen = _readout_labels(net)
    else:
        chosen = set(trainable)
        unknown = chosen - labels
        if unknown:
            raise KeyError(f"no parameter(s) {sorted(unknown)}; parameters are {sorted(labels)}")
    record = {0, int(steps)} if record is None else {int(s) for s in record}
    if any(s < 0 or s > steps for s in record):
        raise ValueError(f"record steps must lie in [0, {steps}], got {sorted(record)}")
    # The trainer works on a private copy whose parameter arrays it updates in place.
    params = {label: np.array(value) for label, value in net.parameters.items()}
    work = net.with_parameters(params)
    factors = {label: work.factor(label, parametrization) for label in chosen}
    run = TrainingRun(work)
    with np.errstate(over="ignore", invalid="ignore"):     # divergence is reported below
        _descend(work, X, Y, params, chosen, factors, learning_rate, int(steps), loss, record,
                 X_test, run)
    return run


def _descend(work, X, Y, params, chosen, factors, learning_rate, steps, loss, record, X_test,
             run):
    for step in range(steps + 1):
        tape = work._backward(X)
        f = tape.outputs
        if f.shape != Y.shape:
            raise ValueError(f"Y has shape {Y.shape} but the network gives {f.shape} outputs")
        if step in record:
            run.steps.append(step)
            run.train_outputs.append(np.array(f))
            run.test_outputs.append(None if X_test is None else work(X_test))
            run.losses.append(_loss_value(f, Y, loss))
        if step == steps:
            break
        grads = _pullback(work, tape, _residual(f, Y, loss))
        for label in chosen:
            params[label] -= learning_rate * factors[label] * grads[label]
        if not all(np.all(np.isfinite(params[label])) for label in chosen):
            raise FloatingPointError(f"gradient descent diverged at step {step + 1}: lower the "
                                     f"learning rate (now {learning_rate})")
