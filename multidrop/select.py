"""Selectors: which sites of a graph get a dropout.

A selector looks at the candidate sites of a model (see ``graph.Call``) and
picks some. Selectors combine: ``a | b`` takes the sites either picks,
``~a`` the sites ``a`` leaves, and ``a & b`` lets ``b`` choose among the sites
``a`` picked, so positional selectors read naturally:
``activations() & last(3)`` is the last three activations.

Example:
    >>> from multidrop import select
    >>> where = select.activations() & ~select.within("mobilenetv2_1.00_96")
    >>> multidrop.insert_dropout(model, 0.3, where=where)   # only in the head
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import keras

from multidrop import _keras, options
from multidrop.graph import Call

__all__ = [
    "Selector",
    "activations",
    "first",
    "last",
    "layers",
    "names",
    "regex",
    "residual_branches",
    "trainable",
    "where",
    "within",
]

# Layers that are an activation function and nothing else.
ACTIVATION_LAYERS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.PReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
)
# Layers whose output is their fused ``activation`` applied last.
FUSED_ACTIVATION_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, *_keras.CONV_LAYERS)
# Op nodes named after a function of keras.activations (Relu, Gelu, Tanh...).
_ACTIVATION_OP_NAMES = {
    name.replace("_", "")
    for name in keras.activations.__dict__
    if not name.startswith("_") and name not in ("linear", "get", "serialize", "deserialize")
}


def is_activation(op) -> bool:
    """True when ``op`` ends in a non-linear activation function, also inside a wrapper
    (``TimeDistributed``). A recurrent layer's output is not one (see `activations`)."""
    if isinstance(op, keras.layers.Activation):
        return op.activation is not keras.activations.linear
    if isinstance(op, ACTIVATION_LAYERS):
        return True
    if isinstance(op, FUSED_ACTIVATION_LAYERS):
        return getattr(op, "activation", None) not in (None, keras.activations.linear)
    if isinstance(op, keras.layers.Wrapper):  # TimeDistributed(Dense(8, activation="relu"))
        return is_activation(op.layer)
    if isinstance(op, keras.layers.Layer):
        return False
    return type(op).__name__.lower() in _ACTIVATION_OP_NAMES


class Selector:
    """Picks sites. Build one with the functions of this module.

    Args:
        pick: maps the list of candidate calls to one bool per call.
        text: how the selector reads in a plan, e.g. ``activations()``.
        names: layer names the selector refers to, checked to exist.
    """

    def __init__(self, pick: Callable[[list[Call]], list[bool]], text: str, names=()):
        self._pick = pick
        self.text = text
        self.names = tuple(names)

    def __call__(self, calls: list[Call]) -> list[bool]:
        return list(self._pick(calls))

    def __or__(self, other: Selector) -> Selector:
        other = coerce(other)
        return Selector(
            lambda cs: [a or b for a, b in zip(self(cs), other(cs))],
            f"({self.text} | {other.text})",
            self.names + other.names,
        )

    def __and__(self, other: Selector) -> Selector:
        other = coerce(other)

        def pick(cs):
            mine = self(cs)
            chosen = [c for c, m in zip(cs, mine) if m]
            theirs = iter(other(chosen))
            return [m and next(theirs) for m in mine]

        return Selector(pick, f"({self.text} & {other.text})", self.names + other.names)

    def __invert__(self) -> Selector:
        return Selector(lambda cs: [not m for m in self(cs)], f"~{self.text}", self.names)

    def __repr__(self) -> str:
        return f"select.{self.text}"


def _predicate(test: Callable[[Call], bool], text: str, names=()) -> Selector:
    return Selector(lambda cs: [bool(test(c)) for c in cs], text, names)


def activations() -> Selector:
    """Standalone activation layers, layers with a fused non-linear
    ``activation`` (Dense, Conv*, EinsumDense...) and activation op nodes
    such as ``keras.activations.relu(x)`` or ``keras.ops.gelu(x)``.

    A wrapper counts when the layer it wraps does: ``TimeDistributed(Dense(8,
    activation="relu"))`` is a site. Recurrent layers (``LSTM``, ``GRU``,
    ``SimpleRNN``, and ``Bidirectional`` around them) are not, although their
    cells use ``tanh``: that activation is applied inside the recurrence, and
    what comes out is the hidden state, not an activation the user fused into
    a layer. Pick them explicitly: ``select.layers(keras.layers.Bidirectional)``."""
    return _predicate(lambda c: is_activation(c.operation), "activations()")


def layers(*classes: type) -> Selector:
    """Calls of layers that are instances of any of ``classes``."""
    if not classes or not all(isinstance(c, type) for c in classes):
        raise TypeError(f"select.layers() takes layer classes, got {classes!r}")
    text = ", ".join(c.__name__ for c in classes)
    return _predicate(lambda c: isinstance(c.operation, classes), f"layers({text})")


def names(*layer_names: str) -> Selector:
    """Calls of the layers or ops with these names (``conv1`` or, inside a
    nested model, ``backbone/conv1``). Unknown names raise ``ValueError``."""
    if not layer_names or not all(isinstance(n, str) for n in layer_names):
        raise TypeError(f"select.names() takes layer names as strings, got {layer_names!r}")
    wanted = set(layer_names)
    return _predicate(
        lambda c: c.name in wanted or c.qualname in wanted,
        f"names({', '.join(map(repr, layer_names))})",
        layer_names,
    )


def regex(pattern: str) -> Selector:
    """Calls whose name (or ``path/name``) contains a match of ``pattern``."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        message = f"select.regex({pattern!r}) is not a regular expression: {error}"
        raise ValueError(message) from error
    return _predicate(
        lambda c: compiled.search(c.name) or compiled.search(c.qualname),
        f"regex({pattern!r})",
    )


def within(*model_names: str) -> Selector:
    """Calls inside the nested models with these names, at any depth."""
    wanted = set(model_names)
    return _predicate(
        lambda c: wanted.intersection(c.path),
        f"within({', '.join(map(repr, model_names))})",
    )


def trainable() -> Selector:
    """Calls in trainable parts of the model: not inside a frozen backbone."""
    return Selector(_trainable_mask, "trainable()")


def _trainable_mask(calls: list[Call]) -> list[bool]:
    def trainable(op) -> bool:
        return getattr(op, "trainable", True)  # op nodes (keras.ops.gelu...) have no flag

    frozen = {c.qualname for c in calls if not trainable(c.operation)}
    return [
        trainable(c.operation)
        and not any("/".join(c.path[: i + 1]) in frozen for i in range(len(c.path)))
        for c in calls
    ]


def first(n: int) -> Selector:
    """The first ``n`` sites (in graph order) of those offered."""
    _check_count(n, "first")
    return Selector(lambda cs: [i < n for i in range(len(cs))], f"first({n})")


def last(n: int) -> Selector:
    """The last ``n`` sites (in graph order) of those offered."""
    _check_count(n, "last")
    return Selector(lambda cs: [i >= len(cs) - n for i in range(len(cs))], f"last({n})")


def _check_count(n, what: str) -> None:
    options.check_int(n, f"n of select.{what}(n)", minimum=1)


def residual_branches() -> Selector:
    """The branch of every residual connection: for each ``Add`` of two tensors (an
    ``Add`` layer or an ``x + y`` op node), the call that makes the branch input, so
    that a dropout there (``kind="stochastic_depth"``) drops the branch, not the sum.

    The branch is the input with the longer path from the model's inputs; the shortcut
    is the other one, an identity or a short projection (ResNet's 1x1 conv + BN). On a
    tie the second input is the branch (``x + f(x)``). Inside a ``call()`` (a custom
    block, a subclassed model, a keras-hub ``TransformerEncoder``) the probe finds the
    sublayer whose output is added to an earlier tensor (``x = x + self.dropout(h)``):
    see `multidrop.probe`.

    Example:
        >>> multidrop.insert_dropout(resnet, multidrop.linear(0.1),
        ...                          where=select.residual_branches(), kind="stochastic_depth")
    """
    return Selector(_branch_mask, "residual_branches()")


def _branch_mask(calls: list[Call]) -> list[bool]:
    made_by = {id(t): c for c in calls for t in c.outputs}
    depth: dict[int, int] = {}
    for c in calls:
        before = [depth[id(made_by[id(t)])] for t in c.node.input_tensors if id(t) in made_by]
        depth[id(c)] = 1 + max(before, default=0)
    branches = set()
    for c in calls:
        inputs = c.node.input_tensors
        if not _is_add(c.operation) or len(inputs) != 2:
            continue
        known = [made_by.get(id(t)) for t in inputs]
        levels = [depth[id(k)] if k is not None else 0 for k in known]
        branch = known[0] if levels[0] > levels[1] else known[1]
        if branch is not None:
            branches.add(id(branch))
    return [id(c) in branches or getattr(c.node, "branch_end", False) for c in calls]


def _is_add(op) -> bool:
    return isinstance(op, keras.layers.Add) or (
        not isinstance(op, keras.layers.Layer) and type(op).__name__ == "Add"
    )


def where(test: Callable[[keras.Operation], bool]) -> Selector:
    """Calls whose layer (or op) makes ``test(layer)`` true."""
    text = getattr(test, "__name__", "callable")
    return _predicate(lambda c: test(c.operation), f"where({text})")


def coerce(spec) -> Selector:
    """Turn a ``where=`` argument into a Selector.

    Accepts a Selector, ``"activations"``, a layer class or tuple of classes,
    a list of layer names, or a callable ``layer -> bool``.
    """
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        if spec == "activations":
            return activations()
        raise ValueError(
            f"where={spec!r} is not a selector. Use where='activations', or "
            f"where=[{spec!r}] to put dropout after the layer named {spec!r}."
        )
    if isinstance(spec, type):
        return layers(spec)
    if isinstance(spec, Sequence) and spec and all(isinstance(s, type) for s in spec):
        return layers(*spec)
    if isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
        return names(*spec)
    if callable(spec):
        return where(spec)
    raise TypeError(
        f"where must be 'activations', a layer class or tuple of classes, a "
        f"non-empty list of layer names, a callable layer -> bool, or a "
        f"multidrop.select selector; got {spec!r}."
    )
