"""The tensor-program IR (symntk.program): construction, validation and graph queries.

No derivation here: only what the IR itself promises (NETSOR-T programs, TP2 Def. 7.1,
TP3 Def. 2.1): immutable, structurally equal nodes; dimensions checked as nodes are built, with
errors naming the node; hyper-parameters refused where they enter.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import sympy as sp
from hypothesis import given, settings, strategies as st

from symntk import builders
from symntk.program import (PARAMETRIZATIONS, WIDTH, Bias, Carry, Embedding, FixedReadout, Input,
                            MatMul, Moment, Nonlin, OutputBias, Program, ProgramError, Readout,
                            Repeat, Transpose, Weight, nonlin, repeat)

A, B = sp.Symbol("a", real=True), sp.Symbol("b", real=True)
L = sp.Symbol("l", integer=True, positive=True)
RELU = sp.Lambda(A, sp.Max(0, A))


def _program(*, readout_bias=False):
    """xi -> h = U xi -> x = relu(h) -> g = W x + b -> y = relu(g) -> v^T y (+ b_out)."""
    xi = Input("xi", 3)
    U, W, b = Weight("U", fan_in=3), Weight("W"), Bias("b")
    h = (U @ xi).named("h")
    x = Nonlin(RELU, (h,), "x")
    g = (W @ x + b).named("g")
    y = Nonlin(RELU, (g,), "y")
    bias = OutputBias("b_out") if readout_bias else None
    return Program(Readout(Weight("v", fan_out=1), y, bias)), dict(xi=xi, U=U, W=W, b=b, h=h, x=x)


# ============================================================================ immutability
def test_fields_are_read_only_and_rebuilding_makes_a_new_node():
    W = Weight("W", variance=2)
    for field in ("name", "fan_in", "fan_out", "variance", "parametrization", "index"):
        with pytest.raises(AttributeError):
            setattr(W, field, 3)
    assert isinstance(W.args, tuple)
    W2 = W.xreplace({sp.Integer(2): sp.Integer(3)})
    assert (W.variance, W2.variance) == (2, 3) and W != W2


def test_named_returns_a_new_node():
    xi = Input("xi", 3)
    e = Weight("U", fan_in=3) @ xi
    h = e.named("h")
    assert e.name is None and h.name == "h" and h.label() == "h"
    assert h != e and (h.weight, h.input) == (e.weight, e.input)
    g = (Weight("W") @ h)
    for node in (g, Nonlin(RELU, (g,)), repeat(lambda c, l: Weight("W", index=l) @ c, g, 1, 2)):
        renamed = node.named("renamed")
        assert renamed.name == "renamed" and renamed.func is node.func and node.name != "renamed"
        assert renamed.named(node.name or "") == node


@pytest.mark.parametrize("node", [Bias("b"), Carry("c")], ids=["Bias", "Carry"])
def test_parameters_and_placeholders_cannot_be_renamed(node):
    with pytest.raises(ProgramError, match=f"{node.name} cannot be renamed"):
        node.named("other")


def test_no_attributes_can_be_attached():
    with pytest.raises(AttributeError):
        Weight("W").cache = {}


# ====================================================================== structural equality
def test_equal_structure_is_one_node():
    xi = Input("xi", 3)
    assert Weight("W") == Weight("W") and hash(Weight("W")) == hash(Weight("W"))
    assert Weight("U", fan_in=3) @ xi == Weight("U", fan_in=3) @ xi
    assert len({Weight("W"), Weight("W"), Weight("W", variance=2), Weight("W", index=L)}) == 3
    assert Weight("W", parametrization="tp") != Weight("W")


def test_a_weight_used_twice_is_one_parameter():
    xi = Input("xi", 3)
    h = (Weight("U", fan_in=3) @ xi).named("h")
    W = Weight("W")
    x1 = (W @ h).named("x1")
    x2 = (Weight("W") @ nonlin("relu", x1)).named("x2")          # rebuilt: the same W
    p = Program(Readout(Weight("v", fan_out=1), x2))
    assert p.weights.count(W) == 1
    assert sorted(w.name for w in p.weights) == ["U", "W", "v"]
    assert sum(isinstance(n, MatMul) and n.weight == W for n in p.nodes) == 2


def test_one_name_is_one_parameter():
    xi = Input("xi", 3)
    h = (Weight("U", fan_in=3) @ xi).named("h")
    x = Weight("W") @ h
    y = Weight("W", variance=2) @ x
    with pytest.raises(ProgramError, match="two different parameters are both called 'W'"):
        Program(Readout(Weight("v", fan_out=1), y))


# ============================================================================== dimensions
def test_embedding_dimension_mismatch_names_the_weight_and_input():
    with pytest.raises(ProgramError, match=r"W1 @ xi: weight fan_in 4 != input dimension 3"):
        Weight("W1", fan_in=4) @ Input("xi", 3)
    e = Weight("W1", fan_in=3) @ Input("xi", 3)
    assert isinstance(e, Embedding) and e.dim == WIDTH


def test_matmul_dimension_mismatch_names_the_weight_and_vector():
    h = (Weight("U", fan_in=3) @ Input("xi", 3)).named("h")
    with pytest.raises(ProgramError, match=r"W2 @ h: fan_in 5 != vector dimension n"):
        Weight("W2", fan_in=5) @ h
    m = sp.Symbol("m", positive=True, integer=True)
    g = Weight("W", fan_out=m) @ h
    assert g.dim == m and Weight("V", fan_in=m) @ g
    with pytest.raises(ProgramError, match=r"W\^T @ h: fan_in m != vector dimension n"):
        Weight("W", fan_out=m).T @ h


def test_matmul_operands_are_checked():
    h = Bias("h")
    with pytest.raises(ProgramError, match="multiplies a width-space vector, not a Weight"):
        Weight("W") @ Weight("V")
    with pytest.raises(ProgramError, match="MatMul needs a Weight or its transpose, got Bias"):
        MatMul(h, h)
    with pytest.raises(ProgramError, match="W\\^T cannot embed the input xi"):
        Weight("W", fan_out=3).T @ Input("xi", 3)


def test_nonlin_dimension_and_argument_checks_name_the_node():
    m = sp.Symbol("m", positive=True, integer=True)
    h, g = Bias("h"), Bias("g", dim=m)
    with pytest.raises(ProgramError, match=r"mixes vectors of dimensions \['m', 'n'\]"):
        h + g
    with pytest.raises(ProgramError, match="applied to W, a Weight"):
        Nonlin(RELU, (Weight("W"),))
    with pytest.raises(ProgramError, match="takes 2 arguments, given 1"):
        Nonlin(sp.Lambda((A, B), A * B), (h,))
    with pytest.raises(ProgramError, match="at least one vector argument"):
        Nonlin(RELU, (Moment(RELU, (h,)),))
    with pytest.raises(ProgramError, match="needs a SymPy Lambda, got Max"):
        Nonlin(sp.Max(0, A), (h,))


@pytest.mark.parametrize("dim", [0, -3, 2.5, float("nan"), float("inf")])
def test_bad_dimensions_name_the_node(dim):
    with pytest.raises(ProgramError, match="dimension of input 'xi' must be a positive integer"):
        Input("xi", dim)
    with pytest.raises(ProgramError, match="fan_in of weight 'W' must be a positive integer"):
        Weight("W", fan_in=dim)
    with pytest.raises(ProgramError, match="dimension of bias 'b' must be a positive integer"):
        Bias("b", dim=dim)


# =============================================================================== transpose
def test_transpose_of_transpose_is_the_weight():
    """Trsp: A : A(n1, n2) gives A^T : A(n2, n1), and (A^T)^T is A itself (TP3 Def. 2.1)."""
    m = sp.Symbol("m", positive=True, integer=True)
    W = Weight("W", fan_out=m, variance=2)
    assert W.T.T == W and Transpose(W).T is W
    assert W.T == W.T and W.T != W
    assert (W.T.fan_in, W.T.fan_out) == (m, WIDTH)
    # W : A(m, n) with entries N(0, 2/n); as an A(n, m) matrix its variance over fan_in m is 2m/n
    assert sp.simplify(W.T.variance / W.T.fan_in - W.variance / W.fan_in) == 0
    with pytest.raises(ProgramError, match="only a Weight can be transposed, got Transpose"):
        Transpose(W.T)
    with pytest.raises(ProgramError, match="got Bias"):
        Transpose(Bias("b"))


def test_transposed_matmul_refers_to_its_weight():
    W, h = Weight("W"), Bias("h")
    g = W.T @ h
    assert g.transposed and g.weight == W and g.matrix == W.T and g.label() == "W^T h"
    assert not (W @ h).transposed


# ============================================================================ vector algebra
def _values(node, *xs):
    return float(node.phi(*xs))


def test_operators_build_nonlins_with_the_right_argument_order():
    h, g = Bias("h"), Bias("g")
    cases = [  # (node, its inputs, phi at h=5, g=3)
        (h + 1, (h,), 6), (1 + h, (h,), 6), (h - 1, (h,), 4), (2 - h, (h,), -3),
        (h * 2, (h,), 10), (2 * h, (h,), 10), (h / 2, (h,), 2.5), (-h, (h,), -5),
        (h + g, (h, g), 8), (h - g, (h, g), 2), (g - h, (g, h), -2), (h * g, (h, g), 15),
    ]
    for node, inputs, value in cases:
        assert isinstance(node, Nonlin) and node.inputs == inputs
        args = [{h: 5, g: 3}[v] for v in inputs]
        assert _values(node, *args) == value, node
    s = sp.Symbol("s", positive=True)
    assert (s * h).phi(5) == 5 * s


def test_operator_misuse_is_refused():
    h = Bias("h")
    with pytest.raises(ProgramError, match="division by a vector"):
        h / Bias("g")
    with pytest.raises(ProgramError, match="cannot combine vector h with Weight"):
        h + Weight("W")
    with pytest.raises(ProgramError, match="cannot use '1 \\+ 1' in a vector expression"):
        h + "1 + 1"                    # text is never parsed


def test_nonlin_by_activation_name():
    h = Bias("h")
    x = nonlin("relu", h, name="x")
    assert x.name == "x" and x.inputs == (h,)
    assert [float(x.phi(v)) for v in (-2, 0, 3)] == [0, 0, 3]


# ============================================================================ repeat / carry
def _body(c, l):
    return nonlin("relu", (Weight("W", index=l) @ c).named("h"), name="x")


def test_repeat_unrolls_to_the_hand_written_graph():
    x1 = Bias("x1")
    r = repeat(_body, x1, 2, 4, name="x")
    assert isinstance(r, Repeat) and (r.start, r.stop, r.dim) == (2, 4, WIDTH)
    expected = x1
    for l in (2, 3, 4):
        expected = _body(expected, sp.Integer(l))
    assert r.unrolled() == expected
    assert r.unrolled(stop=2) == _body(x1, sp.Integer(2))
    assert r.iteration(7, x1) == _body(x1, sp.Integer(7))


def test_unrolled_program_lists_loop_parameters_per_iteration():
    x1 = Bias("x1")
    p = Program(Readout(Weight("v", fan_out=1), repeat(_body, x1, 2, 4, name="x")),
                require_input=False)
    assert len(p.repeats) == 1
    assert sorted(w.label() for w in p.unrolled().weights) == ["W[2]", "W[3]", "W[4]", "v"]
    assert p.unrolled().repeats == ()
    q = p.unrolled()
    assert q.unrolled() is q
    tied = Weight("W")
    t = Program(Readout(Weight("v", fan_out=1),
                        repeat(lambda c, l: nonlin("relu", tied @ c), x1, 2, 4)),
                require_input=False)
    assert t.unrolled().weights.count(tied) == 1 and len(t.unrolled().weights) == 2


def test_symbolic_bounds_cannot_unroll():
    depth = sp.Symbol("L", integer=True, positive=True)
    r = repeat(_body, Bias("x1"), 2, depth, name="x")
    with pytest.raises(ProgramError, match="Repeat 'x' has symbolic bounds"):
        r.unrolled()
    assert r.unrolled(stop=3) == _body(_body(Bias("x1"), sp.Integer(2)), sp.Integer(3))


def test_repeat_validation_names_the_loop():
    h, c = Bias("h"), Carry("c")
    m = sp.Symbol("m", positive=True, integer=True)
    with pytest.raises(ProgramError, match="Repeat needs a Carry placeholder"):
        Repeat(L, 1, 2, h, h, h)
    with pytest.raises(ProgramError, match="the body of a Repeat must be a vector, got Weight"):
        Repeat(L, 1, 2, c, Weight("W"), h)
    with pytest.raises(ProgramError, match="Repeat 'c': body, init and carry dimensions differ"):
        Repeat(L, 1, 2, c, c + 1, Bias("g", dim=m))
    with pytest.raises(ProgramError, match="Repeat 'c': stop 1 < start 2"):
        Repeat(L, 2, 1, c, c + 1, h)
    with pytest.raises(ProgramError, match="the init of Repeat 'c' uses its own carry"):
        Repeat(L, 1, 2, c, c + 1, c * 2)
    with pytest.raises(ProgramError, match="body of repeat 'z' must return a vector, got Weight"):
        repeat(lambda carry, l: Weight("W"), h, 1, 2, name="z")


def test_a_carry_outside_its_repeat_is_refused():
    c = Carry("c")
    with pytest.raises(ProgramError, match="Carry 'c' is used outside the body of its Repeat"):
        Program(Readout(Weight("v", fan_out=1), c + 1), require_input=False)
    inner = repeat(lambda carry, l: Weight("W", index=l) @ carry, Bias("h"), 1, 2, name="c")
    leaked = inner.carry * 2                            # the loop's own placeholder, outside it
    with pytest.raises(ProgramError, match="Carry 'c' is used outside"):
        Program(Readout(Weight("v", fan_out=1), inner + leaked), require_input=False)


# ================================================================================ programs
def test_program_lists_its_inputs_weights_and_biases():
    p, n = _program()
    assert p.inputs == (n["xi"],)
    assert set(p.weights) == {n["U"], n["W"], Weight("v", fan_out=1)}
    assert p.biases == (n["b"],)
    order = {node: i for i, node in enumerate(p.nodes)}
    assert order[n["xi"]] < order[n["h"]] < order[n["x"]] < order[p.output]   # topological
    assert p.nodes[-1] == p.output and len(set(p.nodes)) == len(p.nodes)


def test_program_output_must_be_a_readout():
    h = (Weight("U", fan_in=3) @ Input("xi", 3)).named("h")
    with pytest.raises(ProgramError, match=r"must be a readout \(Readout, VectorReadout, FixedReadout\), got Embedding"):
        Program(h)
    with pytest.raises(ProgramError, match="does not depend on any Input"):
        Program(Readout(Weight("v", fan_out=1), Bias("b")))
    assert Program(Readout(Weight("v", fan_out=1), Bias("b")), require_input=False).inputs == ()


def test_readout_kinds():
    h = (Weight("U", fan_in=3) @ Input("xi", 3)).named("h")
    x = nonlin("relu", h, name="x")
    v = Weight("v", fan_out=1)
    trained = Readout(v, x)
    assert trained.trained and trained.weight == v and trained.vector == x and trained.bias is None
    with_bias = Readout(v, x, OutputBias("b_out", variance=2))
    assert with_bias.bias == OutputBias("b_out", variance=2) and with_bias != trained
    tied = Readout(h, x)                          # read out by a vector of the program itself
    assert not tied.trained and tied.weight == h
    fixed = FixedReadout(x)
    assert fixed.vector == x and fixed.weight is None and fixed.bias is None
    for out in (trained, with_bias, tied, fixed):
        assert Program(out).output == out


def test_readout_validation_names_the_weight():
    x = Bias("x")
    with pytest.raises(ProgramError, match="readout v must have fan_out 1"):
        Readout(Weight("v"), x)
    with pytest.raises(ProgramError, match="readout v: fan_in 3 != dimension n of x"):
        Readout(Weight("v", fan_out=1, fan_in=3), x)
    m = sp.Symbol("m", positive=True, integer=True)
    with pytest.raises(ProgramError, match="readout vector g and x differ in dimension"):
        Readout(Bias("g", dim=m), x)
    with pytest.raises(ProgramError, match="a readout reads a width-space vector, got Weight"):
        FixedReadout(Weight("W"))
    with pytest.raises(ProgramError, match="needs a Weight or a Vector, got Input"):
        Readout(Input("xi", 3), x)


# ========================================================================= parametrizations
@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_every_parametrization_is_accepted(parametrization):
    for p in (Weight("W", parametrization=parametrization),
              Bias("b", parametrization=parametrization), OutputBias(parametrization=parametrization)):
        assert p.parametrization == parametrization


def test_unknown_parametrization_is_refused():
    for make in (lambda p: Weight("W", parametrization=p), lambda p: Bias("b", parametrization=p),
                 lambda p: OutputBias(parametrization=p)):
        with pytest.raises(ProgramError, match=r"unknown parametrization 'mup'; expected one of"):
            make("mup")


# ================================================================ variances (finite, >= 0)
S = sp.Symbol("sigma", positive=True)
#: (value, the words the error must contain)
BAD_VARIANCES = [
    (float("nan"), "is not a number"), (np.float64("nan"), "is not a number"),
    (sp.nan, "is not a number"), (float("inf"), "must be finite"), (-math.inf, "must be finite"),
    (sp.zoo, "must be finite"), (S + sp.oo, "must be finite"), (1j, "must be real"),
    (sp.I * S, "must be real"), (-1, "must be non-negative"), (-0.5, "must be non-negative"),
    (-S ** 2, "must be non-negative"), ("1", "must be a number or a SymPy expression"),
    (True, "must be a scalar expression"),
]
#: constructor of each parameter kind and the name its error uses
PARAMETERS = [
    (lambda v: Weight("W1", variance=v), "variance of weight 'W1'"),
    (lambda v: Bias("b1", variance=v), "variance of bias 'b1'"),
    (lambda v: OutputBias("b_out", variance=v), "variance of output bias 'b_out'"),
    (lambda v: Weight("v", fan_out=1, variance=v), "variance of weight 'v'"),  # a readout weight
]


@pytest.mark.parametrize("value, problem", BAD_VARIANCES, ids=lambda v: repr(v)[:20])
@pytest.mark.parametrize("make, name", PARAMETERS, ids=["Weight", "Bias", "OutputBias", "readout"])
def test_bad_variances_are_refused_naming_the_parameter(make, name, value, problem):
    with pytest.raises(ProgramError, match=f"^{name} {problem}"):
        make(value)


@pytest.mark.parametrize("value", [0, 1, sp.Rational(1, 2), 2.5, S ** 2, sp.Symbol("s"),
                                   sp.Symbol("sigma_w") ** 2, S ** 2 / WIDTH])
@pytest.mark.parametrize("make, name", PARAMETERS, ids=["Weight", "Bias", "OutputBias", "readout"])
def test_finite_and_symbolic_variances_are_accepted(make, name, value):
    assert make(value).variance == sp.sympify(value)


@settings(deadline=None, max_examples=60)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_a_float_variance_is_accepted_exactly_when_finite_and_non_negative(value):
    ok = math.isfinite(value) and value >= 0
    if ok:
        assert Weight("W", variance=value).variance == sp.Float(value)
    else:
        with pytest.raises(ProgramError, match="variance of weight 'W'"):
            Weight("W", variance=value)


# ========================================================================== builder arguments
BUILDERS = [getattr(builders, name) for name in builders.__all__]
#: builders whose first argument is the depth (the recurrent cells have none)
DEPTH_BUILDERS = [b for b in BUILDERS
                  if next(iter(inspect.signature(b).parameters)) == "depth"]


def _build(builder, depth, **kwargs):
    return builder(depth, **kwargs) if builder in DEPTH_BUILDERS else builder(**kwargs)


def test_nan_weight_std_is_refused_where_it_enters():
    with pytest.raises(ProgramError, match="^weight_std is not a number"):
        builders.mlp(2, weight_std=float("nan"))


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("argument, value, problem", [
    ("weight_std", float("nan"), "is not a number"), ("weight_std", np.nan, "is not a number"),
    ("weight_std", float("inf"), "must be finite"), ("weight_std", -1.0, "must be non-negative"),
    ("weight_std", 2j, "must be real"), ("weight_std", None, "must be a number"),
    ("weight_std", "1.0", "must be a number"),
    ("bias_std", -1, "must be non-negative"), ("bias_std", float("inf"), "must be finite"),
    ("bias_std", float("nan"), "is not a number"), ("bias_std", "0.1", "must be a number"),
    ("readout_bias", 1, "must be True or False"),
])
def test_bad_builder_arguments_are_refused_naming_them(builder, argument, value, problem):
    for depth in (1, 3):
        with pytest.raises(ProgramError, match=f"^{argument} {problem}"):
            _build(builder, depth, **{argument: value})


@pytest.mark.parametrize("value, problem", [(float("nan"), "must be finite"),
                                            (math.inf, "must be finite"), (1j, "must be real"),
                                            ("2", "must be a number")])
def test_bad_branch_scale_is_refused(value, problem):
    for depth in (1, 3):
        with pytest.raises(ProgramError, match=f"^branch_scale {problem}"):
            builders.residual_mlp(depth, branch_scale=value)


@pytest.mark.parametrize("builder", DEPTH_BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("depth", [0, -1, 2.0, True])
def test_bad_depth_is_refused(builder, depth):
    with pytest.raises(ProgramError, match="^depth must be an integer >= 1"):
        builder(depth)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_builder_variances_are_the_squared_stds(builder):
    sw = sp.Symbol("sigma_w", positive=True)
    # the recurrent cells have an input and a readout std of their own: set them alike
    own = [a for a in ("input_std", "readout_std") if a in inspect.signature(builder).parameters]
    same = dict.fromkeys(own, sw)
    p = _build(builder, 3, weight_std=sw, bias_std=0.1, **same).unrolled()
    assert p.weights and all(w.variance == sw ** 2 for w in p.weights)
    assert p.biases and all(b.variance == sp.Rational(1, 100) for b in p.biases)
    assert p.output.bias.variance == sp.Rational(1, 100)
    same = dict.fromkeys(own, 1.4)
    q = _build(builder, 2, weight_std=1.4, bias_std=0, **same)
    assert all(w.variance == sp.Rational(49, 25) for w in q.unrolled().weights)
