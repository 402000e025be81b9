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

from multidrop import graph, kinds, rewire
from multidrop.layers import MonteCarlo
from multidrop.plan import Plan

MEMORY_BUDGET = 256 * 2**20  # bytes of activations one model call may hold (estimated)
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mc_predict(model, x, samples=30, *, batch_size=None, seed=None, return_samples=False):
    """Predict with dropout on and everything else in inference mode.

    Works on any Functional or Sequential model with Dropout-family layers in
    its graph (nested models included): one built with
    ``multidrop.insert_dropout(..., mc=True)``, with ``mc=False``, or the
    user's own. Dropout inside a custom layer's ``call()`` stays off.
    BatchNormalization uses its moving statistics and no variable of
    ``model`` is written.

    Args:
        model: a Functional or Sequential Keras model with dropout layers.
        x: the inputs, a NumPy-convertible array (or the structure of arrays
            the model takes), batch first.
        samples: how many stochastic predictions to draw per input.
        batch_size: rows per model call, counting each repeat of an input as a
            row. ``None`` picks as many as fit ``MEMORY_BUDGET``.
        seed: an int gives the same samples for the same ``x`` and
            ``batch_size`` on every call; ``None`` draws fresh ones (still
            reproducible after ``keras.utils.set_random_seed``).
        return_samples: also return every sample, stacked on a new first axis.

    Returns:
        ``(mean, std)`` NumPy arrays shaped like one prediction, or
        ``(mean, std, samples)`` with ``samples`` shaped ``(samples, *mean.shape)``.
        A model with several outputs gives the same structure of arrays.

    Example:
        >>> rewired = multidrop.insert_dropout(model, 0.1)
        >>> mean, std = multidrop.mc_predict(rewired, x, samples=50, seed=0)
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}; 30 is a common choice.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}.")

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
        empty = Plan(
            model_name=model.name, sites=(), where="", kind="dropout", note="",
            noise_shape=None, recursive=True, share_weights=True, mc=False,
        )
        rebuild = _MonteCarloRebuild(empty, remove=())
        view = rebuild.run(model)
        if not any(isinstance(layer, MonteCarlo) for layer in view._flatten_layers()):
            raise ValueError(
                f"Model '{model.name}' has no dropout layers in its graph, so every Monte "
                "Carlo sample would be the same. Add some first: "
                "mc_predict(multidrop.insert_dropout(model, 0.1), x)."
            )
        _VIEWS[model] = view, rebuild.dropouts
    return _VIEWS[model]


class _MonteCarloRebuild(rewire._Rebuild):
    """A rebuild that shares every layer except dropout, which becomes always on."""

    def __init__(self, the_plan: Plan, remove):
        super().__init__(the_plan, remove)
        self.dropouts: list[keras.layers.Layer] = []  # the view's own, in graph order

    def operation(self, op):
        inner = op.layer if isinstance(op, MonteCarlo) else op
        if isinstance(inner, kinds.DROPOUT_LAYERS) and id(op) not in self.clones:
            config = {**inner.get_config(), "seed": 0, "name": f"{inner.name}_mc"}
            fresh = inner.__class__.from_config(config)
            self.clones[id(op)] = MonteCarlo(fresh, name=op.name)
            if getattr(fresh, "seed_generator", None) is not None:
                self.dropouts.append(fresh)
        return super().operation(op)


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
