"""Dropout kinds and rates: what each site gets, checked before anything is built.

Example:
    >>> from multidrop import kinds
    >>> kinds.resolve_kind("auto", call)           # for a conv feature map
    'SpatialDropout2D'
    >>> layer = kinds.make_layer("SpatialDropout2D", 0.2, call, noise_shape=None, seed=7, name="x")
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping

import keras

from multidrop import _keras, dropout
from multidrop.graph import Call

KINDS = ("dropout", "spatial", "gaussian", "alpha", "auto", "stochastic_depth")
DROPOUT_LAYERS = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
_SPATIAL = {3: "SpatialDropout1D", 4: "SpatialDropout2D", 5: "SpatialDropout3D"}


def check_rate_value(value, where: str) -> float:
    """Return ``value`` as a float, or raise unless it lies in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(
            f"rate must be a float in [0, 1), got {value!r}{where}. "
            "It is the fraction of units dropped: rate=0.2 drops 20%."
        )
    return float(value)


@dataclasses.dataclass(frozen=True)
class linear:
    """Rates that grow linearly with depth: ``start`` at the first selected site, ``rate``
    at the last (timm's ``drop_path_rate`` rule, with ``start=0``).

    Example:
        >>> multidrop.insert_dropout(model, multidrop.linear(0.2), kind="stochastic_depth",
        ...                          where=multidrop.select.residual_branches())
    """

    rate: float
    start: float = 0.0

    def __post_init__(self):
        check_rate_value(self.rate, " in linear(rate)")
        check_rate_value(self.start, " in linear(..., start)")

    def rates(self, count: int) -> list[float]:
        """The ``count`` rates, first site to last."""
        if count == 1:
            return [self.rate]
        step = (self.rate - self.start) / (count - 1)
        return [self.start + i * step for i in range(count)]


def check_rate(rate) -> None:
    """Validate the ``rate`` argument as a whole (its type, and every fixed value)."""
    if isinstance(rate, linear):
        return
    if isinstance(rate, Mapping):
        if not rate:
            raise ValueError("rate={} names no layer; give {layer_name: rate} pairs.")
        for name, value in rate.items():
            if not isinstance(name, str):
                raise TypeError(f"rate dict keys must be layer names (str), got {name!r}.")
            check_rate_value(value, f" for layer {name!r}")
    elif not callable(rate):
        check_rate_value(rate, "")


def unmatched_rate_names(rate, calls: list[Call]) -> list[str]:
    """The names of a ``{layer_name: rate}`` rate that name none of ``calls``."""
    if not isinstance(rate, Mapping):
        return []
    known = {c.name for c in calls} | {c.qualname for c in calls}
    return [name for name in rate if name not in known]


def resolve_rates(rate, calls: list[Call]) -> list[float | None]:
    """The rate for each of ``calls`` (None leaves a site untouched)."""
    if isinstance(rate, linear):
        return rate.rates(len(calls))
    return [resolve_rate(rate, call) for call in calls]


def resolve_rate(rate, call: Call) -> float | None:
    """The rate for one site, or None when ``rate`` leaves the site untouched."""
    if isinstance(rate, Mapping):
        value = rate.get(call.qualname, rate.get(call.name))
    elif callable(rate):
        value = rate(call.operation)
    else:
        value = rate
    return None if value is None else check_rate_value(value, f" for site {call.qualname!r}")


def check_kind(kind) -> None:
    if isinstance(kind, (type, keras.layers.Layer)):
        what = kind if isinstance(kind, type) else type(kind)
        raise TypeError(
            f"kind={what.__name__}{'()' * (what is not kind)} is a layer "
            f"{'class' if what is kind else 'object'}; kind takes a name such as 'dropout', "
            f"or a callable (rate, layer) -> keras.layers.Layer that makes a new layer per site, "
            f"e.g. kind=lambda rate, layer: keras.layers.{what.__name__}(rate)."
        )
    if callable(kind):
        return
    if kind not in KINDS:
        raise ValueError(
            f"Unknown dropout kind={kind!r}. Valid kinds: "
            f"{', '.join(map(repr, KINDS))}, or a callable (rate, layer) -> keras.layers.Layer."
        )


def resolve_kind(kind, call: Call) -> str:
    """The Keras layer class name a site gets (``custom`` for a callable kind)."""
    if callable(kind):
        return getattr(kind, "__name__", "custom")
    rank = len(call.outputs[0].shape)
    if kind == "auto":
        activation = getattr(call.operation, "activation", None)
        if activation is keras.activations.selu or type(call.operation).__name__ == "Selu":
            return "AlphaDropout"
        conv_like = isinstance(call.operation, _keras.CONV_LAYERS) or rank in (4, 5)
        return _SPATIAL[rank] if conv_like and rank in _SPATIAL else "Dropout"
    if kind == "spatial":
        if rank not in _SPATIAL:
            raise ValueError(
                f"kind='spatial' needs a feature map of rank 3, 4 or 5 (batch "
                f"included), but site {call.qualname!r} has shape "
                f"{call.outputs[0].shape}. Use kind='dropout' or kind='auto'."
            )
        return _SPATIAL[rank]
    names = {"gaussian": "GaussianDropout", "alpha": "AlphaDropout"}
    return names.get(kind, "Dropout")  # stochastic depth is a Dropout with a per-sample mask


def sample_noise_shape(call: Call) -> tuple:
    """The noise_shape that drops a sample's whole tensor at once: ``(None, 1, ..., 1)``."""
    return (None,) + (1,) * (len(call.outputs[0].shape) - 1)


def check_noise_shape(noise_shape, kind_name: str, call: Call) -> None:
    """``noise_shape`` must match the site's rank, and its kind must take one."""
    if noise_shape is None:
        return
    shape = call.outputs[0].shape
    if kind_name not in ("Dropout", "AlphaDropout"):
        raise ValueError(
            f"noise_shape is not supported by {kind_name} (site {call.qualname!r}); "
            "use kind='dropout' or kind='alpha', or drop noise_shape."
        )
    if len(noise_shape) != len(shape):
        raise ValueError(
            f"noise_shape={tuple(noise_shape)} has rank {len(noise_shape)}, but site "
            f"{call.qualname!r} has shape {shape} (rank {len(shape)}). Give one entry "
            f"per axis, batch included: e.g. {(None,) + (1,) * (len(shape) - 2) + shape[-1:]} "
            "drops the same features at every position."
        )
    bad = [axis for axis, (n, dim) in enumerate(zip(noise_shape, shape)) if not _broadcasts(n, dim)]
    if bad:
        raise ValueError(
            f"noise_shape={tuple(noise_shape)} does not fit site {call.qualname!r} of shape "
            f"{shape} at axis {bad[0]}: each entry must be None, 1, or the size of that axis."
        )


def _broadcasts(n, dim) -> bool:
    """A noise_shape entry ``n`` fits an axis of size ``dim`` (None when unknown)."""
    if n is None:
        return True
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        return False
    return n == 1 or dim is None or n == dim


def make_layer(
    kind, kind_name: str, rate: float, call: Call, *, noise_shape, seed, name
) -> keras.layers.Layer:
    """Construct the dropout layer for one site."""
    if callable(kind):
        layer = kind(rate, call.operation)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"kind callable must return a keras.layers.Layer, got "
                f"{type(layer).__name__} for site {call.qualname!r}."
            )
        if _keras.is_called(layer):  # already called: the model's own, or another site's
            raise TypeError(
                f"kind callable returned {type(layer).__name__} '{layer.name}' for site "
                f"{call.qualname!r}, a layer already in use; return a new layer for each site."
            )
        return layer
    cls = getattr(keras.layers, kind_name)
    if kind_name == "Dropout":
        cls = dropout.Dropout  # keras' Dropout with a cheaper training path, saved as keras' own
    # The site's dtype, not the global policy: a mixed-precision model keeps its output dtypes.
    options = {"seed": seed, "name": name, "dtype": call.outputs[0].dtype}
    if kind_name in ("Dropout", "AlphaDropout"):
        options["noise_shape"] = noise_shape
    if kind_name in ("SpatialDropout2D", "SpatialDropout3D"):
        options["data_format"] = getattr(call.operation, "data_format", None)
    return cls(rate, **options)
