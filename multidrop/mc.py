"""Monte Carlo dropout: many stochastic predictions, read as a mean and a spread.

The usual recipe, ``model(x, training=True)``, also puts BatchNormalization in
training mode: it normalizes with the batch's own statistics and, in ``fit``,
moves its running averages. `mc_predict` instead runs an *MC view* of the
model: the same layers and weights, with each Dropout-family layer replaced by
an always-on copy (`multidrop.layers.MonteCarlo`), called in inference mode.
Dropout is random, everything else is exactly as in ``model.predict``, and
nothing in ``model`` changes.

Samples are drawn in a few large calls rather than one call per sample: the
batch is repeated ``samples`` times and cut into calls that fit a memory budget.

Example:
    >>> mean, std = multidrop.mc_predict(model, x_test, samples=30, seed=0)
    >>> entropy = multidrop.predictive_entropy(mean)     # high = uncertain (multidrop.uncertainty)
    >>> x_test[entropy.argsort()[-10:]]                  # the ten least certain inputs
"""

from __future__ import annotations

import dataclasses
import random
import weakref

import keras
import numpy as np
from keras import tree

from multidrop import _keras, fields, graph, kinds, probe
from multidrop.layers import MonteCarlo
from multidrop.options import check_int
from multidrop.rebuild import clone_operation, edit

MEMORY_BUDGET = 256 * 2**20  # bytes of activations one model call may hold (estimated)
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mc_predict(
    model,
    x,
    samples=30,
    *,
    batch_size=None,
    seed=None,
    return_samples=False,
    cache=True,
    consistent=False,
):
    """Predict with dropout on and everything else in inference mode.

    Works on any built model with dropout in it: Functional, Sequential and
    subclassed, nested models and the ``call()`` of custom layers included
    (a probe call finds Dropout sublayers there): Dropout-family layers (one built with
    ``multidrop.insert_dropout(..., mc=True)``, with ``mc=False``, or the
    user's own) and layers whose own dropout is set (``MultiHeadAttention``,
    RNNs, keras-hub blocks: see `multidrop.set_dropout`), which are called with
    ``training=True`` unless they hold a BatchNormalization.
    BatchNormalization uses its moving statistics and no variable of ``model``
    is written (the layers with their own dropout are sampled from copies).

    Args:
        model: a built Keras model with dropout layers.
        x: the inputs, a NumPy-convertible array (or the structure of arrays
            the model takes), batch first.
        samples: how many stochastic predictions to draw per input.
        batch_size: rows per model call, counting each repeat of an input as a
            row. ``None`` picks as many as fit ``MEMORY_BUDGET``.
        seed: an int gives the same samples for the same ``x`` and
            ``batch_size`` on every call; ``None`` draws fresh ones (still
            reproducible after ``keras.utils.set_random_seed``). Dropout built
            into a layer without a seed of its own (``MultiHeadAttention(dropout=0.1)``)
            draws from the backend's global RNG: ``keras.utils.set_random_seed``
            makes it reproducible, ``seed`` does not.
        return_samples: also return every sample, stacked on a new first axis.
        cache: run the deterministic trunk (every call not downstream of a
            dropout) once per input, and only the stochastic rest ``samples``
            times. The samples are the same as with ``cache=False``.
        consistent: sample *k* uses the same dropout masks for every input, so
            each sample is one network of the ensemble (what BALD and active
            learning assume). Needs standalone dropout layers: built-in dropout
            inside a layer cannot share its masks across inputs.

    Returns:
        ``(mean, std)`` NumPy arrays shaped like one prediction, or
        ``(mean, std, samples)`` with ``samples`` shaped ``(samples, *mean.shape)``.
        A model with several outputs gives the same structure of arrays.

    Example:
        >>> rewired = multidrop.insert_dropout(model, 0.1)
        >>> mean, std = multidrop.mc_predict(rewired, x, samples=50, seed=0)
    """
    check_int(samples, "samples", minimum=1, hint=" 30 is a common choice.")
    check_int(batch_size, "batch_size", minimum=1, none=True)
    check_int(seed, "seed", none=True)

    view = _mc_view(model, consistent)
    inputs = tree.map_structure(np.asarray, x)
    n = len(tree.flatten(inputs)[0])
    if n == 0:
        raise ValueError("x has no rows; pass at least one input, batch first.")
    seed = random.randint(0, 2**30) if seed is None else seed
    if cache and view.head is not None:
        inputs = _in_chunks(view.trunk, inputs, n, batch_size or _rows_within_budget(view.trunk))
        runner = view.head
    else:
        runner = view.model
    if consistent or _mask_spans_batch(view.dropouts):
        rows = n  # one sample of every input per call: a mask spans the batch
    else:
        rows = batch_size or _rows_within_budget(runner)
    _reseed(view.dropouts, seed)

    # Row r of the repeated batch is input r % n in sample r // n. Every call gets the
    # same number of rows (the last one runs past the end, and its extra rows are
    # dropped) so that JAX and TensorFlow compile the model once.
    total = n * samples
    rows = min(rows, total)
    chunks = []
    for k, i in enumerate(range(0, total, rows)):
        if consistent:
            _reseed(view.dropouts, seed, count=k)
        chunks.append(runner.predict_on_batch(_rows(inputs, i, rows, n)))
    drawn = tree.map_structure(
        lambda *parts: np.concatenate(parts)[:total].reshape(samples, n, *parts[0].shape[1:]),
        *chunks,
    )
    mean = tree.map_structure(lambda s: s.mean(axis=0), drawn)
    std = tree.map_structure(lambda s: s.std(axis=0), drawn)
    return (mean, std, drawn) if return_samples else (mean, std)


def _in_chunks(model, inputs, n: int, rows: int):
    """``model.predict_on_batch(inputs)`` for the ``n`` inputs, in calls of ``min(rows, n)``
    rows each (the last one wraps around, and its extra rows are dropped) so that JAX and
    TensorFlow compile ``model`` once, not once more for a shorter last call."""
    rows = min(rows, n)
    parts = [model.predict_on_batch(_rows(inputs, i, rows, n)) for i in range(0, n, rows)]
    return tree.map_structure(lambda *p: np.concatenate(p)[:n], *parts)


def _rows(inputs, start: int, rows: int, n: int):
    """Rows ``start`` to ``start + rows - 1`` of the ``n`` inputs repeated without end:
    row ``r`` is input ``r % n``."""
    return tree.map_structure(lambda a: a[np.arange(start, start + rows) % n], inputs)


@dataclasses.dataclass(frozen=True)
class _View:
    """The MC view of a model, and its split into a deterministic trunk and a stochastic head.

    Attributes:
        model: the whole view: every dropout always on, everything else shared.
        dropouts: the view's own dropout layers, in graph order (for reseeding).
        trunk: the calls no dropout reaches, from the inputs to ``head``'s inputs.
        head: the rest, from the tensors where dropout begins to the outputs; None
            when dropout begins at the inputs, so nothing is worth caching.
    """

    model: keras.Model
    dropouts: list
    trunk: keras.Model | None
    head: keras.Model | None


def _mc_view(model, consistent: bool = False) -> _View:
    """The MC view of ``model``, built once per model (and mode).

    The dropout layers are copies, so drawing samples never touches ``model``'s
    RNG state.
    """
    graph.check_model(model)
    views = _VIEWS.setdefault(model, {})
    if consistent not in views:
        dropouts: list[keras.layers.Layer] = []  # the view's own, in graph order
        sampled = [
            c
            for c in graph.walk(model)
            if not probe.is_structure(c.operation) and _sampled(c.operation)
        ]
        inside = [  # dropout inside a call(): replaced in a copy of the layer around it
            (c.node.owner, c.operation, lambda _, c=c: _always_on(c, dropouts, consistent))
            for c in sampled
            if isinstance(c.node, probe.ProbeNode)
        ]
        touch = [c.node for c in sampled if not isinstance(c.node, probe.ProbeNode)]
        view = edit(
            model,
            inside=inside,
            clone=lambda op: _always_on(op, dropouts, consistent),
            touch=touch,
        )
        if not any(isinstance(layer, MonteCarlo) for layer in _keras.all_layers(view)):
            raise ValueError(
                f"Model '{model.name}' has no dropout layers, so every Monte "
                "Carlo sample would be the same. Add some first: "
                "mc_predict(multidrop.insert_dropout(model, 0.1), x)."
            )
        views[consistent] = _View(view, dropouts, *_split(view))
    return views[consistent]


def _split(view) -> tuple:
    """``(trunk, head)``: the view cut where dropout begins (see `_View`). A subclassed
    model is not cut: the probe sees the order of its calls, not which tensors each
    later call reads, so it cannot prove what precedes every dropout."""
    if not graph.is_graph_model(view):
        return None, None
    whole = graph.graph_of(view)
    if not isinstance(whole, _keras.Functional):
        return None, None
    random_ids: set[int] = set()
    frontier: dict[int, object] = {}
    for node in graph.nodes(view):
        op = node.operation
        holds_dropout = isinstance(op, keras.layers.Layer) and any(
            isinstance(layer, MonteCarlo) for layer in _keras.all_layers(op)
        )
        stochastic = holds_dropout or any(id(t) in random_ids for t in node.input_tensors)
        if stochastic:
            random_ids.update(id(t) for t in node.outputs)
            frontier.update((id(t), t) for t in node.input_tensors if id(t) not in random_ids)
    frontier.update((id(t), t) for t in whole.outputs if id(t) not in random_ids)
    cut = list(frontier.values())
    if {id(t) for t in cut} <= {id(t) for t in whole.inputs}:
        return None, None
    inputs = tree.pack_sequence_as(_keras.inputs_struct(whole), list(whole.inputs))
    outputs = tree.pack_sequence_as(_keras.outputs_struct(whole), list(whole.outputs))
    cut = cut[0] if len(cut) == 1 else cut
    return keras.Model(inputs, cut), keras.Model(cut, outputs)


def _sampled(op) -> bool:
    """True for what the MC view samples: a dropout layer, or a layer whose own dropout
    is set (``MultiHeadAttention(dropout=0.1)``, an LSTM's, a keras-hub block's) and
    that holds no BatchNormalization."""
    inner = op.layer if isinstance(op, MonteCarlo) else op
    return isinstance(inner, kinds.DROPOUT_LAYERS) or _has_own_dropout(op)


def _always_on(op_or_call, dropouts: list, consistent: bool):
    """How the MC view calls an operation (or the layer of a call inside a ``call()``):
    a fresh always-on copy of what `_sampled` picks; None for a graph model (rebuilt,
    to reach the dropout inside); every other operation itself, shared.

    The copies have their own RNG state, recorded in ``dropouts`` for reseeding, so
    sampling never writes ``model``'s."""
    call = op_or_call if isinstance(op_or_call, graph.Call) else None
    op = op_or_call if call is None else call.operation
    if graph.is_graph_model(op):
        return None
    inner = op.layer if isinstance(op, MonteCarlo) else op
    if isinstance(inner, kinds.DROPOUT_LAYERS):
        config = {**inner.get_config(), "seed": 0, "name": f"{inner.name}_mc"}
        if consistent:
            rank = len(call.outputs[0].shape) if call else _keras.output_rank(op)
            config["noise_shape"] = _shared_across_batch(inner, op, rank)
        fresh = inner.__class__.from_config(config)
    elif _has_own_dropout(op):
        if consistent:
            raise ValueError(
                f"consistent=True needs standalone dropout layers, but {type(op).__name__} "
                f"'{op.name}' has dropout built in, which draws a mask per input. Pass "
                "consistent=False, or set its rate to 0 with multidrop.set_dropout and insert "
                "dropout after it with multidrop.insert_dropout."
            )
        fresh = clone_operation(op)
        fresh.build_from_config(op.get_build_config())
        _keras.copy_state(op, fresh)
    else:
        return op
    dropouts += [
        layer
        for layer in _keras.all_layers(fresh)
        if isinstance(layer, kinds.DROPOUT_LAYERS) and getattr(layer, "seed_generator", None)
    ]
    return MonteCarlo(fresh, name=op.name)


def _has_own_dropout(op) -> bool:
    return (
        isinstance(op, keras.layers.Layer)
        and any(fields.rate_fields(op).values())
        and not any(
            isinstance(layer, keras.layers.BatchNormalization) for layer in _keras.all_layers(op)
        )
    )


def _shared_across_batch(inner, op, rank: int) -> tuple:
    """A noise_shape with 1 on the batch axis: one mask for every input of a call."""
    if "noise_shape" not in inner.get_config():
        raise ValueError(
            f"consistent=True cannot share the masks of {type(inner).__name__} '{op.name}' "
            "across inputs; use kind='dropout' for the layers you sample, or consistent=False."
        )
    shape = inner.noise_shape or (None,) * rank
    return (1, *shape[1:])


def _reseed(dropouts, seed: int, count: int = 0) -> None:
    """Give dropout layer ``i`` the RNG state ``[seed + i, count]``."""
    for i, layer in enumerate(dropouts):
        state = layer.seed_generator.state
        state.assign(np.array([seed + i, count], dtype=state.dtype))


def _mask_spans_batch(dropouts) -> bool:
    """True when some dropout shares one mask across the batch (``noise_shape[0] == 1``):
    then each sample needs a call of its own."""
    return any((getattr(layer, "noise_shape", None) or (None,))[0] == 1 for layer in dropouts)


def _rows_within_budget(view) -> int:
    """Rows per call such that all layer outputs together, at 4 bytes a number, stay
    under ``MEMORY_BUDGET`` (unknown dimensions count as 1)."""
    per_row = 4 * sum(
        np.prod([d or 1 for d in t.shape[1:]]) for call in graph.walk(view) for t in call.outputs
    )
    return max(1, int(MEMORY_BUDGET // max(per_row, 1)))
