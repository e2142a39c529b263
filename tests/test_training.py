"""Gradient descent of finite networks (symntk.training).

Oracles: the per-example Jacobian of symntk.finite (``net.gradients``) contracted by hand, central
finite differences of the loss in the trained variable, the network's own empirical NTK (one step
moves the outputs by -eta Theta_n r to first order; exactly, for readout-only training), and the
infinite-width prediction of symntk.predict.
"""
from __future__ import annotations

import numpy as np
import pytest

import symntk
from symntk.predict import Predictor
from symntk.training import loss_gradient, train, vjp

PROGRAM = symntk.mlp(2, "tanh", weight_std=1.3, bias_std=0.4)


def data(n=6, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal(n)


def test_vjp_is_the_jacobian_contracted_with_the_cotangent():
    X, r = data()
    net = symntk.sample(PROGRAM, 16, seed=1, input_dim=3)
    f, grads = vjp(net, X, r)
    jac = net.gradients(X)
    np.testing.assert_allclose(f, net(X))
    assert set(grads) == set(jac) == set(net.parameters)
    for label, J in jac.items():
        np.testing.assert_allclose(grads[label], np.tensordot(r, J, axes=1), rtol=1e-12,
                                   atol=1e-14)
        assert grads[label].shape == net.parameters[label].shape


@pytest.mark.parametrize("loss", ["sum", "mean"])
def test_loss_gradient_matches_finite_differences(loss):
    X, Y = data(seed=2)
    net = symntk.sample(PROGRAM, 8, seed=3, input_dim=3)
    value, _, grads = loss_gradient(net, X, Y, loss)
    rng = np.random.default_rng(4)
    for label, P in net.parameters.items():
        direction = rng.standard_normal(P.shape)
        h = 1e-6
        up = net.with_parameters({label: P + h * direction})
        down = net.with_parameters({label: P - h * direction})
        fd = (loss_gradient(up, X, Y, loss)[0] - loss_gradient(down, X, Y, loss)[0]) / (2 * h)
        assert np.sum(grads[label] * direction) == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert value == pytest.approx(0.5 * np.sum((net(X) - Y) ** 2) / (len(Y) if loss == "mean"
                                                                       else 1))


def test_one_step_moves_outputs_by_the_empirical_ntk():
    """f_1 - f_0 = -eta Theta_n (f_0 - Y) + O(eta^2), Theta_n in the network's parametrization."""
    X, Y = data(seed=5)
    net = symntk.sample(PROGRAM, 32, seed=6, input_dim=3)
    theta = net.ntk(X).ntk
    r0 = net(X) - Y
    errors = []
    for eta in (1e-2, 1e-3):
        run = train(net, X, Y, learning_rate=eta, steps=1)
        step = run.train_outputs[1] - run.train_outputs[0]
        errors.append(np.abs(step + eta * theta @ r0).max() / eta)
    assert errors[1] < errors[0] / 5                                 # the remainder is O(eta)
    np.testing.assert_array_equal(net(X), run.train_outputs[0])     # the input net is untouched


def test_readout_training_is_exactly_kernel_descent_with_the_readout_ntk():
    X, Y = data(seed=7)
    net = symntk.sample(PROGRAM, 32, seed=8, input_dim=3)
    parts = net.ntk(X).contributions
    theta_v = parts["v"] + parts["b_out"]
    eta = 0.05
    run = train(net, X, Y, learning_rate=eta, steps=5, trainable="readout",
                record=range(6))
    f = run.train_outputs[0]
    for s in range(1, 6):
        f = f - eta * theta_v @ (f - Y)                              # f is linear in (V, b_out)
        np.testing.assert_allclose(run.train_outputs[s], f, rtol=1e-10, atol=1e-12)
    hidden = [k for k in net.parameters if k not in ("v", "b_out")]
    for k in hidden:
        np.testing.assert_array_equal(run.network.parameters[k], net.parameters[k])


def test_wide_network_follows_the_infinite_width_prediction():
    """One hidden layer (cheap at large width): the deviation from the linearised infinite-width
    trajectory shrinks as the width grows (CLT rate width^{-1/2})."""
    program = symntk.mlp(1, "erf", weight_std=1.5, bias_std=0.3)
    rng = np.random.default_rng(0)
    X, Xt = rng.standard_normal((16, 4)), rng.standard_normal((8, 4))
    Y = np.sin(X[:, 0])
    p = Predictor(symntk.derive(program).compile(), X, Y)
    eta = 1.0 / np.linalg.eigvalsh(p.train_kernel("ntk")).max()
    p = Predictor(symntk.derive(program).compile(), X, Y, learning_rate=eta)
    gaps = []
    for width in (64, 4096):
        gap = []
        for seed in range(3):
            net = symntk.sample(program, width, seed, input_dim=4)
            run = train(net, X, Y, learning_rate=eta, steps=50, X_test=Xt)
            f0, f0t = run.train_outputs[0], run.test_outputs[0]
            pred = p.gradient_descent(50, Xt, discrete=True, covariance=None,
                                      initial=(f0, f0t)).mean
            gap.append(np.linalg.norm(run.test_outputs[-1] - pred) / np.linalg.norm(pred - f0t))
        gaps.append(np.mean(gap))
    assert gaps[1] < gaps[0] / 3                                     # 64x width: ~8x expected


def test_bad_arguments_are_named():
    X, Y = data()
    net = symntk.sample(PROGRAM, 8, seed=0, input_dim=3)
    with pytest.raises(ValueError, match="one output"):
        train(net, X, np.ones((len(X), 2)), learning_rate=0.1, steps=1)
    with pytest.raises(ValueError, match="loss"):
        train(net, X, Y, learning_rate=0.1, steps=1, loss="l1")
    with pytest.raises(ValueError, match="steps"):
        train(net, X, Y, learning_rate=0.1, steps=-1)
    with pytest.raises(KeyError, match="no parameter"):
        train(net, X, Y, learning_rate=0.1, steps=1, trainable=["U"])
    with pytest.raises(ValueError, match="cotangent"):
        vjp(net, X, Y[:-1])
    with pytest.raises(FloatingPointError, match="diverged"):
        train(net, X, 1e3 * Y, learning_rate=1e6, steps=50)
