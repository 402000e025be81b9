"""The edits a user asks for, each a thin caller of the one rebuild: dropout in, dropout out,
a layer's own dropout rates set.

Each function turns its options into "after this call put this layer", "take
this call out" and "clone operations this way", and hands them to
`multidrop.rebuild.rebuild`, which also checks the result.

Example:
    >>> rewired = multidrop.insert_dropout(model, 0.2)
    >>> rewired = multidrop.insert_dropout(model, {"fc1": 0.5}, where=["fc1"], mc=True)
    >>> original_again = multidrop.remove_dropout(rewired)
"""

from __future__ import annotations

import keras

from multidrop import _keras, fields, graph, kinds, probe, surgery
from multidrop.layers import MonteCarlo, Then
from multidrop.options import Options, RemoveOptions, SetOptions, build, signature_of
from multidrop.plan import decide, is_added_name
from multidrop.rebuild import clone_operation, clone_with_config, edit


@signature_of(Options, "model")
def insert_dropout(model, rate, where="activations", **options) -> keras.Model:
    """Return a clone of ``model`` with dropout layers after the chosen sites.

    ``model`` is never changed. The clone answers bitwise like the original in
    inference mode (``clone(x, training=False)``), keeps every layer name, input
    and output name and structure, weight value, ``trainable`` flag, shared
    layer and nested model, and is not compiled.

    Args:
        model: a built Keras 3 model: Functional, Sequential or subclassed.
        rate: the dropout rate, a float in [0, 1); ``{layer_name: rate}``; a callable
            ``layer -> float | None``; or `multidrop.linear` (rates growing with depth).
        where: which sites (default: after every activation); see `multidrop.select`.
        **options: ``kind``, ``noise_shape``, ``seed``, ``include_outputs``,
            ``recursive``, ``share_weights``, ``mc``: see `multidrop.options.Options`.

    Returns:
        The rewired model: a Sequential for a Sequential, a Functional for a graph, and
        for a subclassed model an instance of a subclass of its class (`multidrop.surgery`).

    Example:
        >>> rewired = multidrop.insert_dropout(model, 0.2)
        >>> rewired.compile("adam", "sparse_categorical_crossentropy")
        >>> rewired.fit(x, y)                # model is untouched
    """
    opts = build(Options, "insert_dropout", rate=rate, where=where, **options)
    the_plan = decide(model, opts)
    after = {n: layer for n, layer in the_plan.after.items() if not _inside(n)}
    inside = [
        (n.owner, n.operation, lambda sub, layer=layer: Then(sub, layer))
        for n, layer in the_plan.after.items()
        if _inside(n)
    ]
    return edit(model, after=after, inside=inside, clone=_cloner(opts.share_weights))


@signature_of(RemoveOptions, "model")
def remove_dropout(model, **options) -> keras.Model:
    """Return a clone of ``model`` without the dropout layers multidrop added.

    multidrop's layers are recognised by their names (``<site>_multidrop``),
    so this works after a ``.keras`` save and load too. The model's own
    dropout layers stay unless ``all=True``, which removes every Dropout-family
    layer. ``model`` is never changed.

    Args:
        model: a built Keras model: Functional, Sequential or subclassed.
        **options: ``all``, ``share_weights``: see `multidrop.options.RemoveOptions`.

    Example:
        >>> plain = multidrop.remove_dropout(multidrop.insert_dropout(model, 0.2))
        >>> [l.name for l in plain.layers] == [l.name for l in model.layers]
        True
    """
    opts = build(RemoveOptions, "remove_dropout", **options)
    probe.read_with(model, opts.sample)
    calls = [c for c in graph.walk(model) if _is_removable(c.operation, opts.all)]
    drop = [c.node for c in calls if not _inside(c.node)]
    inside = [
        (_holder(model, c.node.owner), c.node.owner, lambda then: then.layer)
        for c in calls
        if _inside(c.node) and isinstance(c.node.owner, Then) and c.node.owner.after is c.operation
    ]
    if not drop and not inside and opts.all and any(_inside(c.node) for c in calls):
        raise ValueError(
            f"Model '{model.name}' has Dropout layers only inside call() code, which "
            "remove_dropout cannot take out (only multidrop's own wrappers). Set their rates "
            "to 0 instead: multidrop.set_dropout(model, 0.0)."
        )
    if not drop and not inside:
        raise ValueError(
            f"Model '{model.name}' has no "
            + ("Dropout-family layers" if opts.all else "dropout layers added by multidrop")
            + " to remove."
            + ("" if opts.all else " Pass all=True to remove every Dropout-family layer.")
        )
    return edit(model, drop=drop, inside=inside, clone=_cloner(opts.share_weights))


@signature_of(SetOptions, "model")
def set_plan(model, rate, where=None, **options) -> fields.FieldPlan:
    """Dry run of `set_dropout`: every (layer, field, old rate, new rate) it sets, as a table.

    Example:
        >>> print(multidrop.set_plan(bert_backbone, 0.2))   # one row: dropout 0.1 -> 0.2
    """
    return fields.changes(model, build(SetOptions, "set_plan", rate=rate, where=where, **options))


@signature_of(SetOptions, "model")
def set_dropout(model, rate, where=None, **options) -> keras.Model:
    """Return a clone of ``model`` whose layers' own dropout rates are set to ``rate``.

    Every dropout-rate field a selected layer's config has is set (``dropout``,
    ``recurrent_dropout``, ``attention_dropout``, a Dropout's ``rate``, a keras-hub
    backbone's ``dropout``...; see `multidrop.fields`), in nested layers and models
    too. The clone keeps its class where the class can express the change (a
    ``BertBackbone`` stays a ``BertBackbone``, a keras-hub task model stays its task
    class), and keeps weights, names and trainable flags. It answers bitwise like the
    original in inference, except where Keras picks another kernel once a rate becomes
    non-zero (`set_plan` names those layers): there within float rounding.

    Args:
        model: a built Keras model, subclassed ones and keras-hub backbones and tasks too.
        rate: a float in [0, 1); ``{layer_name: rate}``; a callable ``layer -> float | None``;
            or `multidrop.linear`.
        where: None (default) for every layer with a dropout-rate field, else any
            ``where=`` of `insert_dropout`; each selected layer must have such a field.
        **options: ``fields`` (only these fields, e.g. ``("recurrent_dropout",)``) and
            ``share_weights``: see `multidrop.options.SetOptions`. Changed layers always
            get their own copy of their weights.

    Example:
        >>> tuned = multidrop.set_dropout(backbone, 0.2)              # every rate 0.2
        >>> rnn = multidrop.set_dropout(model, 0.3, fields="recurrent_dropout")
    """
    opts = build(SetOptions, "set_dropout", rate=rate, where=where, **options)
    the_plan = fields.changes(model, opts)
    new = the_plan.by_layer()
    by_name = {c.layer.name: new[id(c.layer)] for c in the_plan}
    base = _cloner(opts.share_weights)
    inner = {id(c.layer): c for c in the_plan if _inside(c.node)}
    inside = [
        (c.node.owner, c.layer, lambda _, c=c: surgery.clone(c.layer, new[id(c.layer)]))
        for c in inner.values()
    ]
    if not graph.is_graph_model(model):
        top = new.get(id(model))  # a model's own field drives its sublayers (see fields)
        return edit(model, inside=inside) if top is None else surgery.clone(model, top)

    def clone(op):
        inside = {
            c.layer.name
            for c in the_plan
            if c.layer is not op and not _inside(c.node) and _within(c, op, model)
        }
        if not inside:
            return clone_with_config(op, new[id(op)]) if id(op) in new else base(op)
        # A model cloned whole keeps its class when its config holds the layers changed
        # inside it (a keras-hub task holds its backbone's); else it is rebuilt as Functional.
        config, found = fields.nested_config(op.get_config(), {n: by_name[n] for n in inside})
        if found != inside:
            return None
        return clone_with_config(op, {**config, **new.get(id(op), {})})

    touch = [c.node for c in the_plan if c.node is not None and not _inside(c.node)]
    return edit(model, inside=inside, clone=clone, touch=touch)


def _inside(node) -> bool:
    """A call inside a ``call()``: edited by surgery, not by the graph rebuild."""
    return isinstance(node, probe.ProbeNode)


def _holder(model, layer):
    """The layer in ``model`` that holds ``layer`` as an attribute or in a container."""
    for candidate in _keras.all_layers(model):
        if any(child is layer for _, child in _keras.children(candidate)):
            return candidate
    raise ValueError(f"no layer of '{model.name}' holds '{layer.name}'")


def _within(change, op, top) -> bool:
    """The changed layer lies inside graph model ``op`` (``top`` holds every layer)."""
    if not graph.is_graph_model(op):
        return False
    return op is top or op.name in change.qualname.split("/")[:-1]


def _cloner(share_weights: bool):
    return (lambda op: op) if share_weights else clone_operation


def _is_removable(op, all: bool) -> bool:
    dropout = isinstance(op, (*kinds.DROPOUT_LAYERS, MonteCarlo))
    return dropout and (all or is_added_name(op.name))
