"""Graph networks: the Graph NTK against a NumPy implementation of the recursion of Du et al.
(2019, "Graph Neural Tangent Kernel", Sec. 4, Eqs. 5-8) written here from the paper, in Neural
Tangents' conventions (input kernel x.x'/d per node pair, Dense layers in NTK parametrization,
Dense(1) readout with its own bias), not from symntk's code:

* AGGREGATE: Sigma <- A1 Sigma A2^T and Theta <- A1 Theta A2^T per graph pair, A = c_u (adj + I)
  with c_u = 1 (sum) or 1 / (deg(u) + 1) (mean);
* a fully connected layer: Sigma_h = w^2 C + b^2, Theta_h = w^2 C + b^2 + w^2 Theta;
* ReLU: C = E relu(u) relu(v), Cdot = E step(u) step(v) (Cho & Saul 2009), Theta <- Cdot Theta_h;
* READOUT: the sum (or mean) over all node pairs, then the Dense(1) readout.

Compiled kernels share one generated module (sum and mean aggregation differ only in the
matrices passed at call time), so the file compiles once.
"""
import numpy as np
import pytest

import symntk
from symntk.graphs import graph_inputs
from symntk.program import ProgramError

D, P, WSTD, BSTD = 3, 5, 2 ** 0.5, None     # Du et al.: c_sigma = 2, no biases


def _random_adjacency(rng, n, p, density):
    """n random undirected graphs of p nodes (no self loops) in which no two nodes have the same
    closed neighbourhood: two such nodes have identical aggregated features (correlation exactly
    1), where the ReLU duals' arccos turns rounding errors of 1e-16 into 1e-8."""
    out = []
    while len(out) < n:
        a = np.triu((rng.random((p, p)) < density).astype(float), 1)
        a = a + a.T
        if len(np.unique(a + np.eye(p), axis=0)) == p:
            out.append(a)
    return np.array(out)


def _graphs(n, p, seed, density=0.4):
    """n random graphs of p nodes with Gaussian node features (N, p, D)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p, D)), _random_adjacency(rng, n, p, density)


# ------------------------------------------------------------------ the NumPy reference
def _relu_duals(S, q1, q2, same):
    """E relu relu and E step step; ``same``: a node with itself in one graph (c = 1 exactly)."""
    norm = np.sqrt(q1 * q2)
    c = np.where(same, 1.0, np.clip(S / norm, -1.0, 1.0))
    th = np.arccos(c)
    C = norm * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)
    return C, (np.pi - th) / (2 * np.pi)


def _gntk(X1, A1, X2, A2, how, depth, readout, w=WSTD, b=BSTD, v=WSTD, b_out=BSTD):
    """Du et al.'s GNTK (one MLP layer per block) for every graph pair: (NNGP, NTK)."""
    def agg(A):
        Ah = A + np.eye(A.shape[-1])
        return Ah / Ah.sum(-1, keepdims=True) if how == "mean" else Ah

    M1, M2 = agg(A1), agg(A2)
    sym = X1 is X2
    eye1, eye2 = np.eye(X1.shape[1], dtype=bool), np.eye(X2.shape[1], dtype=bool)
    same = (np.eye(len(X1), dtype=bool)[:, :, None, None] & eye1) if sym else False
    b2 = 0.0 if b is None else b ** 2
    # per graph pair (a, b) and node pair (u, u'): S[a, b, u, u'] and the self kernels
    S = np.einsum("aud,bvd->abuv", X1, X2) / D
    S11 = np.einsum("aud,avd->auv", X1, X1) / D
    S22 = np.einsum("aud,avd->auv", X2, X2) / D
    T = np.zeros_like(S)
    T11, T22 = np.zeros_like(S11), np.zeros_like(S22)
    for _ in range(depth):
        # AGGREGATE (Du et al. Eq. 5), then the block's fully connected layer
        S = np.einsum("aup,abpq,bvq->abuv", M1, S, M2)
        T = np.einsum("aup,abpq,bvq->abuv", M1, T, M2)
        S11 = np.einsum("aup,apq,avq->auv", M1, S11, M1)
        T11 = np.einsum("aup,apq,avq->auv", M1, T11, M1)
        S22 = np.einsum("aup,apq,avq->auv", M2, S22, M2)
        T22 = np.einsum("aup,apq,avq->auv", M2, T22, M2)
        Sh, S11h, S22h = w ** 2 * S + b2, w ** 2 * S11 + b2, w ** 2 * S22 + b2
        Th = Sh + w ** 2 * T
        T11h, T22h = S11h + w ** 2 * T11, S22h + w ** 2 * T22
        q1 = np.einsum("auu->au", S11h)[:, None, :, None]
        q2 = np.einsum("bvv->bv", S22h)[None, :, None, :]
        S, Sd = _relu_duals(Sh, q1, q2, same)
        T = Sd * Th
        d1 = np.einsum("auu->au", S11h)
        S11, Sd11 = _relu_duals(S11h, d1[:, :, None], d1[:, None, :], eye1)
        T11 = Sd11 * T11h
        d2 = np.einsum("auu->au", S22h)
        S22, Sd22 = _relu_duals(S22h, d2[:, :, None], d2[:, None, :], eye2)
        T22 = Sd22 * T22h
    scale = 1.0 if readout == "sum" else 1.0 / (X1.shape[1] * X2.shape[1])
    C, Th = scale * S.sum((2, 3)), scale * T.sum((2, 3))
    bo = 0.0 if b_out is None else b_out ** 2
    return v ** 2 * C + bo, v ** 2 * C + bo + v ** 2 * Th


def _program(how, readout="sum"):
    return symntk.gnn(2, "relu", aggregation=how, readout=readout, weight_std=WSTD,
                      bias_std=BSTD)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("how", ["sum", "mean"])
def test_gntk_equals_du_et_al(how):
    """Depth 2, sum and mean aggregation: NNGP and NTK of X1 with itself and with X2 (graphs of
    another node count) equal the NumPy recursion to 1e-10."""
    X1, A1 = _graphs(4, P, 0)
    X2, A2 = _graphs(3, P + 2, 1)
    program = _program(how)
    r = symntk.kernel(program, X1, adjacency1=A1)
    K, T = _gntk(X1, A1, X1, A1, how, 2, "sum")
    np.testing.assert_allclose(r.nngp, K, rtol=1e-10, atol=0)
    np.testing.assert_allclose(r.ntk, T, rtol=1e-10, atol=0)
    # two batches of different node counts: X1 padded to the node count of X2, with a mask
    m1 = np.zeros((4, P + 2), dtype=bool)
    m1[:, :P] = True
    X1p = np.zeros((4, P + 2, D))
    X1p[:, :P] = X1
    A1p = np.zeros((4, P + 2, P + 2))
    A1p[:, :P, :P] = A1
    r12 = symntk.kernel(program, X1p, X2, adjacency1=A1p, adjacency2=A2, mask1=m1)
    K, T = _gntk(X1, A1, X2, A2, how, 2, "sum")
    np.testing.assert_allclose(r12.nngp, K, rtol=1e-10, atol=0)
    np.testing.assert_allclose(r12.ntk, T, rtol=1e-10, atol=0)
    assert "aggregation" in symntk.derive(program).latex()


def test_padded_graphs_with_masks_equal_unpadded():
    """Graphs of 5, 3, 4, 3 nodes padded to 6 with garbage features and edges: every entry of the
    kernel equals the kernel of the two unpadded graphs (aggregation and pooling see the real
    nodes only): to 1e-12 against the compiled kernel of the unpadded graphs where the two have
    the same node count, to 1e-10 against the NumPy recursion otherwise."""
    sizes, Pmax = [5, 3, 4, 3], 6
    rng = np.random.default_rng(3)
    X = rng.standard_normal((len(sizes), Pmax, D))
    mask = np.arange(Pmax)[None, :] < np.array(sizes)[:, None]
    mask[1] = mask[1][::-1]                        # padding need not come last
    A = (rng.random((len(sizes), Pmax, Pmax)) < 0.5).astype(float)     # garbage on the padding
    for i, size in enumerate(sizes):
        keep = np.flatnonzero(mask[i])
        A[i][np.ix_(keep, keep)] = _random_adjacency(rng, 1, size, 0.5)[0]
    program = _program("mean", readout="mean")
    got = symntk.kernel(program, X, adjacency1=A, mask1=mask)

    def unpadded(i):
        keep = np.flatnonzero(mask[i])
        return X[i:i + 1, keep], A[i:i + 1][:, keep][:, :, keep]
    for i in range(len(sizes)):
        xi, ai = unpadded(i)
        for j in range(len(sizes)):
            xj, aj = unpadded(j)
            if i == j:
                want, tol = symntk.kernel(program, xi, adjacency1=ai), 1e-12
            elif sizes[i] == sizes[j]:
                want, tol = symntk.kernel(program, xi, xj, adjacency1=ai, adjacency2=aj), 1e-12
            else:
                want = symntk.KernelResult(*_gntk(xi, ai, xj, aj, "mean", 2, "mean"), {})
                tol = 1e-10
            np.testing.assert_allclose(got.nngp[i, j], want.nngp[0, 0], rtol=tol, atol=0)
            np.testing.assert_allclose(got.ntk[i, j], want.ntk[0, 0], rtol=tol, atol=0)
    assert not np.allclose(got.ntk, symntk.kernel(program, X, adjacency1=A).ntk)


def test_fixed_map_over_tokens_with_masks():
    """A fixed linear map across the tokens of a sequence (a causal running mean: token t reads
    the mean of tokens 1..t), then mean pooling: sequences of lengths 4, 2, 3 padded to 5 with a
    mask give the kernels of the unpadded sequences (1e-12 against the unpadded kernel for equal
    lengths, 1e-10 against the NumPy recursion otherwise)."""
    x = symntk.Input("x", D, positions="t")
    h = x
    for l in (1, 2):
        W = symntk.Weight(f"W{l}", fan_out=symntk.WIDTH, fan_in=h.dim, variance=2)
        z = symntk.Aggregate(symntk.Conv(W, h, (1,)), "mean", self_loops=True)
        h = symntk.nonlin("relu", z)
    v = symntk.Weight("v", fan_out=1, fan_in=symntk.WIDTH, variance=2)
    program = symntk.Program(symntk.Readout(v, symntk.Pool(h, "mean")), name="causal_mean")
    lengths, T = [4, 2, 3, 2], 5
    rng = np.random.default_rng(11)
    X = rng.standard_normal((len(lengths), T, D))
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    X[~mask] = 7.0
    causal = np.tril(np.ones((T, T)), -1)              # earlier tokens; A + I: 1..t
    A = np.broadcast_to(causal, (len(lengths), T, T))
    got = symntk.kernel(program, X, adjacency1=A, mask1=mask)
    for i, li in enumerate(lengths):
        for j, lj in enumerate(lengths):
            xi, xj = X[i:i + 1, :li], X[j:j + 1, :lj]
            ai, aj = causal[None, :li, :li], causal[None, :lj, :lj]
            if li == lj:
                want = symntk.kernel(program, xi, None if i == j else xj, adjacency1=ai,
                                     adjacency2=None if i == j else aj)
                tol = 1e-12
            else:
                want = symntk.KernelResult(*_gntk(xi, ai, xj, aj, "mean", 2, "mean",
                                                  b_out=None), {})
                tol = 1e-10
            np.testing.assert_allclose(got.nngp[i, j], want.nngp[0, 0], rtol=tol, atol=0)
            np.testing.assert_allclose(got.ntk[i, j], want.ntk[0, 0], rtol=tol, atol=0)


@pytest.mark.parametrize("how", ["sum", "mean"])
def test_finite_gnn_monte_carlo(how):
    """The finite-width network (width 4096, 4 seeds) agrees with the GNTK within 3 standard
    errors (NTK and NNGP; sum aggregation and readout, mean aggregation and readout)."""
    X, A = _graphs(3, 4, 5)
    program = _program(how, readout=how)
    r = symntk.kernel(program, X, adjacency1=A)
    mc = symntk.monte_carlo(program, graph_inputs(X, A), width=4096, n_samples=4)
    assert np.all(np.abs(mc.ntk_mean - r.ntk) <= 3 * mc.ntk_sem + 1e-12)
    assert np.all(np.abs(mc.nngp_mean - r.nngp) <= 3 * mc.nngp_sem + 1e-12)


def test_finite_gnn_masks():
    """The finite network on a padded batch with a node mask equals it on each unpadded graph
    (mean aggregation, mean readout: the normalisations count real nodes only)."""
    program = _program("mean", readout="mean")
    net = symntk.sample(program, width=32, seed=0, input_dim=D)
    X, A = _graphs(3, 5, 7)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=bool)
    e = net.ntk({"x": X, "adjacency": A, "mask": mask})
    f = net({"x": X, "adjacency": A, "mask": mask})
    for i in range(3):
        keep = np.flatnonzero(mask[i])
        xi, ai = X[i:i + 1, keep], A[i:i + 1][:, keep][:, :, keep]
        np.testing.assert_allclose(f[i], net(graph_inputs(xi, ai))[0], rtol=1e-12)
        for j in range(3):
            kj = np.flatnonzero(mask[j])
            if i == j:
                continue
            xj, aj = X[j:j + 1, kj], A[j:j + 1][:, kj][:, :, kj]
            both = symntk.empirical_ntk(net, graph_inputs(xi, ai), graph_inputs(xj, aj)).ntk
            np.testing.assert_allclose(e.ntk[i, j], both[0, 0], rtol=1e-10)


def test_bad_input_errors():
    X, A = _graphs(2, 4, 0)
    program = _program("sum")
    with pytest.raises(ValueError, match=r"adjacency1 must have shape \(N, P, P\) = \(2, 4, 4\)"):
        symntk.kernel(program, X, adjacency1=A[:, :3, :3])
    with pytest.raises(ValueError, match="pass adjacency1"):
        symntk.kernel(program, X)
    with pytest.raises(ValueError, match=r"mask1 must have shape \(N, P\) = \(2, 4\)"):
        symntk.kernel(program, X, adjacency1=A, mask1=np.ones((2, 3)))
    with pytest.raises(ValueError, match="has no nodes"):
        symntk.kernel(program, X, adjacency1=A, mask1=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="adjacency matrices given but the program has no "
                                         "Aggregate"):
        symntk.kernel(symntk.mlp(1), X[:, 0], adjacency1=A)
    net = symntk.sample(program, width=8, seed=0, input_dim=D)
    with pytest.raises(ValueError, match="adjacency"):
        net(X)
    with pytest.raises(ValueError, match=r"shape \(N, P, P\) = \(2, 4, 4\)"):
        net(graph_inputs(X, A[:1]))
    with pytest.raises(ValueError, match="mean aggregation divides by its degree 0"):
        symntk.graphs.normalized_adjacency(np.zeros((1, 2, 2)), "mean", self_loops=False)
    with pytest.raises(ProgramError, match="unknown aggregation"):
        symntk.Aggregate(program.output.vector.vector, "max")
    with pytest.raises(ProgramError, match="aggregation must be one of"):
        symntk.gnn(2, aggregation="max")
    with pytest.raises(NotImplementedError, match="Pool"):
        symntk.derive(symntk.rnn("erf", readout="sum"))
