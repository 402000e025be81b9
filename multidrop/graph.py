"""Read-only walk of a model's calls: Functional and Sequential graphs here, the ``call()``
of subclassed models and custom layers through `multidrop.probe`.

The walk lists every call of an operation (a layer call or an op node such as
``keras.activations.relu(x)``) in topological order, nested graph models
included, with the names of the models that hold it. Nothing is built and
nothing is changed: the rebuild in ``rebuild.py`` replays exactly these calls.

A built Sequential for which Keras recorded no graph (a layer's shape inference
failed in ``model.build(shape)``, or the input is a dict passed through) is what
Keras runs it as: a list of layers, each called on the previous one's output.
Its calls are `ListNode` records (a `ListGraph`), kept per model so that a plan
and the rebuild that carries it out see the same nodes.

Example:
    >>> from multidrop import graph
    >>> [c.name for c in graph.walk(model)]
    ['dense', 'dropout', 'dense_1']
"""

from __future__ import annotations

import dataclasses
import types
import weakref

import keras

from multidrop import _keras, probe
from multidrop._keras import Functional

_LISTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# node -> weak references to (owner, graph model): the model holds the node, so a strong
# value would keep both alive for as long as the process runs.
_WITHIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLAIN_CALL = types.SimpleNamespace(args=(), kwargs=types.MappingProxyType({}))


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One call of an operation inside a model.

    Attributes:
        operation: the layer or op called.
        node: what records the call (its arguments and outputs): the Keras node in a
            graph, a `multidrop.probe.ProbeNode` inside a ``call()``.
        path: names of the nested models and layers that hold the call, outermost first.
        index: 0 for the first call of ``operation`` in its graph, 1 for the
            second call of a shared layer, and so on.
        is_output: the call's output tensor is an output of the outermost model.
        inference_only: the call sits in a nested model called only with
            ``training=False`` (``backbone(x, training=False)``), so a dropout
            after it would never be active.
        training_forced: the call sits in a nested model called with
            ``training=True`` written into the graph, so a dropout after it
            would be active at inference too.
    """

    operation: keras.Operation
    node: object
    path: tuple[str, ...]
    index: int
    is_output: bool
    inference_only: bool
    training_forced: bool = False

    @property
    def name(self) -> str:
        return self.operation.name

    @property
    def qualname(self) -> str:
        """The call's name with its nesting path, e.g. ``backbone/conv1_relu``."""
        return "/".join((*self.path, self.name))

    @property
    def outputs(self) -> list:
        return self.node.outputs


@dataclasses.dataclass(frozen=True, eq=False)
class ListNode:
    """A layer's call in a built Sequential with no recorded graph; it reads like a
    Keras node: the layer, its input and its output (as far as Keras can tell)."""

    operation: keras.Operation
    input_tensors: list
    outputs: list
    is_input = False

    @property
    def arguments(self):
        """A Sequential calls its layers on one tensor, with no other argument."""
        return _PLAIN_CALL


@dataclasses.dataclass(frozen=True, eq=False)
class ListGraph:
    """What a built Sequential with no recorded graph has instead of one."""

    layers: tuple
    inputs: list
    outputs: list
    nodes: list

    @property
    def output_names(self) -> list[str]:
        return [self.layers[-1].name]


def inputs_struct(model):
    """The nesting (dict, list, one tensor) of a graph model's inputs."""
    whole = graph_of(model)
    return whole.inputs[0] if isinstance(whole, ListGraph) else _keras.inputs_struct(whole)


def is_graph_model(obj) -> bool:
    """True for the models multidrop rebuilds from their graph: Functional and Sequential."""
    return isinstance(obj, (Functional, keras.Sequential))


def check_model(model, argument: str = "model") -> None:
    """Raise a clear error unless ``model`` is a built Keras model."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{argument}` must be a keras.Model, got {type(model).__name__}. "
            "Pass a built Keras 3 model, or load one with "
            "keras.saving.load_model('model.keras')."
        )
    if not is_graph_model(model):
        if not model.built:
            raise ValueError(
                f"Subclassed model '{model.name}' ({type(model).__name__}) is not built, so it "
                "has no weights to keep yet. Call it once on a batch of data, model(x), "
                "or model.build((None, *shape)), then edit it."
            )
        return
    if isinstance(model, keras.Sequential) and _keras.sequential_graph(model) is None:
        if not model.built:
            raise ValueError(
                f"Sequential model '{model.name}' is not built, so it has no graph "
                "yet. Give it an input shape first: start it with "
                "keras.Input(shape=...), or call model.build((None, *shape))."
            )
        unbuilt = [layer.name for layer in model.layers if not layer.built]
        if unbuilt:
            raise ValueError(
                f"Sequential model '{model.name}' is built, but Keras could not infer "
                f"shapes through all its layers, so {unbuilt} have no weights yet and "
                "a copy could not match them. Call the model once on a batch of data, "
                "model(x), then rewire it."
            )


def graph_of(model) -> Functional | ListGraph:
    """The graph behind a graph model: a Functional (a Sequential keeps one), or a
    `ListGraph` for a built Sequential that Keras recorded no graph for."""
    if not isinstance(model, keras.Sequential):
        return model
    functional = _keras.sequential_graph(model)
    return _list_graph(model) if functional is None else functional


def _list_graph(model) -> ListGraph:
    """The layers' calls in order. A layer's output is what its ``compute_output_spec``
    gives or, where that fails (the reason Keras recorded no graph), the input the
    next layer was built on."""
    layers = tuple(model.layers)
    if model in _LISTS and _LISTS[model].layers == layers:
        return _LISTS[model]
    first = _keras.sequential_input(model)
    x = _built_on(layers[0], layers[0].input_dtype) if first is None else first.output
    nodes = []
    for layer, following in zip(layers, (*layers[1:], None)):
        try:
            y = layer.compute_output_spec(x)
        except Exception:
            y = None if following is None else _built_on(following, layer.compute_dtype)
        nodes.append(ListNode(layer, _flat(x), _flat(y)))
        x = y
    inputs = [] if first is None else [first.output]
    _LISTS[model] = ListGraph(layers, inputs, nodes[-1].outputs, nodes)
    return _LISTS[model]


def _flat(tensors) -> list:
    return [] if tensors is None else keras.tree.flatten(tensors)


def _built_on(layer, dtype):
    """Symbolic tensors like those ``layer`` was built on, or None if it records none.
    The batch size of the call that built it is no property of the layer: it is None."""
    shape = (layer.get_build_config() or {}).get("input_shape")
    if shape is None:
        return None
    return keras.tree.map_shape_structure(
        lambda s: keras.KerasTensor((None, *s[1:]), dtype=dtype), shape
    )


def nodes(model) -> list:
    """The non-input nodes of a graph model, in the order Keras runs them.

    A Sequential's are the calls of its layers only: the op nodes Keras records
    for masks (``Embedding(mask_zero=True)``) are not layers of the list, and a
    new Sequential makes them again."""
    graph = graph_of(model)
    if isinstance(graph, ListGraph):
        return list(graph.nodes)
    by_depth = _keras.nodes_by_depth(graph)
    ordered = [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]
    if isinstance(model, keras.Sequential):
        listed = set(map(id, model.layers))
        ordered = [node for node in ordered if id(node.operation) in listed]
    return ordered


def walk(model, *, recursive: bool = True) -> list[Call]:
    """Every call in ``model``: its graph's, nested graph models' and, for structure that
    lives in Python (a subclassed model, a custom layer's ``call()``), the sublayer calls
    one probe call records (see `multidrop.probe`).

    A nested model's or custom layer's own calls follow its call, and are listed once
    even when it is called several times.

    Args:
        model: a built Keras model.
        recursive: also walk into nested graph models and custom layers.

    Returns:
        A list of `Call`, in the order the model runs them.
    """
    check_model(model)
    if not is_graph_model(model):
        return probe.calls_inside(probe.of(model), (), True, recursive=recursive)
    graph = graph_of(model)
    calls: list[Call] = []
    _walk(model, (), set(map(id, graph.outputs)), (False, False), recursive, calls, set(), model)
    return calls


def walk_within(model, path: tuple, is_output: bool, fixed, owner) -> list[Call]:
    """The calls of graph model ``model``, called inside ``owner``'s ``call()``; their
    nodes are edited by rebuilding ``model`` and putting it in ``owner``'s copy (`within`)."""
    calls: list[Call] = []
    final = set(map(id, graph_of(model).outputs)) if is_output else set()
    _walk(model, path, final, fixed, True, calls, set(), None)
    for call in calls:
        _WITHIN.setdefault(call.node, (weakref.ref(owner), weakref.ref(model)))
    return calls


def within(node) -> tuple | None:
    """``(owner, graph model)`` when ``node`` belongs to a graph model called inside the
    ``call()`` of ``owner`` (a custom layer or subclassed model), else None."""
    refs = _WITHIN.get(node)
    pair = refs and (refs[0](), refs[1]())
    return pair if pair and None not in pair else None


def _record(top, op) -> probe.Record:
    """The probe record of custom layer ``op``, probing ``top`` if no probe saw it yet."""
    if probe.call_of(op) is None:
        probe.of(top)
    return probe.call_of(op)


def _walk(model, path, final_ids, fixed, recursive, calls, seen, top) -> None:
    counts: dict[int, int] = {}
    graph_nodes = nodes(model)
    for node in graph_nodes:
        op = node.operation
        index = counts.get(id(op), 0)
        counts[id(op)] = index + 1
        is_output = any(id(t) in final_ids for t in node.outputs)
        calls.append(Call(op, node, path, index, is_output, *fixed))
        if recursive and index == 0 and probe.is_structure(op):
            calls += probe.calls_inside(_record(top, op), (*path, op.name), is_output, fixed)
        if recursive and is_graph_model(op) and id(op) not in seen:
            seen.add(id(op))
            # A nested model called several times: an inner tensor is final if any call
            # makes it a model output, and inert only if every call says training=False.
            uses = [n for n in graph_nodes if n.operation is op]
            inner = graph_of(op).outputs
            inner_final = {
                id(inner[i])
                for use in uses
                for i, t in enumerate(use.outputs)
                if id(t) in final_ids
            }
            training = [use.arguments.kwargs.get("training") for use in uses]
            inert = fixed[0] or all(t is False for t in training)
            forced = fixed[1] or any(t is True for t in training)
            inner_path = (*path, op.name)
            _walk(op, inner_path, inner_final, (inert, forced), recursive, calls, seen, top)
