"""The structure of Python code: what a subclassed ``call()`` does, read from one probe call.

A Functional graph records its calls; a subclassed model or a custom layer (a
transformer block written as a ``keras.layers.Layer``, a keras-hub block) does
not: its structure is the Python code of its ``call()``. The probe runs the
model once, eagerly, on a small batch with ``training=False``, and records every
layer call in it: which layer called which sublayer, in what order, on what and
with what result. Nothing in the model changes.

From the records, `calls_inside` makes the same `multidrop.graph.Call` records a
graph walk makes, so selectors, plans and tables treat both alike. Each sublayer
is one site, at its first call; a sublayer called several times carries one
dropout after every call (its `ProbeNode.calls` says how many, the plan says so).

Residual branches are found from the recorded values, not from class names: a
sublayer's output ``d`` ends a residual branch when a tensor computed later in the
same ``call()`` equals ``d + x`` exactly, for ``x`` the block's input or a tensor
seen earlier in it (``x = x + self.dropout(h)`` in keras-hub's TransformerEncoder).
On random inputs, an exact equality of every element is no coincidence.

Keras' own layers (``MultiHeadAttention``, RNNs, wrappers) and nested graph models
are leaves: their structure is Keras', and their own dropout is set through their
configs (`multidrop.set_dropout`).

Example:
    >>> from multidrop import probe
    >>> root = probe.of(model)                     # one eager call, cached per model
    >>> [c.qualname for c in probe.calls_inside(root, (), False)]
    ['dense', 'block/dense_1', 'block/dropout', 'block', 'dense_2']
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
_FIRST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> first Record
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

    Records are cached per model, so they hold their layers by weak reference.
    """

    def __init__(self, layer, caller, args, kwargs):
        self._layer = weakref.ref(layer)
        self._caller = None if caller is None else weakref.ref(caller)
        self.args, self.kwargs = args, kwargs
        self.inputs = _tensors((args, kwargs))
        self.outputs: list = []
        self.children: list[Record] = []

    @property
    def layer(self):
        return self._layer()

    @property
    def caller(self):
        return None if self._caller is None else self._caller()


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
    """

    operation: keras.layers.Layer
    owner: keras.layers.Layer
    input_tensors: list
    outputs: list
    calls: int = 1
    branch_end: bool = False
    reason: str | None = None
    is_input = False

    @property
    def arguments(self):
        return _PLAIN_CALL


def is_structure(op) -> bool:
    """True for a layer whose ``call()`` is user code that calls sublayers: a subclassed
    model or a custom layer, not one of Keras' own layers or a graph model."""
    return (
        isinstance(op, keras.layers.Layer)
        and not isinstance(op, (_keras.Functional, keras.Sequential))
        and not _keras.is_keras_layer(op)
        and len(_keras.all_layers(op)) > 1
    )


def of(model, sample=None) -> Record:
    """The probe record of ``model``'s call on ``sample`` (default: random inputs shaped
    like what it was built on), cached per model; a new ``sample`` probes again."""
    if sample is None and model in _PROBES:
        return _PROBES[model][0]
    sample = sample_of(model) if sample is None else sample
    root = run(model, sample)
    _PROBES[model] = (root, sample)
    return root


def sample_of(model):
    """The inputs ``model`` is (or would be) probed on."""
    if model in _PROBES:
        return _PROBES[model][1]
    return _SAMPLES[model] if model in _SAMPLES else default_sample(model)


def call_of(layer) -> Record | None:
    """The record of ``layer``'s first call in the latest probe that saw it."""
    return _FIRST.get(layer)


def share_sample(old, new) -> None:
    """Probe ``new`` (a copy of ``old``) on the inputs ``old`` was probed on."""
    if old in _PROBES:
        _SAMPLES[new] = _PROBES[old][1]


def run(model, sample) -> Record:
    """Call ``model(sample, training=False)`` once, recording every layer call in it."""
    stack: list[Record] = []
    top: list[Record] = []
    seen: set[int] = set()

    def around(layer, args, kwargs, proceed):
        record = Record(layer, stack[-1].layer if stack else None, args, kwargs)
        if id(layer) not in seen:
            seen.add(id(layer))
            _FIRST[layer] = record
        (stack[-1].children if stack else top).append(record)
        stack.append(record)
        try:
            outputs = proceed()
        finally:
            stack.pop()
        record.outputs = _tensors(outputs)
        return outputs

    args, kwargs = sample if isinstance(sample, _Call) else ((sample,), {})
    try:
        with _keras.intercepting_calls(around):
            model(*args, **kwargs, training=False)
    except Exception as error:
        raise ValueError(
            f"multidrop runs {type(model).__name__} '{model.name}' once on a small batch to "
            f"read the structure of its call(), and that call failed: {type(error).__name__}: "
            f"{error}. Pass inputs it takes as sample=..., e.g. sample=x_train[:2]."
        ) from error
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
        return keras.tree.map_shape_structure(fill, config["input_shape"])
    if "shapes_dict" in config:
        shapes = config["shapes_dict"]
        return _Call((), {k.removesuffix("_shape"): keras.tree.map_shape_structure(fill, v)
                          for k, v in shapes.items()})
    raise ValueError(
        f"{type(model).__name__} '{model.name}' records no input shape, so multidrop cannot "
        "make inputs to read its call() with. Call it once on data, model(x), or pass "
        "sample=x."
    )


def _tensors(structure) -> list:
    return [t for t in keras.tree.flatten(structure) if keras.ops.is_tensor(t)]


def first_records(root: Record) -> dict[int, Record]:
    """``{id(layer): its first call's record}`` over the whole probe."""
    found: dict[int, Record] = {}
    pending = [root]
    while pending:
        record = pending.pop()
        found.setdefault(id(record.layer), record)
        pending.extend(reversed(record.children))
    return found


def calls_inside(
    record: Record, path: tuple, is_output: bool, fixed=(False, False), recursive=True
) -> list:
    """The `Call` records of the sublayer calls in ``record``'s ``call()``, and (with
    ``recursive``) in the custom layers among them; ``path`` names ``record``'s layer and
    those around it, ``is_output``: its output is the model's; ``fixed``: (inference_only,
    training_forced) of the graph call around it."""
    from multidrop.graph import Call

    children = _seen_through(record)
    branch_ends = _branch_ends(record, children)
    counts: dict[int, int] = {}
    for child in children:
        counts[id(child.layer)] = counts.get(id(child.layer), 0) + 1
    tracked = {id(layer) for layer in _keras.all_layers(record.layer)}
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
            _reason(child, tracked),
        )
        calls.append(Call(child.layer, node, path, 0, final, *fixed))
        if recursive and is_structure(child.layer) and node.reason is None:
            calls += calls_inside(child, (*path, child.layer.name), final, fixed)
    return calls


def _seen_through(record: Record) -> list[Record]:
    """``record``'s children with multidrop's `Then` wrappers opened: the wrapped layer's
    call, then the inserted layer's, as if ``call()`` made both."""
    from multidrop.layers import Then

    children = []
    for child in record.children:
        children += _seen_through(child) if isinstance(child.layer, Then) else [child]
    return children


def _reason(child: Record, tracked: set) -> str | None:
    if id(child.layer) not in tracked:
        return (
            f"{type(child.layer).__name__} '{child.layer.name}' is made inside call() on every "
            "call, so a copy has no such layer to edit; create it in __init__ instead"
        )
    if child.caller is None or not any(v is child.layer for _, v in _keras.children(child.caller)):
        return (
            f"{type(child.layer).__name__} '{child.layer.name}' is called by "
            f"'{getattr(child.caller, 'name', None)}' but held by another layer, so an edit "
            "of one would change both; call each sublayer from the layer that holds it"
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
                x is not d and x.dtype == d.dtype and x.shape == d.shape
                and np.array_equal(total, d + x) and not np.array_equal(total, x)
                for x in earlier
            ):
                ends.add(i)
                claimed.add(id(t))
    return ends


def _spec(tensor) -> keras.KerasTensor:
    shape = tuple(tensor.shape)
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    return keras.KerasTensor((None, *shape[1:]) if shape else (), dtype=dtype)
