"""Property tests: random graph models, rewired with random options, checked end to end.

Hypothesis draws a *description* of a model (a `Net`: its inputs, a list of `Step`, its
outputs) and the options of one `insert_dropout` call; `build` turns the description into
a Keras model. A failure therefore shrinks to a short, readable description such as
``Net(inputs=(4,), steps=(Step('dense', (0,), (4, 'relu', False)),), outputs=(1,))``.

The checks, for every drawn case: the plan is exactly what insertion adds; inference is
bitwise identical; weights are equal (shared or independent as asked), trainable flags and
output names kept; the original is untouched, also after a training step of the clone; a
``.keras`` round trip answers identically; `remove_dropout` gives back the layer names; and
in training mode the rewired model is stochastic exactly when a site has a rate above zero.

    pytest tests/test_fuzz.py                                # CI budget (profile "ci")
    HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py        # long budget: nox -s fuzz
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

import keras
import numpy as np
import pytest
from conftest import assert_identical, assert_snapshot_equal, snapshot, to_numpy
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from keras import layers
from models import randomize

import multidrop
from multidrop import graph, select

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("fuzz", max_examples=400, **_COMMON)
BUDGET = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BATCH, STEPS = 16, 3  # rows per test batch; time steps of sequence inputs
WIDTHS = (4, 6)
DENSE_ACTIVATIONS = ("relu", "tanh", "gelu", "selu", None)
ACTIVATION_LAYERS = {
    "relu": layers.ReLU,
    "leaky": layers.LeakyReLU,
    "elu": layers.ELU,
    "prelu": layers.PReLU,
    "softmax": layers.Softmax,
    "tanh": lambda name: layers.Activation("tanh", name=name),
    "linear": lambda name: layers.Activation("linear", name=name),  # not an activation site
}
FUNCTIONS = {  # op nodes in the functional graph; "shift" is not an activation
    "relu": keras.activations.relu,
    "gelu": keras.ops.gelu,
    "sigmoid": keras.activations.sigmoid,
    "tanh": keras.ops.tanh,
    "shift": lambda x: keras.ops.add(x, 0.5),
}
# The refusals a drawn case may meet; any other error is a bug.
REFUSALS = re.compile(
    r"matched no site|rate returned None for all|Cannot put dropout after layer"
    r"|Nested models are not searched with recursive=False"
)


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation of a `Net`: ``op`` applied to the tensors numbered ``src``.

    ops and their ``arg``: dense (units, activation, frozen); act (name in
    ACTIVATION_LAYERS); fn (name in FUNCTIONS); add, concat (none); norm
    ("batch" | "layer"); dropout (rate); again (the step whose Dense layer is
    called once more); seq, a nested Sequential (frozen, inference, units);
    block, a nested residual Functional (frozen, inference, twice), where
    inference calls it with training=False; td, a TimeDistributed Dense
    (units, inner layer frozen).
    """

    op: str
    src: tuple[int, ...]
    arg: object = None


@dataclasses.dataclass(frozen=True)
class Net:
    """A model: inputs of these widths (sequences of STEPS if ``seq``), the steps, and
    the numbers of the output tensors; tensors are numbered inputs first, then one per step.
    Its layers are built under the dtype ``policy``; if ``named``, inputs and outputs are dicts."""

    inputs: tuple[int, ...]
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]
    seq: bool = False
    sequential: bool = False
    policy: str = "float32"
    named: bool = False


# ----------------------------------------------------------------- drawing a Net


@st.composite
def nets(draw) -> Net:
    sequential = draw(st.booleans()) and draw(st.booleans())  # a quarter are Sequential
    inputs = (
        (draw(st.sampled_from(WIDTHS)),)
        if sequential
        else tuple(draw(st.lists(st.sampled_from(WIDTHS), min_size=1, max_size=2)))
    )
    seq = draw(st.booleans())
    widths, steps, dense_in = list(inputs), [], {}
    for _ in range(draw(st.integers(2, 7))):
        step = draw(_steps(widths, dense_in, seq, sequential))
        if step.op == "dense":
            dense_in[len(steps)] = widths[step.src[0]]
        steps.append(step)
        widths.append(_width(step, widths, steps))
    if draw(st.booleans()):  # a linear head, as most models have: the last activation is hidden
        steps.append(Step("dense", (len(widths) - 1,), (WIDTHS[0], None, False)))
        widths.append(WIDTHS[0])
    outputs = [len(widths) - 1]
    if not sequential and draw(st.booleans()):
        outputs.append(draw(st.integers(len(inputs), len(widths) - 1)))
    for i in range(len(inputs)):  # every input must reach an output
        if i not in _ancestors(outputs, inputs, steps):
            steps.append(Step("concat", (outputs[0], i)))
            outputs[0] = len(inputs) + len(steps) - 1
    policy = draw(st.sampled_from(["float32", "float32", "mixed_bfloat16"]))
    named = not sequential and draw(st.booleans())
    outputs = tuple(dict.fromkeys(outputs))
    return Net(inputs, tuple(steps), outputs, seq, sequential, policy, named)


def _steps(widths, dense_in, seq, sequential):
    last = len(widths) - 1
    src = st.just(last) if sequential else st.integers(0, last)
    units = st.sampled_from(WIDTHS)
    one = {
        "dense": st.tuples(units, st.sampled_from(DENSE_ACTIVATIONS), st.booleans()),
        "act": st.sampled_from(sorted(ACTIVATION_LAYERS)),
        "norm": st.sampled_from(["batch", "layer"]),
        "dropout": st.sampled_from([0.2, 0.5]),
        "seq": st.tuples(
            st.booleans(), st.booleans(), st.lists(units, min_size=1, max_size=2).map(tuple)
        ),
        "block": st.tuples(
            st.booleans(), st.booleans(), st.booleans() if not sequential else st.just(False)
        ),
    }
    if seq:
        one["td"] = st.tuples(units, st.booleans())
    choices = [
        st.builds(Step, st.just(op), src.map(lambda i: (i,)), arg) for op, arg in one.items()
    ]
    if not sequential:
        choices.append(
            st.builds(
                Step, st.just("fn"), src.map(lambda i: (i,)), st.sampled_from(sorted(FUNCTIONS))
            )
        )
        choices.append(st.builds(Step, st.just("concat"), st.tuples(src, src)))
        pairs = [
            (a, b)
            for a in range(len(widths))
            for b in range(a, len(widths))
            if widths[a] == widths[b]
        ]
        choices.append(st.builds(Step, st.just("add"), st.sampled_from(pairs)))
        again = [(s, i) for s, w in dense_in.items() for i in range(len(widths)) if widths[i] == w]
        if again:
            choices.append(st.sampled_from(again).map(lambda p: Step("again", (p[1],), p[0])))
    return st.one_of(choices)


def _width(step, widths, steps) -> int:
    if step.op in ("dense", "td"):
        return step.arg[0]
    if step.op == "seq":
        return step.arg[2][-1]
    if step.op == "concat":
        return sum(widths[i] for i in step.src)
    if step.op == "again":
        return steps[step.arg].arg[0]
    return widths[step.src[0]]


def _ancestors(outputs, inputs, steps) -> set[int]:
    seen, todo = set(), list(outputs)
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            if i >= len(inputs):
                todo.extend(steps[i - len(inputs)].src)
    return seen


# ----------------------------------------------------------------- building it


def build(net: Net) -> keras.Model:
    """The Keras model a `Net` describes, with seeded random weights (BN statistics too)."""
    default = keras.config.dtype_policy()
    keras.config.set_dtype_policy(net.policy)
    try:
        return randomize(_build(net))
    finally:
        keras.config.set_dtype_policy(default)


def _build(net: Net) -> keras.Model:
    shapes = [(STEPS, w) if net.seq else (w,) for w in widths_of(net)]
    inputs = [keras.Input(shapes[i], name=f"in{i}") for i in range(len(net.inputs))]
    if net.sequential:
        made = [_layer(step, i, shapes[step.src[0]]) for i, step in enumerate(net.steps)]
        return keras.Sequential([inputs[0], *made], name="net")
    tensors, made = list(inputs), {}
    for i, step in enumerate(net.steps):
        args = [tensors[j] for j in step.src]
        if step.op == "fn":
            tensors.append(FUNCTIONS[step.arg](args[0]))
        elif step.op == "add":
            tensors.append(layers.Add(name=f"s{i}_add")(args))
        elif step.op == "concat":
            tensors.append(layers.Concatenate(name=f"s{i}_concat")(args))
        elif step.op == "again":
            tensors.append(made[step.arg](args[0]))
        else:
            made[i] = _layer(step, i, shapes[step.src[0]])
            inference = step.op in ("seq", "block") and step.arg[1]
            out = made[i](args[0], training=False) if inference else made[i](args[0])
            if step.op == "block" and step.arg[2]:
                out = made[i](out)  # the same nested model called twice
            tensors.append(out)
    outputs = [tensors[i] for i in net.outputs]
    if net.named:  # dict inputs and outputs, keyed by name
        return keras.Model(
            {x.name: x for x in inputs}, {f"out{i}": y for i, y in enumerate(outputs)}, name="net"
        )
    return keras.Model(
        inputs if len(inputs) > 1 else inputs[0],
        outputs if len(outputs) > 1 else outputs[0],
        name="net",
    )


def widths_of(net: Net) -> list[int]:
    """The feature width of every tensor of a `Net`: inputs first, then one per step."""
    widths = list(net.inputs)
    for step in net.steps:
        widths.append(_width(step, widths, net.steps))
    return widths


def _layer(step: Step, i: int, shape: tuple):
    """The layer (or nested model) of a one-input step, named after the step."""
    name = f"s{i}_{step.op}"
    if step.op == "dense":
        units, activation, frozen = step.arg
        layer = layers.Dense(units, activation=activation, name=name)
        layer.trainable = not frozen
        return layer
    if step.op == "act":
        return ACTIVATION_LAYERS[step.arg](name=name)
    if step.op == "norm":
        return (layers.BatchNormalization if step.arg == "batch" else layers.LayerNormalization)(
            name=name
        )
    if step.op == "dropout":
        return layers.Dropout(step.arg, seed=i, name=name)  # seeded: see check_training_mode
    if step.op == "td":
        inner = layers.Dense(step.arg[0], activation="relu", name=f"{name}_dense")
        inner.trainable = not step.arg[1]
        return layers.TimeDistributed(inner, name=name)
    if step.op == "seq":
        dense = [
            layers.Dense(u, activation="relu", name=f"{name}_d{k}")
            for k, u in enumerate(step.arg[2])
        ]
        model = keras.Sequential([keras.Input(shape), *dense], name=name)
    else:  # block: LayerNorm(x + inner(gelu(Dense(x)))), inner a nested Sequential Dense(tanh)
        x = keras.Input(shape)
        h = keras.ops.gelu(layers.Dense(shape[-1], name=f"{name}_d0")(x))
        inner = keras.Sequential(
            [keras.Input(shape), layers.Dense(shape[-1], activation="tanh", name=f"{name}_d1")],
            name=f"{name}_inner",
        )
        h = layers.Add(name=f"{name}_add")([x, inner(h)])
        model = keras.Model(x, layers.LayerNormalization(name=f"{name}_norm")(h), name=name)
    model.trainable = not step.arg[0]
    return model


def inputs_for(model: keras.Model):
    """A batch for ``model``, in the structure of its inputs (a tensor, list or dict)."""
    rng = np.random.default_rng(1)
    structure = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
    return keras.tree.map_structure(
        lambda x: rng.normal(size=(BATCH, *x.shape[1:])).astype("float32"), structure
    )


# ----------------------------------------------------------------- drawing the options

LAYER_GROUPS = {
    "Dense": (layers.Dense,),
    "norm": (layers.BatchNormalization, layers.LayerNormalization),
}
LEAVES = st.sampled_from(
    [
        ("activations",),
        ("layers", "Dense"),
        ("layers", "norm"),
        ("regex", r"^s\d+_(dense|act)$"),
        ("regex", "block"),
        ("first", 1),
        ("first", 3),
        ("last", 1),
        ("last", 2),
        ("trainable",),
        ("within",),
    ]
)
SELECTORS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.tuples(st.just("not"), inner), st.tuples(st.sampled_from(["and", "or"]), inner, inner)
    ),
    max_leaves=3,
)
WHERE = st.one_of(
    st.just("activations"),
    st.just(("class", "Dense")),
    st.just(("classes",)),
    st.just(("callable",)),
    st.tuples(st.just("names"), st.lists(st.integers(0, 30), min_size=1, max_size=3).map(tuple)),
    st.tuples(st.just("select"), SELECTORS),
)


@st.composite
def options(draw, net: Net) -> dict:
    """Options of one insert_dropout call, as a description (resolved by `resolve`)."""
    # A callable kind's layer is the caller's: it takes the global dtype policy, not the site's.
    kinds = ["dropout", "gaussian", "alpha", "auto"] + ["spatial"] * net.seq
    kinds += ["callable"] * (net.policy == "float32")
    kind = draw(st.sampled_from(kinds))
    return dict(
        where=draw(WHERE),
        rate=draw(
            st.tuples(
                st.sampled_from(["float", "dict", "callable"]),
                st.sampled_from([0.3, 0.5, 0.3, 0.0]),
            )
        ),
        kind=kind,
        noise_shape=net.seq and kind in ("dropout", "alpha") and draw(st.booleans()),
        seed=draw(st.none() | st.integers(0, 99)),
        include_outputs=draw(st.booleans()),
        share_weights=draw(st.booleans()),
        recursive=draw(st.booleans()) or draw(st.booleans()),  # a quarter are False
    )


def resolve(option: dict, model: keras.Model) -> tuple:
    """``(rate, where, keyword options)`` for insert_dropout, from a drawn description."""
    names = [call.qualname for call in graph.walk(model)]
    where = _where(option["where"], model, names)
    how, value = option["rate"]
    if how == "dict":  # {name: rate} needs where to pick exactly those names
        picked = list(where) if isinstance(where, list) else names[::2]
        rate, where = {name: value for name in picked}, picked
    elif how == "callable":
        rate = lambda op: None if getattr(op, "units", 0) == 6 else value  # noqa: E731
    else:
        rate = value
    kind = (lambda r, layer: layers.Dropout(r)) if option["kind"] == "callable" else option["kind"]
    kwargs = dict(
        kind=kind,
        seed=option["seed"],
        include_outputs=option["include_outputs"],
        share_weights=option["share_weights"],
        recursive=option["recursive"],
        noise_shape=(None, 1, None) if option["noise_shape"] else None,
    )
    return rate, where, kwargs


def _where(spec, model, names):
    if spec == "activations":
        return spec
    if spec[0] == "class":
        return layers.Dense
    if spec[0] == "classes":
        return (layers.ReLU, layers.Dense, layers.BatchNormalization)
    if spec[0] == "callable":
        return lambda op: isinstance(op, layers.Dense) and op.units > 4
    if spec[0] == "names":
        return sorted({names[i % len(names)] for i in spec[1]})
    return _selector(spec[1], model)


def _selector(spec, model) -> select.Selector:
    head, *rest = spec
    if head == "not":
        return ~_selector(rest[0], model)
    if head in ("and", "or"):
        a, b = (_selector(s, model) for s in rest)
        return a & b if head == "and" else a | b
    if head == "layers":
        return select.layers(*LAYER_GROUPS[rest[0]])
    if head == "within":
        nested = [layer.name for layer in model._flatten_layers() if graph.is_graph_model(layer)]
        return select.within(*nested[1:] or ["no nested model"])
    return getattr(select, head)(*rest)


# ----------------------------------------------------------------- the property


@BUDGET
@given(data=st.data())
def test_random_graph_rewires_exactly(data):
    keras.backend.clear_session()
    net = data.draw(nets(), label="net")
    option = data.draw(options(net), label="options")
    model = build(net)
    x = inputs_for(model)
    before = snapshot(model)
    rate, where, kwargs = resolve(option, model)
    note(f"rate={rate!r}, where={where!r}, {kwargs}")
    try:
        the_plan = multidrop.plan(model, rate, where, **kwargs)
    except ValueError as error:  # a refusal: the same from insert_dropout, and nothing touched
        assert REFUSALS.search(str(error)), error
        event(f"refused: {REFUSALS.search(str(error)).group()}")
        with pytest.raises(ValueError, match=REFUSALS):
            multidrop.insert_dropout(model, rate, where, **kwargs)
        assert_snapshot_equal(before, snapshot(model))
        return
    rewired = multidrop.insert_dropout(model, rate, where, **kwargs)
    event(f"rewired, a rate above 0: {any(site.rate > 0 for site in the_plan)}")
    assert_snapshot_equal(before, snapshot(model))
    assert type(rewired) is type(model)

    check_sites(the_plan, model, rewired, kwargs["include_outputs"])
    assert_identical(model(x, training=False), rewired(x, training=False))
    check_weights(model, rewired, kwargs["share_weights"])
    check_round_trip(model, the_plan, rewired, x)
    assert_snapshot_equal(before, snapshot(model))
    check_training_mode(rewired, the_plan, x)
    if not kwargs["share_weights"]:
        assert_snapshot_equal(before, snapshot(model))
        check_training_leaves_original(model, before, rewired, x)


def check_sites(the_plan, model, rewired, include_outputs: bool) -> None:
    """One new layer per planned site, of the planned kind and rate, right after the site."""
    old = {layer.name for layer in model._flatten_layers()}
    new = {layer.name: layer for layer in rewired._flatten_layers()}
    assert set(new) - old == {site.name for site in the_plan}
    assert len(new) - len(old) == len(the_plan)
    for site in the_plan:
        layer = new[site.name]
        assert type(layer).__name__ == ("Dropout" if callable(the_plan.options.kind) else site.kind)
        assert layer.rate == site.rate
        (node,) = layer._inbound_nodes
        assert node.input_tensors[0]._keras_history.operation.name == site.call.name
    assert _output_names(rewired) == _output_names(model)
    if not include_outputs:
        assert not set(_output_layers(rewired)) & {site.name for site in the_plan}


def _output_names(model):
    return getattr(model, "output_names", None)  # a Sequential has none


def _output_layers(model) -> list[str]:
    """Names of the operations that produce the model's outputs, followed into nested models."""
    names, todo = [], list(model.outputs)
    while todo:
        op, _, index = todo.pop()._keras_history
        names.append(op.name)
        if graph.is_graph_model(op):
            todo.append(op.outputs[index])
    return names


def check_weights(model, rewired, share_weights: bool) -> None:
    """Every layer's weights equal, the same variables only when shared, flags kept.

    Layers are matched by name: Keras orders a Functional's layers, and so ``get_weights()``,
    by depth from the outputs, which an inserted layer can change. (Nor are variable paths
    compared: Keras names them after the scope they were built in.)"""
    new = {layer.name: layer for layer in rewired._flatten_layers()}
    assert len(rewired.weights) == len(model.weights)
    assert len(rewired.trainable_weights) == len(model.trainable_weights)
    for layer in model._flatten_layers():
        clone = new[layer.name]
        assert clone.trainable == layer.trainable
        if graph.is_graph_model(layer):
            continue  # a model's weights are its layers'
        assert [v.trainable for v in clone.weights] == [v.trainable for v in layer.weights]
        for a, b in zip(layer.get_weights(), clone.get_weights(), strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        same = [a is b for a, b in zip(layer.weights, clone.weights, strict=True)]
        assert all(same) if share_weights else not any(same)


def check_round_trip(model, the_plan, rewired, x) -> None:
    """Saved and loaded, the rewired model answers the same; remove_dropout gives the model back."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "rewired.keras")
        rewired.save(path)
        loaded = keras.saving.load_model(path)
    assert type(loaded) is type(rewired)
    assert_identical(rewired(x, training=False), loaded(x, training=False))
    for a, b in zip(rewired.get_weights(), loaded.get_weights(), strict=True):
        assert np.array_equal(a, b)  # a loaded model orders its layers as the saved one
    if not any(site.call.is_output for site in the_plan):  # else the saved names are the dropouts'
        assert _output_names(loaded) == _output_names(model)
    names = [layer.name for layer in model._flatten_layers()]
    for candidate in (rewired, loaded):
        plain = multidrop.remove_dropout(candidate)
        assert [layer.name for layer in plain._flatten_layers()] == names
        assert_identical(model(x, training=False), plain(x, training=False))


def check_training_mode(rewired, the_plan, x) -> None:
    """In training mode the rewired model differs from the same graph without the new layers
    exactly when a site drops with a rate above zero.

    The reference is ``remove_dropout(rewired)``: the model's own Dropout layers are seeded,
    so in both models they start from the same state and draw the same masks; all that can
    differ is the inserted dropout. A rate of 0.3 on 16 rows of at least 4 features leaves
    everything in place with a chance of about 1e-5 (half of the units may be zero after a
    ReLU, and dropping a zero changes nothing)."""
    reference = multidrop.remove_dropout(rewired)
    expected = to_numpy(reference(x, training=True))
    got = to_numpy(rewired(x, training=True))
    if any(site.rate > 0 for site in the_plan):
        pairs = zip(keras.tree.flatten(expected), keras.tree.flatten(got), strict=True)
        assert not all(np.array_equal(a, b) for a, b in pairs)
    else:
        assert_identical(expected, got)


def check_training_leaves_original(model, before, rewired, x) -> None:
    """One SGD step on the clone leaves the original as it was. (Whether the step moves the
    clone's weights depends on the graph: a PReLU after a ReLU gets no gradient.)"""
    if not rewired.trainable_weights:
        return
    rewired.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", run_eagerly=True)
    targets = keras.tree.map_structure(np.zeros_like, to_numpy(rewired(x, training=False)))
    assert np.isfinite(rewired.train_on_batch(x, targets)).all()
    assert_snapshot_equal(before, snapshot(model))
