"""Read-only walk of Functional and Sequential graphs.

The walk lists every call of an operation (a layer call or an op node such as
``keras.activations.relu(x)``) in topological order, nested graph models
included, with the names of the models that hold it. Nothing is built and
nothing is changed: the rebuild in ``rewire.py`` replays exactly these calls.

Example:
    >>> from multidrop import graph
    >>> [c.name for c in graph.walk(model)]
    ['dense', 'dropout', 'dense_1']
"""

from __future__ import annotations

import dataclasses

import keras

from multidrop import _keras
from multidrop._keras import Functional


@dataclasses.dataclass(frozen=True, eq=False)
class Call:
    """One call of an operation inside a graph model.

    Attributes:
        operation: the layer or op called.
        node: the Keras node that records the call (its arguments and outputs).
        path: names of the nested models that hold the call, outermost first.
        index: 0 for the first call of ``operation`` in its graph, 1 for the
            second call of a shared layer, and so on.
        is_output: the call's output tensor is an output of the outermost model.
        inference_only: the call sits in a nested model called only with
            ``training=False`` (``backbone(x, training=False)``), so a dropout
            after it would never be active.
    """

    operation: keras.Operation
    node: object
    path: tuple[str, ...]
    index: int
    is_output: bool
    inference_only: bool

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


def is_graph_model(obj) -> bool:
    """True for the models multidrop can rewire: Functional and Sequential."""
    return isinstance(obj, (Functional, keras.Sequential))


def check_model(model, argument: str = "model") -> None:
    """Raise a clear error unless ``model`` is a built graph model."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{argument}` must be a keras.Model, got {type(model).__name__}. "
            "Pass a Functional or Sequential Keras 3 model, or load one with "
            "keras.saving.load_model('model.keras')."
        )
    if not is_graph_model(model):
        raise TypeError(
            f"`{argument}` is a subclassed model ({type(model).__name__}); "
            "only Functional and Sequential graphs can be rewired, because a "
            "subclassed model's call() is Python code with no graph to edit. "
            "Rebuild it with the Functional API, or add Dropout layers in its "
            "call() yourself."
        )
    if isinstance(model, keras.Sequential) and _keras.sequential_graph(model) is None:
        raise ValueError(
            f"Sequential model '{model.name}' is not built, so it has no graph "
            "yet. Give it an input shape first: start it with "
            "keras.Input(shape=...), or call model.build((None, *shape))."
        )


def graph_of(model) -> Functional:
    """The Functional graph behind a graph model (a Sequential keeps one)."""
    return _keras.sequential_graph(model) if isinstance(model, keras.Sequential) else model


def nodes(model) -> list:
    """The non-input nodes of a graph model, in the order Keras runs them."""
    by_depth = _keras.nodes_by_depth(graph_of(model))
    return [
        node
        for depth in sorted(by_depth, reverse=True)
        for node in by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def walk(model, *, recursive: bool = True) -> list[Call]:
    """Every call in ``model``'s graph, nested graph models included.

    A nested model's own calls follow the call of the nested model itself,
    and are listed once even when the nested model is called several times.

    Args:
        model: a built Functional or Sequential model.
        recursive: also walk into nested Functional and Sequential models.

    Returns:
        A list of `Call`, in topological order.
    """
    check_model(model)
    graph = graph_of(model)
    calls: list[Call] = []
    _walk(model, (), set(map(id, graph.outputs)), False, recursive, calls, set())
    return calls


def _walk(model, path, final_ids, inference_only, recursive, calls, seen) -> None:
    counts: dict[int, int] = {}
    graph_nodes = nodes(model)
    for node in graph_nodes:
        op = node.operation
        index = counts.get(id(op), 0)
        counts[id(op)] = index + 1
        is_output = any(id(t) in final_ids for t in node.outputs)
        calls.append(Call(op, node, path, index, is_output, inference_only))
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
            inert = all(use.arguments.kwargs.get("training") is False for use in uses)
            frozen = inference_only or inert
            _walk(op, (*path, op.name), inner_final, frozen, recursive, calls, seen)

