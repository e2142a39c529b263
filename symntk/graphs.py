r"""Graph networks: fixed linear maps over positions, and the Graph Neural Tangent Kernel.

The positions of a graph are its nodes: an input ``Input("x", d, positions="v")`` holds one
feature vector per node, data (N, P, d), and each example comes with its adjacency matrix
A (P x P).  An :class:`~symntk.program.Aggregate` node applies the fixed map

.. math::

    y_u = c_u \sum_{v} \hat A_{uv}\, x_v,\qquad \hat A = A + I \text{ (self loops) or } A,\qquad
    c_u = 1 \text{ (sum) or } 1/\textstyle\sum_v \hat A_{uv} \text{ (mean)}

(Du et al. 2019, "Graph Neural Tangent Kernel", Eq. 4; Neural Tangents' ``stax.Aggregate`` with
the normalised pattern).  It has no weights, so on the node-pair kernels of the pixel-pair engine
(:mod:`symntk.convolution`) it acts as

.. math::

    \Sigma^{y}(G, G')_{uu'} = c_u c_{u'} \sum_{v \in N(u)\cup\{u\}} \sum_{v' \in N(u')\cup\{u'\}}
    \Sigma^{x}(G, G')_{vv'},\qquad \Theta^{y} \text{ likewise}

(Du et al. 2019, Eqs. 5-6): :math:`\Sigma^y = \hat A_1 \Sigma^x \hat A_2^\top` with one matrix per
graph.  :func:`gnn` builds Du et al.'s network: L blocks of AGGREGATE then R fully connected layers
(a 1 x 1 Dense over nodes, as Neural Tangents' ``Dense`` on the node axis), then a sum or mean
pooling readout over nodes.

Graphs of different node counts are passed as one padded batch: ``mask`` (N, P) is 1 on the real
nodes and 0 on the padding.  Padded nodes contribute nothing: they are cut out of the adjacency
(rows and columns) and of the pooling, so the kernels are those of the unpadded graphs.  (Inside
the compiled kernel a padded node is given the features and adjacency row of the graph's first
real node, so every intermediate value stays finite; no real node ever reads it.)
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from .masks import position_mask
from .program import (AGGREGATIONS, Aggregate, Bias, Conv, Input, Pool, Program, ProgramError,
                      Weight, WIDTH, nonlin)

__all__ = ["gnn", "normalized_adjacency", "node_mask", "prepare_graphs", "graph_inputs"]

#: The reserved key of the adjacency matrices in the input mapping of a finite network.
ADJACENCY = "adjacency"


def node_mask(mask, N: int, P: int, name: str = "mask") -> np.ndarray:
    """The (N, P) boolean node mask (all True for None): :func:`symntk.masks.position_mask` over
    the nodes of N graphs."""
    return position_mask(mask, N, P, name, unit="node", axis="P",
                         batch="graphs (N graphs of P nodes)")


def check_adjacency(A, N: int, P: int, name: str = "adjacency") -> np.ndarray:
    """A batch of adjacency matrices (N, P, P), finite and real."""
    if A is None:
        raise ValueError(f"the program aggregates over graph nodes: pass {name}, the graphs' "
                         f"adjacency matrices of shape (N, P, P) = {(N, P, P)}")
    A = np.asarray(A)
    if A.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a real array, got dtype {A.dtype}")
    A = A.astype(np.float64)
    if A.shape != (N, P, P):
        raise ValueError(f"{name} must have shape (N, P, P) = {(N, P, P)} to match the node "
                         f"features ({N} graphs of {P} nodes), got shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return A


def normalized_adjacency(A, how: str = "sum", self_loops: bool = True, mask=None,
                         name: str = "adjacency") -> np.ndarray:
    """c_u A_hat[u, v] for every graph of the batch A (N, P, P): A_hat = A + I (``self_loops``)
    or A, restricted to the real nodes of ``mask``; c_u = 1 (``"sum"``) or 1 / sum_v A_hat[u, v]
    (``"mean"``).  Rows and columns of padded nodes are zero."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")
    A = np.asarray(A, dtype=np.float64)
    N, P = A.shape[0], A.shape[1]
    m = node_mask(mask, N, P).astype(np.float64)
    H = A * m[:, :, None] * m[:, None, :]
    if self_loops:
        H = H + np.eye(P)[None] * m[:, :, None]
    if how == "mean":
        deg = H.sum(axis=2)
        bad = (deg == 0) & (m > 0)
        if bad.any():
            n, u = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{name}: node {u} of graph {n} has no neighbours"
                             f"{'' if self_loops else ' and no self loop'}: a mean aggregation "
                             "divides by its degree 0")
        H = H / np.where(deg == 0, 1.0, deg)[:, :, None]
    return H


def prepare_graphs(X, A, mask, steps, side: str = "", pointwise: bool = True):
    """For the compiled kernel: (X with padded nodes filled, the normalised matrix of every
    aggregation step (N, n_steps, P, P), node weights (N, P) as floats).  ``X`` is (N, P, 1, d)."""
    N, P = X.shape[0], X.shape[1] * X.shape[2]
    A = check_adjacency(A, N, P, f"adjacency{side}")
    m = node_mask(mask, N, P, f"mask{side}")
    padded = ~m.all(axis=1)
    if padded.any() and not pointwise:
        raise ValueError(f"mask{side}: padded nodes are exact only in programs whose every Conv "
                         "and AvgPool reads one position (filter 1); a wider window would read "
                         "the padding")
    G = np.empty((N, len(steps), P, P))
    for k, s in enumerate(steps):
        G[:, k] = normalized_adjacency(A, s.how, s.self_loops, m, f"adjacency{side}")
    if padded.any():
        X = X.copy()
        for n in np.flatnonzero(padded):
            first = int(np.argmax(m[n]))
            pad = ~m[n]
            X[n].reshape(P, -1)[pad] = X[n].reshape(P, -1)[first]
            G[n][:, pad, :] = G[n][:, first, :][:, None, :]
    return np.ascontiguousarray(X), np.ascontiguousarray(G), m.astype(np.float64)


def graph_inputs(X, adjacency, name: str = "x") -> dict:
    """The input mapping of a finite graph network: ``net(graph_inputs(X, A))``."""
    return {name: X, ADJACENCY: adjacency}


def gnn(depth: int, activation="relu", aggregation: str = "sum", readout: str = "sum",
        mlp_layers: int = 1, weight_std=1.0, bias_std=None, self_loops: bool = True,
        parametrization: str = "ntk", input_dim=sp.Symbol("d", positive=True, integer=True),
        readout_bias: bool = True) -> Program:
    """The graph network of Du et al. (2019, Sec. 4), whose kernel is the Graph NTK:

        h^{l,0} = AGGREGATE(h^{l-1}) (sum or mean over N(u) and u itself),
        h^{l,r} = phi(W^{l,r} h^{l,r-1} + b^{l,r}),  r = 1..R (``mlp_layers``),  l = 1..L,
        f = v . POOL_u(h^{L,R}) + b_out  (``readout``: "sum" or "mean" over the nodes).

    The aggregation is linear and acts over nodes, W over channels, so W AGG(h) = AGG(W h): the
    program aggregates the first Dense of every block (the input itself is data, not a width-space
    vector).  Neural Tangents' conventions: W ~ weight_std^2 / fan_in, input kernel x.x'/d per
    node pair, Dense(1) readout with its own bias; ``bias_std=None``: no hidden biases.  Du et al.
    use weight_std^2 = 2 for ReLU (c_sigma) and no biases.  Data: ``symntk.kernel(program, X1, X2,
    adjacency1=A1, adjacency2=A2, mask1=..., mask2=...)`` with X (N, P, d), A (N, P, P).
    """
    from .builders import _check_arguments, _readout, _variance
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ProgramError(f"depth must be a positive integer (the number of blocks), got "
                           f"{depth!r}")
    if isinstance(mlp_layers, bool) or not isinstance(mlp_layers, int) or mlp_layers < 1:
        raise ProgramError(f"mlp_layers must be a positive integer, got {mlp_layers!r}")
    _check_arguments(depth, weight_std, bias_std, readout_bias)
    if aggregation not in AGGREGATIONS:
        raise ProgramError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if readout not in ("sum", "mean"):
        raise ProgramError(f"readout must be 'sum' or 'mean' (pooling over nodes), got "
                           f"{readout!r}")
    x = Input("x", input_dim, positions="v")
    wvar = _variance(weight_std, "weight_std")
    for l in range(1, depth + 1):
        for r in range(1, mlp_layers + 1):
            tag = f"{l}" if mlp_layers == 1 else f"{l}{r}"
            W = Weight(f"W{tag}", fan_out=WIDTH, fan_in=x.dim, variance=wvar,
                       parametrization=parametrization)
            h = Conv(W, x, (1,), name=f"dense{tag}")
            if r == 1:
                h = Aggregate(h, aggregation, self_loops, name=f"agg{l}")
            if bias_std is not None:
                h = h + Bias(f"b{tag}", dim=WIDTH, variance=_variance(bias_std, "bias_std"),
                             parametrization=parametrization)
            x = nonlin(activation, h.named(f"h{tag}"), name=f"x{tag}")
    pooled = Pool(x, readout, name=f"{readout}_nodes")
    return Program(_readout(pooled, weight_std, bias_std, parametrization, readout_bias),
                   name=f"gnn{depth}_{aggregation}")
