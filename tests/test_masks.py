"""Padded batches of sequences with a mask give the kernels of the unpadded sequences."""
from __future__ import annotations

import numpy as np
import pytest

import symntk
from symntk.masks import masked_gram, sequence_lengths

D = 2
LENGTHS1, LENGTHS2 = [2, 1, 2], [1, 2]


def _padded(lengths, seed):
    """Sequences of the given lengths, padded with garbage (it must not matter) to max length."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    X = rng.standard_normal((len(lengths), T, D))
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    X[~mask] = 7.0
    return X, mask


PROGRAMS = {
    "rnn-last": lambda: symntk.rnn("erf", bias_std=0.3, readout="last", input_dim=D),
    "rnn-mean": lambda: symntk.rnn("erf", weight_std=1.2, readout="mean", input_dim=D),
}


@pytest.fixture(scope="module")
def kernels(kernel_cache):
    """The compiled kernel of the mean-pooled RNN (symntk.kernel reuses it from the cache) and
    the NumPy reference evaluator of the last-state one (one compilation only: cheap)."""
    return {"rnn-mean": symntk.derive(PROGRAMS["rnn-mean"]()).compile(),
            "rnn-last": symntk.derive(PROGRAMS["rnn-last"]()).gram}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_padded_with_mask_equals_unpadded(name, kernels):
    """Last state and mean pooling of an RNN: every entry equals the kernel of the two unpadded
    sequences (the recurrence stops at each sequence's own length)."""
    k = kernels[name]
    X1, m1 = _padded(LENGTHS1, 0)
    X2, m2 = _padded(LENGTHS2, 1)
    for A, B, ma, mb, La, Lb in [(X1, None, m1, None, LENGTHS1, LENGTHS1),
                                 (X1, X2, m1, m2, LENGTHS1, LENGTHS2)]:
        got = masked_gram(k, A, B, ma, mb)
        for i, li in enumerate(La):
            for j, lj in enumerate(Lb):
                xa = A[i:i + 1, :li]
                if B is None and i == j:
                    want = k(xa)                             # one example with itself
                else:
                    want = k(xa, (A if B is None else B)[j:j + 1, :lj])
                np.testing.assert_allclose(got.ntk[i, j], want.ntk[0, 0], rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(got.nngp[i, j], want.nngp[0, 0], rtol=1e-12, atol=1e-14)
    assert not np.allclose(got.ntk, k(X1, X2).ntk)           # the padding would have mattered


def test_kernel_takes_masks(kernels):
    """symntk.kernel (compiled) with a mask equals the reference evaluator's masked Gram."""
    program = PROGRAMS["rnn-mean"]()
    X, m = _padded([2, 1, 2], 2)
    a = symntk.kernel(program, X, mask1=m)
    np.testing.assert_allclose(a.ntk, masked_gram(kernels["rnn-mean"], X, None, m).ntk,
                               rtol=1e-12)
    b = symntk.kernel(program, X, mask1=np.ones((3, 2)))
    np.testing.assert_array_equal(b.ntk, symntk.kernel(program, X).ntk)


def test_finite_network_with_masks():
    """The same finite network on the padded batch with masks and on each unpadded sequence."""
    program = PROGRAMS["rnn-last"]()
    net = symntk.sample(program, width=64, seed=0)
    X1, m1 = _padded(LENGTHS1, 0)
    X2, m2 = _padded(LENGTHS2, 1)
    e = symntk.empirical_ntk(net, X1, X2, mask1=m1, mask2=m2)
    for i, li in enumerate(LENGTHS1):
        for j, lj in enumerate(LENGTHS2):
            want = symntk.empirical_ntk(net, X1[i:i + 1, :li], X2[j:j + 1, :lj]).ntk[0, 0]
            np.testing.assert_allclose(e.ntk[i, j], want, rtol=1e-12)
        np.testing.assert_allclose(e.outputs1[i], net(X1[i:i + 1, :li])[0], rtol=1e-12)
    same = symntk.empirical_ntk(net, X1, mask1=m1)
    np.testing.assert_allclose(np.diag(same.ntk), [
        symntk.empirical_ntk(net, X1[i:i + 1, :li]).ntk[0, 0] for i, li in enumerate(LENGTHS1)],
        rtol=1e-12)


@pytest.mark.parametrize("mask, message", [
    (np.ones((4, 2)), r"shape \(N, T\) = \(4, 3\)"),
    (np.ones((3, 3)), r"shape \(N, T\) = \(4, 3\)"),
    (np.ones(4), r"shape \(N, T\)"),
    (np.full((4, 3), 0.5), "0/1"),
    (np.array([[1, 0, 1]] * 4), "prefix"),
    (np.array([[0, 0, 0]] + [[1, 1, 1]] * 3), "no tokens"),
])
def test_bad_masks(mask, message):
    X, _ = _padded([3, 1, 3, 2], 0)
    with pytest.raises(ValueError, match=message):
        sequence_lengths(mask, X, "mask1")


def test_mask_without_sequences():
    with pytest.raises(ValueError, match="batch of sequences"):
        sequence_lengths(np.ones((2, 3)), np.ones((2, 3)))
