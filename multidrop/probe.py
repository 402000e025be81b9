"""The structure of Python code: what a subclassed ``call()`` does, read from one probe call.

A Functional graph records its calls; a subclassed model or a custom layer (a
transformer block written as a ``keras.layers.Layer``, a keras-hub block) does
not: its structure is the Python code of its ``call()``. The probe runs the
model once, eagerly, on a small batch, and records every layer call in it: which
layer called which sublayer, in what order, on what, with what ``training``
argument and with what result. It runs in training mode and puts back every
variable the call moved, so the model is left as it was.

From the records, `calls_inside` makes the same `multidrop.graph.Call` records a
graph walk makes, so selectors, plans and tables treat both alike. Each sublayer
is one site, at its first call; a sublayer called several times carries one
dropout after every call (its `ProbeNode.calls` says how many, the plan says so).

Residual branches are found from the recorded values, not from class names: a
sublayer's output ``d`` ends a residual branch when a tensor computed later in the
same ``call()`` equals ``d + x`` exactly, for ``x`` the block's input or a tensor
seen earlier in it (``x = x + self.dropout(h)`` in keras-hub's TransformerEncoder).
On random inputs, an exact equality of every element is no coincidence.

Keras' own layers (``MultiHeadAttention``, RNNs, wrappers) are leaves: their
structure is Keras', and their own dropout is set through their configs
(`multidrop.set_dropout`). A graph model called inside a ``call()`` (the
``keras.Sequential`` feed-forward of keras-io's TransformerBlock) is walked as a
graph (`multidrop.graph.walk_within`).

Example:
    >>> from multidrop import probe
    >>> root = probe.of(model)                     # one eager call, cached per model
    >>> [c.qualname for c in probe.calls_inside(root, (), False)]
    ['dense', 'block', 'block/dense_1', 'block/dropout', 'dense_2']
"""

from __future__ import annotations

import dataclasses
import types
import weakref

import keras
import numpy as np

from multidrop import _keras

_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (root, sample)
_SAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # copy -> its original's
_FIRST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {id(layer): Record}
_PLAIN_CALL = types.SimpleNamespace(args=(), kwargs=types.MappingProxyType({}))


class Record:
    """One layer call seen by the probe.

    Attributes:
        layer: the layer called.
        caller: the layer whose ``call()`` made this call (None for the probed model).
        args, kwargs: what it was called with.
        inputs: the tensors among them, flattened (positional, then keyword).
        outputs: the tensors it returned, flattened.
        children: the calls its own ``call()`` made, in order.

    Records are cached per model, so they hold the probed model (``root``) by weak
    reference: the cache must not keep it alive.
    """

    def __init__(self, layer, caller, args, kwargs, root):
        self._layer = _reference(layer, root)
        self._caller = None if caller is None else _reference(caller, root)
        self.args, self.kwargs = args, dict(kwargs)  # as called: Keras fills in ``training``
        self.inputs = _tensors((args, kwargs))
        self.outputs: list = []
        self.children: list[Record] = []
        self.in_inference_since: str | None = None  # see run()

    @property
    def layer(self):
        return self._layer()

    @property
    def caller(self):
        return None if self._caller is None else self._caller()


def _reference(layer, root):
    return weakref.ref(layer) if layer is root else (lambda: layer)


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeNode:
    """A sublayer's call inside a ``call()``; it reads like a Keras node.

    Attributes:
        operation: the sublayer.
        owner: the layer that holds it and calls it (where an edit replaces it).
        input_tensors, outputs: symbolic tensors shaped like the probe's (batch None).
        calls: how many times ``owner``'s ``call()`` called it.
        branch_end: its output is added to an earlier tensor: it ends a residual branch.
        reason: why nothing can follow it (None when something can).
        in_inference_since: the layer called with ``training=False`` before it in the same
            outer call, whose mode Keras keeps for it (then a dropout after it never runs).
    """

    operation: keras.layers.Layer
    owner: keras.layers.Layer
    input_tensors: list
    outputs: list
    calls: int = 1
    branch_end: bool = False
    reason: str | None = None
    in_inference_since: str | None = None
    is_input = False

    @property
    def arguments(self):
        return _PLAIN_CALL


def is_structure(op) -> bool:
    """True for a layer whose ``call()`` is user code that calls sublayers: a subclassed
    model or a custom layer, not one of Keras' own layers or a graph model."""
    return (
        isinstance(op, keras.layers.Layer)
        and not is_graph(op)
        and not _keras.is_keras_layer(op)
        and len(_keras.all_layers(op)) > 1
    )


def is_graph(op) -> bool:
    return isinstance(op, (_keras.Functional, keras.Sequential))


def of(model, sample=None) -> Record:
    """The probe record of ``model``'s call on ``sample`` (default: random inputs shaped
    like what it was built on), cached per model; a new ``sample`` probes again."""
    if sample is None and model in _PROBES:
        return _PROBES[model][0]
    sample = sample_of(model) if sample is None else sample
    root = run(model, sample)
    _PROBES[model] = (root, sample)
    return root


def read_with(model, sample) -> None:
    """Probe ``model`` on ``sample`` now (the ``sample=`` option), if one is given."""
    if sample is not None:
        of(model, sample)


def sample_of(model):
    """The inputs ``model`` is (or would be) probed on."""
    if model in _PROBES:
        return _PROBES[model][1]
    return _SAMPLES[model] if model in _SAMPLES else default_sample(model)


def call_of(layer) -> Record | None:
    """The record of ``layer``'s first call in a probe that saw it."""
    for first in list(_FIRST.values()):
        if id(layer) in first and first[id(layer)].layer is layer:
            return first[id(layer)]
    return None


def share_sample(old, new) -> None:
    """Probe ``new`` (a copy of ``old``) on the inputs ``old`` was probed on."""
    if old in _PROBES:
        _SAMPLES[new] = _PROBES[old][1]


def run(model, sample) -> Record:
    """Call ``model(sample, training=True)`` once, recording every layer call in it.

    Training mode makes ``training=training`` and a literal ``training=False`` in a
    ``call()`` tell apart; every variable the call moves is put back afterwards, so the
    model is left bitwise as it was."""
    stack: list[Record] = []
    top: list[Record] = []
    first: dict[int, Record] = {}
    # Keras keeps an explicit training= of a nested call for every call after it in the
    # same outer call (3.15; keras-team/keras#23364): after `backbone(x, training=False)`
    # the layers that get no training argument run in inference, in fit too.
    since: list[str | None] = [None]

    def around(layer, args, kwargs, proceed):
        record = Record(layer, stack[-1].layer if stack else None, args, kwargs, model)
        record.in_inference_since = since[0] if "training" not in kwargs else None
        if "training" in kwargs:
            since[0] = layer.name if kwargs["training"] is False else None
        first.setdefault(id(layer), record)
        (stack[-1].children if stack else top).append(record)
        stack.append(record)
        try:
            outputs = proceed()
        finally:
            stack.pop()
        record.outputs = _tensors(outputs)
        return outputs

    args, kwargs = sample if isinstance(sample, _Call) else ((sample,), {})
    state = [keras.ops.convert_to_numpy(v.value) for v in model.variables]
    try:  # in training mode, so that a training=False written into call() stands out
        with _keras.intercepting_calls(around):
            model(*args, **kwargs, training=True)
    except Exception as error:
        raise ValueError(
            f"multidrop runs {type(model).__name__} '{model.name}' once on a small batch to "
            f"read the structure of its call(), and that call failed: {type(error).__name__}: "
            f"{error}. Pass inputs it takes as sample=..., e.g. sample=x_train[:2], to plan, "
            "insert_dropout, set_dropout or remove_dropout: the structure read is kept for "
            "this model, so mc_predict, verify and search use it after."
        ) from error
    finally:  # what the training call moved (BatchNormalization's averages, RNG states)
        for variable, value in zip(model.variables, state):
            variable.assign(value)
    _FIRST[model] = first
    return top[0]


@dataclasses.dataclass(frozen=True)
class _Call:
    """Positional and keyword inputs for a model whose ``call()`` takes several."""

    args: tuple
    kwargs: dict

    def __iter__(self):
        return iter((self.args, self.kwargs))


def default_sample(model):
    """Random inputs in [0, 1) shaped like those ``model`` was built on (2 rows where the
    batch size is unknown, 8 for other unknown sizes); a graph model's from its inputs."""
    if isinstance(model, (_keras.Functional, keras.Sequential)):
        from multidrop.verify.inputs import sample_inputs

        return sample_inputs(model)
    config = model.get_build_config() or {}
    rng = np.random.default_rng(0)

    def fill(shape):
        sizes = [2 if d is None and i == 0 else 8 if d is None else d for i, d in enumerate(shape)]
        return rng.random(sizes, dtype="float32")

    if "input_shape" in config:
        return keras.tree.map_shape_structure(fill, _plain(config["input_shape"]))
    if "shapes_dict" in config:
        shapes = config["shapes_dict"]
        return _Call(
            (),
            {
                k.removesuffix("_shape"): keras.tree.map_shape_structure(fill, _plain(v))
                for k, v in shapes.items()
            },
        )
    raise ValueError(
        f"{type(model).__name__} '{model.name}' records no input shape, so multidrop cannot "
        "make inputs to read its call() with. Call it once on data, model(x), or pass "
        "sample=x."
    )


def _plain(structure):
    """Keras' tracked dicts and lists as plain ones (JAX traces no TrackedDict)."""
    if isinstance(structure, dict):
        return {k: _plain(v) for k, v in structure.items()}
    if isinstance(structure, list):
        return [_plain(v) for v in structure]
    return structure


def _tensors(structure) -> list:
    return [t for t in keras.tree.flatten(structure) if keras.ops.is_tensor(t)]


def calls_inside(
    record: Record, path: tuple, is_output: bool, fixed=(False, False), recursive=True, held=None
) -> list:
    """The `Call` records of the sublayer calls in ``record``'s ``call()``, and (with
    ``recursive``) in the custom layers among them; ``path`` names ``record``'s layer and
    those around it, ``is_output``: its output is the model's; ``fixed``: (inference_only,
    training_forced) of the graph call around it."""
    from multidrop import graph
    from multidrop.graph import Call

    children = _seen_through(record)
    branch_ends = _branch_ends(record, children)
    counts: dict[int, int] = {}
    for child in children:
        counts[id(child.layer)] = counts.get(id(child.layer), 0) + 1
    tracked = {id(layer) for layer in _keras.all_layers(record.layer)}
    held = _holders(record.layer) if held is None else held
    finals = {id(t) for t in record.outputs} if is_output else set()
    calls, done = [], set()
    for i, child in enumerate(children):
        if id(child.layer) in done:
            continue
        done.add(id(child.layer))
        final = any(id(t) in finals for t in child.outputs)
        node = ProbeNode(
            child.layer,
            child.caller,
            [_spec(t) for t in child.inputs],
            [_spec(t) for t in child.outputs],
            counts[id(child.layer)],
            i in branch_ends,
            _reason(child, tracked, held),
            child.in_inference_since,
        )
        calls.append(Call(child.layer, node, path, 0, final, *fixed))
        inner = (*path, child.layer.name)
        # The probe runs in training mode: a False here is written into the call().
        mode = (fixed[0] or child.kwargs.get("training") is False, fixed[1])
        if recursive and is_structure(child.layer) and node.reason is None:
            calls += calls_inside(child, inner, final, mode, held=held)
        elif recursive and is_graph(child.layer) and node.reason is None:
            calls += graph.walk_within(child.layer, inner, final, mode, child.caller)
    return calls


def _seen_through(record: Record) -> list[Record]:
    """``record``'s children with multidrop's `Then` wrappers opened: the wrapped layer's
    call, then the inserted layer's, as if ``call()`` made both."""
    from multidrop.layers import Then

    children = []
    for child in record.children:
        children += _seen_through(child) if isinstance(child.layer, Then) else [child]
    return children


def _holders(root) -> dict[int, int]:
    """``{id(layer): how many layers in root hold it}``."""
    counts: dict[int, int] = {}
    for layer in _keras.all_layers(root):
        for child in {id(c): c for _, c in _keras.children(layer)}:
            counts[child] = counts.get(child, 0) + 1
    return counts


def _reason(child: Record, tracked: set, held: dict) -> str | None:
    what = f"{type(child.layer).__name__} '{child.layer.name}'"
    if id(child.layer) not in tracked:
        return (
            f"{what} is made inside call() on every call, so a copy has no such layer to "
            "edit; create it in __init__ instead"
        )
    if held.get(id(child.layer), 0) > 1:
        return (
            f"{what} is held by {held[id(child.layer)]} layers, so an edit made in one would "
            "not be seen by the others; give each layer its own sublayer"
        )
    if child.caller is None or not any(v is child.layer for _, v in _keras.children(child.caller)):
        return (
            f"{what} is called by '{getattr(child.caller, 'name', None)}' but held by another "
            "layer, where an edit would put it; call each sublayer from the layer that holds it"
        )
    return None


def _branch_ends(record: Record, children: list[Record]) -> set[int]:
    """Indices of the children whose output ``d`` is added to an earlier tensor ``x`` of the
    same call (``record``'s inputs, or a child's input or output up to it) into a later
    tensor ``t`` (a later child's input, or ``record``'s output): ``t == d + x`` exactly.
    Each sum belongs to the last child that makes it (a Dropout after the Dense that
    feeds it passes the same values through in inference: the Dropout ends the branch)."""
    values: dict[int, np.ndarray] = {}

    def value(t):
        if id(t) not in values:
            values[id(t)] = np.asarray(keras.ops.convert_to_numpy(t))
        return values[id(t)]

    ends, claimed = set(), set()
    for i in reversed(range(len(children))):
        child = children[i]
        if len(child.outputs) != 1 or "float" not in str(child.outputs[0].dtype):
            continue
        d = value(child.outputs[0])
        if not d.any():
            continue
        earlier = [*record.inputs, *(t for c in children[: i + 1] for t in (*c.inputs, *c.outputs))]
        earlier = [value(x) for x in earlier]
        later = [*(t for c in children[i + 1 :] for t in c.inputs), *record.outputs]
        for t in later:
            if id(t) in claimed or tuple(t.shape) != d.shape:
                continue
            total = value(t)
            if any(
                x is not d
                and x.dtype == d.dtype
                and x.shape == d.shape
                and np.array_equal(total, d + x)
                and not np.array_equal(total, x)
                for x in earlier
            ):
                ends.add(i)
                claimed.add(id(t))
    return ends


def _spec(tensor) -> keras.KerasTensor:
    shape = tuple(tensor.shape)
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    return keras.KerasTensor((None, *shape[1:]) if shape else (), dtype=dtype)
