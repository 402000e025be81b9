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
    >>> entropy = multidrop.predictive_entropy(mean)     # high = uncertain
    >>> x_test[entropy.argsort()[-10:]]                  # the ten least certain inputs
"""

from __future__ import annotations

import random
import weakref

import keras
import numpy as np
from keras import tree

from multidrop import _keras, fields, graph, kinds
from multidrop.layers import MonteCarlo
from multidrop.options import check_int
from multidrop.rebuild import clone_operation, rebuild

MEMORY_BUDGET = 256 * 2**20  # bytes of activations one model call may hold (estimated)
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mc_predict(model, x, samples=30, *, batch_size=None, seed=None, return_samples=False):
    """Predict with dropout on and everything else in inference mode.

    Works on any Functional or Sequential model with dropout in its graph
    (nested models included): Dropout-family layers (one built with
    ``multidrop.insert_dropout(..., mc=True)``, with ``mc=False``, or the
    user's own) and layers whose own dropout is set (``MultiHeadAttention``,
    RNNs, keras-hub blocks: see `multidrop.set_dropout`), which are called with
    ``training=True`` unless they hold a BatchNormalization. Dropout inside a
    custom layer's ``call()`` that has no dropout-rate field stays off.
    BatchNormalization uses its moving statistics and no variable of ``model``
    is written (the layers with their own dropout are sampled from copies).

    Args:
        model: a Functional or Sequential Keras model with dropout layers.
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

    view, dropouts = _mc_view(model)
    inputs = tree.map_structure(np.asarray, x)
    n = len(tree.flatten(inputs)[0])
    if n == 0:
        raise ValueError("x has no rows; pass at least one input, batch first.")
    rows = n if _mask_spans_batch(dropouts) else batch_size or _rows_within_budget(view)
    _reseed(dropouts, random.randint(0, 2**30) if seed is None else seed)

    # Row r of the repeated batch is input r % n in sample r // n. Every call gets the
    # same number of rows (the last one runs past the end, and its extra rows are
    # dropped) so that JAX and TensorFlow compile the model once.
    total = n * samples
    rows = min(rows, total)
    chunks = [
        view.predict_on_batch(tree.map_structure(lambda a: a[np.arange(i, i + rows) % n], inputs))
        for i in range(0, total, rows)
    ]
    drawn = tree.map_structure(
        lambda *parts: np.concatenate(parts)[:total].reshape(samples, n, *parts[0].shape[1:]),
        *chunks,
    )
    mean = tree.map_structure(lambda s: s.mean(axis=0), drawn)
    std = tree.map_structure(lambda s: s.std(axis=0), drawn)
    return (mean, std, drawn) if return_samples else (mean, std)


def predictive_entropy(mean_probs, axis=-1):
    """Entropy (in nats) of averaged class probabilities: 0 when certain, log(k) at most.

    Args:
        mean_probs: class probabilities, e.g. the ``mean`` of `mc_predict` on a
            model that ends in a softmax.
        axis: the class axis.

    Example:
        >>> mean, _ = multidrop.mc_predict(model, x)
        >>> multidrop.predictive_entropy(mean).argmax()      # the least certain input
    """
    p = np.asarray(mean_probs, dtype="float64")
    if p.size == 0 or np.any(p < 0) or not np.allclose(p.sum(axis=axis), 1, atol=1e-3):
        raise ValueError(
            "predictive_entropy needs probabilities that sum to 1 along axis "
            f"{axis}; got values in [{p.min() if p.size else 'empty'}, "
            f"{p.max() if p.size else 'empty'}]. If the model outputs logits, "
            "apply keras.ops.softmax (or end the model in a softmax) first."
        )
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=axis)


def _mc_view(model) -> tuple[keras.Model, list]:
    """``model`` with every Dropout-family layer always on and all other layers
    shared, and the view's own (fresh) dropout layers. Built once per model.

    The dropout layers are copies, so drawing samples never touches ``model``'s
    RNG state.
    """
    graph.check_model(model)
    if model not in _VIEWS:
        dropouts: list[keras.layers.Layer] = []  # the view's own, in graph order
        view = rebuild(model, clone=lambda op: _always_on(op, dropouts))
        if not dropouts and not any(
            isinstance(layer, MonteCarlo) for layer in _keras.all_layers(view)
        ):
            raise ValueError(
                f"Model '{model.name}' has no dropout layers in its graph, so every Monte "
                "Carlo sample would be the same. Add some first: "
                "mc_predict(multidrop.insert_dropout(model, 0.1), x)."
            )
        _VIEWS[model] = view, dropouts
    return _VIEWS[model]


def _always_on(op, dropouts: list):
    """How the MC view calls ``op``: a fresh always-on copy of a dropout layer, or of
    a layer whose own dropout is set (``MultiHeadAttention(dropout=0.1)``, an LSTM's,
    a keras-hub block's) unless it holds a BatchNormalization; None for a graph model
    (rebuilt, to reach the dropout inside); every other operation itself, shared.

    The copies have their own RNG state, recorded in ``dropouts`` for reseeding, so
    sampling never writes ``model``'s."""
    if graph.is_graph_model(op):
        return None
    inner = op.layer if isinstance(op, MonteCarlo) else op
    if isinstance(inner, kinds.DROPOUT_LAYERS):
        config = {**inner.get_config(), "seed": 0, "name": f"{inner.name}_mc"}
        fresh = inner.__class__.from_config(config)
    elif _has_own_dropout(op):
        fresh = clone_operation(op)
        fresh.build_from_config(op.get_build_config())
        _keras.copy_state(op, fresh)
    else:
        return op
    dropouts += [
        layer for layer in _keras.all_layers(fresh)
        if isinstance(layer, kinds.DROPOUT_LAYERS) and getattr(layer, "seed_generator", None)
    ]
    return MonteCarlo(fresh, name=op.name)


def _has_own_dropout(op) -> bool:
    return isinstance(op, keras.layers.Layer) and any(fields.rate_fields(op).values()) and not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in _keras.all_layers(op)
    )


def _reseed(dropouts, seed: int) -> None:
    """Give dropout layer ``i`` the RNG state ``[seed + i, 0]``."""
    for i, layer in enumerate(dropouts):
        state = layer.seed_generator.state
        state.assign(np.array([seed + i, 0], dtype=state.dtype))


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
