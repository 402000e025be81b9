"""Rebuild a graph model from a plan: dropout in, or multidrop's dropout out.

The rebuild replays the original graph's calls in the order ``graph.nodes``
gives them, on cloned layers (one clone per layer, so shared layers stay
shared), and puts a dropout layer after each planned site. Weights are copied
into fresh variables and ``trainable`` flags are set exactly as they were; the
original model is only read.

Example:
    >>> rewired = multidrop.insert_dropout(model, 0.2)
    >>> rewired = multidrop.insert_dropout(model, {"fc1": 0.5}, where=["fc1"], mc=True)
    >>> original_again = multidrop.remove_dropout(rewired)
"""

from __future__ import annotations

import keras
from keras import tree

from multidrop import graph, kinds
from multidrop.layers import MonteCarlo
from multidrop.plan import Plan, is_added_name, plan


def insert_dropout(
    model,
    rate,
    where="activations",
    *,
    kind="dropout",
    noise_shape=None,
    seed=None,
    include_outputs=False,
    recursive=True,
    share_weights=False,
    mc=False,
) -> keras.Model:
    """Return a clone of ``model`` with dropout layers after the chosen sites.

    ``model`` is never changed. The clone answers bitwise like the original in
    inference mode (``clone(x, training=False)``), keeps every layer name, input
    and output name and structure, weight value, ``trainable`` flag, shared
    layer and nested model, and is not compiled.

    Args:
        model: a built Functional or Sequential Keras 3 model.
        rate: the dropout rate, a float in [0, 1); or ``{layer_name: rate}``
            (the other sites are left alone); or a callable
            ``layer -> float | None`` (None leaves the site alone).
        where: which sites: ``"activations"`` (standalone activation layers,
            layers with a fused non-linear activation, activation op nodes),
            a layer class or tuple of classes, a list of layer names, a
            callable ``layer -> bool``, or a `multidrop.select` selector.
        kind: ``"dropout"``, ``"spatial"`` (SpatialDropout1D/2D/3D by rank),
            ``"gaussian"``, ``"alpha"``, ``"auto"`` (spatial on feature maps,
            alpha after selu, dropout otherwise), or a callable
            ``(rate, layer) -> keras.layers.Layer``.
        noise_shape: passed to Dropout/AlphaDropout, one entry per axis:
            ``(None, 1, features)`` drops the same features at every position.
        seed: an int makes the masks reproducible; site ``i`` gets ``seed + i``.
        include_outputs: also put dropout after layers that produce a model
            output (the output names are kept on the returned model).
        recursive: also insert inside nested Functional and Sequential models.
        share_weights: share the original's variables instead of copying them
            (training the clone then trains the original too).
        mc: keep the inserted dropout on at inference (Monte Carlo dropout);
            the model then needs ``import multidrop`` to load.

    Returns:
        The rewired model: a Sequential for a Sequential, a Functional otherwise.

    Example:
        >>> rewired = multidrop.insert_dropout(model, 0.2)
        >>> rewired.compile("adam", "sparse_categorical_crossentropy")
        >>> rewired.fit(x, y)                # model is untouched
    """
    the_plan = plan(
        model, rate, where, kind=kind, noise_shape=noise_shape, seed=seed,
        include_outputs=include_outputs, recursive=recursive,
        share_weights=share_weights, mc=mc,
    )
    return _Rebuild(the_plan, remove=()).run(model)


def remove_dropout(model, *, all=False) -> keras.Model:
    """Return a clone of ``model`` without the dropout layers multidrop added.

    multidrop's layers are recognised by their names (``<site>_multidrop``),
    so this works after a ``.keras`` save and load too. The model's own
    dropout layers stay unless ``all=True``, which removes every Dropout-family
    layer. ``model`` is never changed.

    Example:
        >>> plain = multidrop.remove_dropout(multidrop.insert_dropout(model, 0.2))
        >>> [l.name for l in plain.layers] == [l.name for l in model.layers]
        True
    """
    calls = graph.walk(model)
    remove = [c for c in calls if _is_removable(c.operation, all)]
    if not remove:
        raise ValueError(
            f"Model '{model.name}' has no "
            + ("Dropout-family layers" if all else "dropout layers added by multidrop")
            + " to remove." + ("" if all else " Pass all=True to remove every Dropout-family layer.")
        )
    empty = Plan(model.name, (), "", "dropout", "", None, True, False, False)
    return _Rebuild(empty, remove=[id(c.node) for c in remove]).run(model)


def _is_removable(op, all: bool) -> bool:
    dropout = isinstance(op, (*kinds.DROPOUT_LAYERS, MonteCarlo))
    return dropout and (all or is_added_name(op.name))


class _Rebuild:
    """One rebuild of one model tree; holds the clone of every operation."""

    def __init__(self, the_plan: Plan, remove):
        self.plan = the_plan
        self.after = {id(site.call.node): site for site in the_plan}
        self.remove = set(remove)
        self.clones: dict[int, keras.Operation] = {}
        self.leaves: list[tuple[keras.Operation, keras.Operation]] = []

    def run(self, model) -> keras.Model:
        # Read before the rebuild: with share_weights, setting a new container's
        # flag also sets the original's layers, which the clone holds.
        flags = {id(layer): layer.trainable for layer in model._flatten_layers()}
        new = self.model(model)
        if not self.plan.share_weights:
            for old, clone in self.leaves:
                _copy_weights(old, clone)
        self.copy_trainable(model, new, flags)
        names = getattr(model, "output_names", None)
        if names is not None and list(new.output_names) != list(names):
            # A dropout after an output renamed it; removing one uncovers the site's own name.
            new.output_names = [
                mine if self.remove and is_added_name(old) else old
                for old, mine in zip(names, new.output_names)
            ]
        return new

    def model(self, model) -> keras.Model:
        if isinstance(model, keras.Sequential):
            return self.sequential(model)
        return self.functional(model)

    def sequential(self, model) -> keras.Sequential:
        layers = [_clone_input(model.inputs[0])]
        for node in graph.nodes(model):
            if id(node) in self.remove:
                continue
            layers.append(self.operation(node.operation))
            if id(node) in self.after:
                layers.append(self.dropout(self.after[id(node)]))
        return keras.Sequential(layers, name=model.name)

    def functional(self, model) -> keras.Model:
        inputs = [_clone_input(x).output for x in model.inputs]
        tensors = {id(x): y for x, y in zip(model.inputs, inputs)}
        for node in graph.nodes(model):
            if id(node) in self.remove:
                tensors[id(node.outputs[0])] = tensors[id(node.input_tensors[0])]
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            outputs = tree.flatten(self.operation(node.operation)(*args, **kwargs))
            if id(node) in self.after:
                outputs = [self.dropout(self.after[id(node)])(outputs[0])]
            tensors.update((id(x), y) for x, y in zip(node.outputs, outputs))
        outputs = [tensors[id(x)] for x in model.outputs]
        return keras.Model(
            inputs=tree.pack_sequence_as(model._inputs_struct, inputs),
            outputs=tree.pack_sequence_as(model._outputs_struct, outputs),
            name=model.name,
        )

    def operation(self, op) -> keras.Operation:
        """The clone of ``op``, made on first use so shared layers stay shared."""
        if id(op) not in self.clones:
            if graph.is_graph_model(op):
                self.clones[id(op)] = self.model(op)
            else:
                clone = op if self.plan.share_weights else _clone_operation(op)
                self.clones[id(op)] = clone
                if isinstance(op, keras.layers.Layer):
                    self.leaves.append((op, clone))
        return self.clones[id(op)]

    def dropout(self, site) -> keras.layers.Layer:
        layer = kinds.make_layer(
            self.plan.kind, site.kind, site.rate, site.call,
            noise_shape=self.plan.noise_shape, seed=site.seed, name=site.name,
        )
        if self.plan.mc:
            layer.name = f"{site.name}_inner"
            return MonteCarlo(layer, name=site.name, dtype=layer.dtype_policy)
        layer.name = site.name
        return layer

    def copy_trainable(self, old, new, flags) -> None:
        """Set ``trainable`` as ``flags`` (read from the original) says: a container
        first, since setting its flag sets its whole subtree, then the nested models
        and layers inside, and the sublayers of those layers (``TimeDistributed``'s)."""
        new.trainable = flags[id(old)]
        for op in {id(n.operation): n.operation for n in graph.nodes(old)}.values():
            if graph.is_graph_model(op):
                self.copy_trainable(op, self.clones[id(op)], flags)
            elif isinstance(op, keras.layers.Layer) and id(op) in self.clones:
                clones = self.clones[id(op)]._flatten_layers()
                for layer, clone in zip(op._flatten_layers(), clones):
                    clone.trainable = flags[id(layer)]


def _clone_input(tensor) -> keras.layers.InputLayer:
    layer = tensor._keras_history.operation
    return layer.__class__.from_config(layer.get_config())


def _clone_operation(op) -> keras.Operation:
    try:
        return op.__class__.from_config(op.get_config())
    except Exception as error:
        raise TypeError(
            f"multidrop cannot clone {type(op).__name__} '{op.name}': "
            f"{type(error).__name__}: {error}. Either give the layer a get_config() "
            "that from_config() accepts and register it with "
            "@keras.saving.register_keras_serializable(), or pass "
            "share_weights=True to reuse the original layer objects."
        ) from error


def _copy_weights(old, new) -> None:
    try:
        new.set_weights(old.get_weights())
    except ValueError as error:
        raise TypeError(
            f"multidrop cloned {type(old).__name__} '{old.name}' from its config, but "
            f"the clone's weights do not match the original's ({error}). Its get_config() "
            "probably misses an argument: fix it, or pass share_weights=True."
        ) from error
