"""One graph rebuild for every edit: replay a model's calls on clones, with layers put after
some calls and some calls taken out, then check the result.

The rebuild knows nothing of plans, dropout, Monte Carlo or names: insertion,
removal, a layer's own rates and the Monte Carlo view are all callers of
`rebuild` that pass what to put where (``after``), what to take out (``drop``)
and how to clone an operation (``clone``).

Why it is done this way (the tricky parts):

* **Shared layers stay shared.** Each operation is cloned once, on its first
  call, and every later call uses the same clone, so a layer called twice is
  one layer in the result too. Nested graph models are rebuilt, not cloned,
  so edits inside them are possible, and stay nested.
* **A Sequential is a list of layers.** It is rebuilt from ``model.layers``,
  not from its graph: the graph also holds the op nodes of masks
  (``Embedding(mask_zero=True)``), which are not layers of the list, and
  Keras makes them again when the new Sequential is built.
* **A Sequential with no recorded graph is built as it was.** When a layer's
  shape inference fails (``model.build(shape)`` stops there) or a dict is
  passed through, Keras records no graph and builds each layer on its first
  call. The new Sequential's own build stops at the same place, so each clone
  is built on what its original was built on (``get_build_config``) and each
  inserted layer on its site's output, before the state is copied.
* **State is copied the way Keras saving copies it.** Variables exist only
  once a clone is called in the new graph, so copying waits until the whole
  graph is built. It goes through each layer's own ``save_own_variables`` /
  ``load_own_variables`` and ``save_assets`` / ``load_assets`` (see
  ``_keras.copy_state``): whatever survives a ``.keras`` round trip survives a
  rebuild, LoRA-enabled layers, adapted ``Normalization`` statistics and
  lookup vocabularies included.
* **trainable flags are read before, set after.** With shared weights, setting
  a new container's flag would also set the original layers it holds, so the
  flags are read from the original first, then set top-down on the result.
* **The result is checked** (`_check`), like ``torch.fx``'s ``graph.lint()``:
  each inserted layer called exactly once, the number of calls equal to the
  original's less the dropped plus the inserted, every original layer
  accounted for.

Example:
    >>> from multidrop.rebuild import rebuild
    >>> node = model.get_layer("fc1")._inbound_nodes[0]
    >>> new = rebuild(model, after={node: keras.layers.Dropout(0.2, name="fc1_drop")})
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping

import keras
from keras import tree

from multidrop import _keras, graph, probe, surgery


def rebuild(
    model,
    *,
    after: Mapping | None = None,
    drop=(),
    clone: Callable[[keras.Operation], keras.Operation] | None = None,
) -> keras.Model:
    """Rebuild ``model`` with edits; ``model`` itself is only read.

    Args:
        model: a built Functional or Sequential model.
        after: ``{node: layer}``: call ``layer`` on the one output of ``node`` (a
            Keras node of ``model`` or of a nested model); its result takes the
            output's place downstream. Each layer must be new (never called).
        drop: nodes to take out; each one's output is replaced by its first input.
        clone: ``operation -> operation``, called once per operation: return the
            operation itself to share it, or a new one. A new operation of the
            original's class gets the original's state (weights, assets); one of
            another class (a wrapper) gets none. Plain Functional and Sequential
            models are always rebuilt, never passed to ``clone``; a model of a
            subclass of them (a keras-hub backbone) is passed to ``clone`` whole
            when no node inside it is in ``after`` or ``drop``, and ``clone`` may
            return None to have it rebuilt (as a plain Functional) instead. Default:
            a fresh operation from the original's config, with the state copied.

    Returns:
        The new model: a Sequential for a Sequential, a Functional otherwise, with
        the original's name, input and output names and structure.

    Raises:
        TypeError: an operation cannot be cloned, or its state does not fit its clone;
            the message names the layer and the way out.
    """
    return _Rebuild(dict(after or {}), set(map(id, drop)), clone or clone_operation).run(model)


def edit(model, *, after=None, drop=(), inside=(), clone=None, touch=()) -> keras.Model:
    """Every edit's one entry: a graph is rebuilt (`rebuild`), structure that lives in
    Python is edited by surgery on a copy (`multidrop.surgery.edit`), and each calls the
    other for what it holds: a custom layer in a graph goes to surgery, a graph model
    called inside a ``call()`` (`multidrop.graph.within`) is rebuilt and put in place.

    Args:
        model: a built Keras model.
        after, drop, clone: as for `rebuild`.
        inside: ``(owner, sublayer, factory)`` edits of sublayers inside ``call()`` code:
            the copy of the custom layer or subclassed model that holds ``owner`` has
            ``owner``'s ``sublayer`` replaced by ``factory(its copy)``.
        touch: nodes whose operations ``clone`` changes (it may change any in a graph;
            inside a ``call()``, only the graph models holding these are rebuilt).

    Example:
        >>> new = edit(model, after={node: keras.layers.Dropout(0.2)})
    """
    after, drop, clone = dict(after or {}), list(drop), clone or clone_operation
    inside = [*inside, *_rebuilt_within(model, after, drop, touch, clone)]
    if not graph.is_graph_model(model):
        return surgery.edit(model, inside)
    return rebuild(model, after=after, drop=drop, clone=surgery.cloner(inside, clone))


def _rebuilt_within(model, after: dict, drop: list, touch, clone) -> list:
    """Surgery edits that put rebuilt copies of the graph models called inside a
    ``call()`` within ``model`` in place; their nodes are taken out of ``after`` and
    ``drop``. The nodes of ``model``'s own graph stay: it is the graph being rebuilt."""
    held = {id(layer) for layer in _keras.all_layers(model)}
    groups: dict[int, tuple] = {}
    for node in [*after, *drop, *touch]:
        owner_and_graph = graph.within(node)
        if owner_and_graph is None:
            continue
        owner, nested = owner_and_graph
        if nested is not model and id(owner) in held:
            groups.setdefault(id(nested), owner_and_graph)
    edits = []
    for owner, nested in groups.values():
        nodes = {id(c.node) for c in graph.walk(nested)}
        mine = {n: layer for n, layer in after.items() if id(n) in nodes}
        gone = [n for n in drop if id(n) in nodes]
        for n in mine:
            del after[n]
        drop[:] = [n for n in drop if id(n) not in nodes]

        def rebuilt(_, m=nested, a=mine, d=gone):
            return edit(m, after=a, drop=d, clone=clone)

        edits.append((owner, nested, rebuilt))
    return edits


def clone_operation(op) -> keras.Operation:
    """A new operation like ``op``, from its config (no state yet)."""
    return clone_with_config(op)


def clone_with_config(op, changes: dict | None = None) -> keras.Operation:
    """A new operation of ``op``'s class from its config updated with ``changes``, or a
    TypeError naming the way out. A layer edited by surgery is copied by surgery (its
    config holds its edits; the copy has its state already)."""
    if surgery.made(op):
        return surgery.clone(op, changes)
    try:
        return op.__class__.from_config({**op.get_config(), **(changes or {})})
    except Exception as error:
        raise TypeError(
            f"multidrop cannot clone {type(op).__name__} '{op.name}': "
            f"{type(error).__name__}: {error}. Either give the layer a get_config() "
            "that from_config() accepts and register it with "
            "@keras.saving.register_keras_serializable(), or pass "
            "share_weights=True to reuse the original layer objects."
        ) from error


class _Rebuild:
    """One rebuild of one model tree; holds the clone of every operation."""

    def __init__(self, after: dict, drop: set, clone):
        self.after = {id(node): layer for node, layer in after.items()}
        self.drop = drop
        self.clone = clone
        self.clones: dict[int, keras.Operation] = {}
        self.pairs: list[tuple[keras.Operation, keras.Operation]] = []
        self.dropped_ops: set[int] = set()
        self.whole: set[str] = set()  # names of subclassed graph models cloned whole

    def run(self, model) -> keras.Model:
        before = graph.walk(model)
        flags = {id(layer): layer.trainable for layer in _keras.all_layers(model)}
        new = self.operation(model)
        for old, clone in self.pairs:
            if clone is not old and type(clone) is type(old) and not surgery.made(clone):
                _copy_state(old, clone)
                _keep_names(old, clone)
        self.copy_trainable(model, new, flags)
        self.keep_output_names(model, new)
        self.check(model, before, new)
        return new

    def model(self, model) -> keras.Model:
        if isinstance(model, keras.Sequential):
            return self.sequential(model)
        return self.functional(model)

    def sequential(self, model) -> keras.Sequential:
        node_of = {id(node.operation): node for node in graph.nodes(model)}
        first = _keras.sequential_input(model)
        layers = [] if first is None else [_clone_input(first.output)]
        for layer in model.layers:
            node = node_of[id(layer)]
            if id(node) in self.drop:
                self.dropped_ops.add(id(layer))
                continue
            layers.append(self.operation(layer))
            if id(node) in self.after:
                layers.append(self.after[id(node)])
        new = keras.Sequential(layers, name=model.name, trainable=model.trainable)
        if _keras.sequential_graph(model) is None:
            self.build_list(model, new)
        return new

    def build_list(self, model, new) -> None:
        """Build what the new Sequential's own build did not reach, as in ``model``: a
        clone on what its original was built on, an inserted layer on its site's output."""
        for node in graph.nodes(model):
            built_on = node.operation.get_build_config() or _built_on(node.input_tensors)
            for layer, config in (
                (self.clones.get(id(node.operation)), built_on),
                (self.after.get(id(node)), _built_on(node.outputs)),
            ):
                if layer is not None and not layer.built:
                    layer.build_from_config(config)
        if not new.built:
            new.build_from_config(model.get_build_config())

    def functional(self, model) -> keras.Model:
        inputs = [_clone_input(x).output for x in model.inputs]
        tensors = {id(x): y for x, y in zip(model.inputs, inputs)}
        for node in graph.nodes(model):
            if id(node) in self.drop:
                self.dropped_ops.add(id(node.operation))
                tensors[id(node.outputs[0])] = tensors[id(node.input_tensors[0])]
                continue
            args, kwargs = node.arguments.fill_in(tensors)
            outputs = tree.flatten(self.operation(node.operation)(*args, **kwargs))
            if id(node) in self.after:
                outputs = [self.after[id(node)](outputs[0])]
            tensors.update((id(x), y) for x, y in zip(node.outputs, outputs))
        outputs = [tensors[id(x)] for x in model.outputs]
        return keras.Model(
            inputs=tree.pack_sequence_as(_keras.inputs_struct(model), inputs),
            outputs=tree.pack_sequence_as(_keras.outputs_struct(model), outputs),
            name=model.name,
        )

    def operation(self, op) -> keras.Operation:
        """The clone of ``op``, made on first use so shared layers stay shared."""
        if id(op) not in self.clones:
            new = None
            if not graph.is_graph_model(op) or (not is_plain(op) and not self.edited_inside(op)):
                new = self.clone(op)
            if new is None:
                self.clones[id(op)] = self.model(op)
            else:
                self.clones[id(op)] = new
                self.pairs.append((op, new))
                if graph.is_graph_model(op) or probe.is_structure(op):
                    self.whole.add(op.name)
        return self.clones[id(op)]

    def edited_inside(self, model) -> bool:
        return any(id(c.node) in self.after or id(c.node) in self.drop for c in graph.walk(model))

    def copy_trainable(self, old, new, flags) -> None:
        """Set ``trainable`` as ``flags`` (read from the original) says: a container
        first, since setting its flag sets its whole subtree, then the nested models
        and layers inside, and the sublayers of those layers (``TimeDistributed``'s)."""
        new.trainable = flags[id(old)]
        for op in {id(n.operation): n.operation for n in graph.nodes(old)}.values():
            clone = self.clones.get(id(op))
            if clone is None or not isinstance(op, keras.layers.Layer):
                continue
            if graph.is_graph_model(op) and op.name not in self.whole:
                self.copy_trainable(op, clone, flags)
            elif surgery.made(clone):
                continue  # its flags were copied layer by layer
            elif type(clone) is type(op):
                for layer, inner in zip(_keras.all_layers(op), _keras.all_layers(clone)):
                    inner.trainable = flags[id(layer)]
            else:
                clone.trainable = flags[id(op)]

    def keep_output_names(self, old, new) -> None:
        """An output keeps its name unless the call that made it was dropped (then the
        call now making it names it): a layer put after an output does not rename it."""
        names = getattr(old, "output_names", None)
        if names is None or list(new.output_names) == list(names):
            return
        producers = [_keras.producer(t) for t in graph.graph_of(old).outputs]
        new.output_names = [
            mine if id(op) in self.dropped_ops else name
            for name, mine, op in zip(names, new.output_names, producers)
        ]

    def check(self, model, before: list, new) -> None:
        """The rebuild's own lint: what was asked is there, once, and nothing is lost."""
        before, after = _of_graphs(before, model), _of_graphs(graph.walk(new), new)
        expected = len(before) - len(self.drop) + len(self.after)
        inserted = list(self.after.values())
        problems = []
        if len(after) != expected:
            problems.append(f"{len(after)} calls where {expected} were expected")
        calls = collections.Counter(id(c.operation) for c in after)
        uncalled = [layer.name for layer in inserted if calls[id(layer)] != 1]
        if uncalled:
            problems.append(f"inserted layers not called exactly once: {uncalled}")
        cloned_whole = any(old is model for old, _ in self.pairs)  # nothing inside is cloned
        kept = (
            set()
            if cloned_whole
            else {
                id(c.operation)
                for c in before
                if not graph.is_graph_model(c.operation) and not self.whole.intersection(c.path)
            }
        )
        missing = kept - {id(old) for old, _ in self.pairs} - self.dropped_ops
        if missing:
            problems.append(f"{len(missing)} original operations have no clone")
        if problems:
            raise RuntimeError(
                f"multidrop's rebuild of '{new.name}' is inconsistent ({'; '.join(problems)}). "
                "This is a bug in multidrop: please report it with the model's summary()."
            )


def is_plain(model) -> bool:
    """A model of Keras' own Functional or Sequential class, not of a subclass."""
    return type(model) in (keras.Model, _keras.Functional, keras.Sequential)


def _built_on(tensors) -> dict | None:
    """The build config of a layer called on ``tensors``, if that is one tensor."""
    return {"input_shape": tuple(tensors[0].shape)} if len(tensors) == 1 else None


def _clone_input(tensor) -> keras.layers.InputLayer:
    layer = _keras.producer(tensor)
    return layer.__class__.from_config(layer.get_config())


def _keep_names(old, new) -> None:
    """A custom layer's sublayers keep their names (a clone from config makes new ones)."""
    if isinstance(old, keras.layers.Layer):
        for a, b in zip(_keras.all_layers(old)[1:], _keras.all_layers(new)[1:]):
            b.name = a.name


def _copy_state(old, new) -> None:
    try:
        _keras.copy_state(old, new)
    except Exception as error:
        raise TypeError(
            f"multidrop cloned {type(old).__name__} '{old.name}' from its config, but the "
            f"original's state does not fit the clone ({type(error).__name__}: {error}). Its "
            "get_config() probably misses an argument: fix it, or pass share_weights=True."
        ) from error


def _of_graphs(calls: list, model) -> list:
    """The calls of graph nodes a rebuild of ``model`` makes: not those inside a ``call()``
    (probed, or of another graph model called there): surgery makes and checks them."""
    return [
        c
        for c in calls
        if not isinstance(c.node, probe.ProbeNode)
        and (graph.within(c.node) or (None, model))[1] is model
    ]
