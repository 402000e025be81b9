"""The options of every edit: their names, defaults and validation, written once.

`Options` is what ``insert_dropout`` and ``plan`` take (and ``cross_backend``,
the CLI and the demo pass along); `RemoveOptions` and `SetOptions` are the
smaller sets of ``remove_dropout`` and ``set_dropout``. Each public function
shows its record's fields as its own signature (see `signature_of`), so
``help(multidrop.insert_dropout)`` lists every option with its default.

Example:
    >>> from multidrop.options import Options
    >>> Options(0.2, kind="auto", seed=7).changed()     # what differs from the defaults
    {'rate': 0.2, 'kind': 'auto', 'seed': 7}
    >>> Options(1.5)
    Traceback (most recent call last):
    ValueError: rate must be a float in [0, 1), got 1.5. ...
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Sequence

from multidrop import kinds, select


def check_int(
    value, name: str, *, minimum: int | None = None, none: bool = False, hint: str = ""
) -> None:
    """Raise unless ``value`` is an int (not a bool) of at least ``minimum``, or None if allowed.

    A wrong type is a TypeError, a value below ``minimum`` a ValueError; ``hint`` is
    appended to either message."""
    if none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' * none}, got {value!r}.{hint}")
    if minimum is not None and value < minimum:
        what = "a positive int" if minimum == 1 else f"an int of at least {minimum}"
        raise ValueError(f"{name} must be {what}{' or None' * none}, got {value!r}.{hint}")


@dataclasses.dataclass(frozen=True)
class Options:
    """What ``insert_dropout`` does: where dropout goes, which kind, at what rate.

    Attributes:
        rate: the dropout rate, a float in [0, 1); ``{layer_name: rate}`` (the
            other sites are left alone); a callable ``layer -> float | None``
            (None leaves the site alone); or `multidrop.linear` (rates growing
            with depth).
        where: which sites: ``"activations"`` (standalone activation layers,
            layers with a fused non-linear activation, activation op nodes),
            a layer class or tuple of classes, a list of layer names, a
            callable ``layer -> bool``, or a `multidrop.select` selector.
        kind: ``"dropout"``, ``"spatial"`` (SpatialDropout1D/2D/3D by rank),
            ``"gaussian"``, ``"alpha"``, ``"auto"`` (spatial on feature maps,
            alpha after selu, dropout otherwise), ``"stochastic_depth"`` (the
            whole branch of a sample dropped at once), or a callable
            ``(rate, layer) -> keras.layers.Layer`` that makes a new layer.
        noise_shape: passed to Dropout/AlphaDropout, one entry per axis:
            ``(None, 1, features)`` drops the same features at every position.
        seed: an int makes the masks reproducible; site ``i`` gets ``seed + i``.
        include_outputs: also put dropout after layers that produce a model
            output (the output names are kept on the returned model).
        recursive: also insert inside nested models and inside the ``call()`` of custom
            layers and keras-hub blocks.
        share_weights: share the original's variables instead of copying them
            (training the clone then trains the original too).
        mc: keep the inserted dropout on at inference (Monte Carlo dropout);
            the model then needs ``import multidrop`` to load.
        sample: inputs to read the structure of a ``call()`` with (a subclassed model,
            a custom layer; see `multidrop.probe`): what the model takes, e.g.
            ``x_train[:2]``. Default: random inputs shaped like those it was built on.
    """

    rate: object
    where: object = "activations"
    kind: object = "dropout"
    noise_shape: tuple | None = None
    seed: int | None = None
    include_outputs: bool = False
    recursive: bool = True
    share_weights: bool = False
    mc: bool = False
    sample: object = None

    def __post_init__(self):
        kinds.check_rate(self.rate)
        kinds.check_kind(self.kind)
        select.coerce(self.where)
        check_int(self.seed, "seed", none=True)
        if self.noise_shape is not None:
            if isinstance(self.noise_shape, (str, bytes)) or not isinstance(
                self.noise_shape, Sequence
            ):
                raise TypeError(
                    f"noise_shape must be a tuple such as (None, 1, 64), got {self.noise_shape!r}."
                )
            object.__setattr__(self, "noise_shape", tuple(self.noise_shape))
            if self.kind == "stochastic_depth":
                raise ValueError(
                    "kind='stochastic_depth' sets its own noise_shape, (None, 1, ..., 1), to "
                    "drop each sample's whole branch; drop noise_shape, or use kind='dropout'."
                )
        _check_flags(self, "include_outputs", "recursive", "share_weights", "mc")

    @property
    def selector(self) -> select.Selector:
        return select.coerce(self.where)

    def changed(self) -> dict:
        """The options that differ from their defaults (``rate`` always), by name."""
        return _changed(self, always=("rate",))


@dataclasses.dataclass(frozen=True)
class RemoveOptions:
    """What ``remove_dropout`` removes, and how the rest is kept.

    Attributes:
        all: remove every Dropout-family layer, not only those multidrop added
            (inside a ``call()``, only multidrop's: the user's own are part of its code).
        share_weights: share the model's variables instead of copying them.
        sample: inputs to read a ``call()`` with (see `Options`).
    """

    all: bool = False
    share_weights: bool = False
    sample: object = None

    def __post_init__(self):
        _check_flags(self, "all", "share_weights")


@dataclasses.dataclass(frozen=True)
class SetOptions:
    """What ``set_dropout`` changes: the selected layers' own dropout arguments.

    Attributes:
        rate: the new rate, a float in [0, 1); ``{layer_name: rate}``; a callable
            ``layer -> float | None``; or `multidrop.linear`.
        where: which layers: None for every layer that has a dropout-rate field,
            else any ``where=`` that ``insert_dropout`` takes.
        fields: only these fields (``("recurrent_dropout",)``); None for all of a
            layer's dropout-rate fields.
        share_weights: share the model's variables instead of copying them.
        sample: inputs to read a ``call()`` with (see `Options`).
    """

    rate: object
    where: object = None
    fields: tuple | None = None
    share_weights: bool = False
    sample: object = None

    def __post_init__(self):
        kinds.check_rate(self.rate)
        if self.where is not None:
            select.coerce(self.where)
        if self.fields is not None:
            fields = (self.fields,) if isinstance(self.fields, str) else self.fields
            if (
                not isinstance(fields, Sequence)
                or not fields
                or not all(isinstance(f, str) for f in fields)
            ):
                raise TypeError(
                    f"fields must be a field name or a non-empty list of them, such as "
                    f"fields=('recurrent_dropout',); got {self.fields!r}."
                )
            object.__setattr__(self, "fields", tuple(fields))
        _check_flags(self, "share_weights")

    def changed(self) -> dict:
        return _changed(self, always=("rate",))


def signature_of(record: type, *leading: str):
    """Decorator: give a function the signature ``(leading..., <record's fields>)``.

    The function itself takes ``**options`` and builds the record from them; its
    signature, as ``help()``, IDEs and the API docs show it, lists every field
    with its default. Fields named in the function's own positional parameters
    stay positional; the rest are keyword-only.
    """

    def decorate(function):
        own = inspect.signature(function)
        positional = [p for p in own.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        taken = {p.name for p in positional}
        keyword = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default,
            )
            for f in dataclasses.fields(record)
            if f.name not in taken
        ]
        function.__signature__ = own.replace(parameters=[*positional, *keyword])
        return function

    return decorate


def build(record: type, function: str, **values):
    """``record(**values)``, with an error naming ``function``'s options for a wrong keyword."""
    known = {f.name for f in dataclasses.fields(record)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(
            f"{function}() got unknown option{'s' * (len(unknown) > 1)} "
            f"{', '.join(map(repr, unknown))}; it takes {', '.join(sorted(known))}."
        )
    return record(**values)


def _check_flags(record, *names: str) -> None:
    for name in names:
        value = getattr(record, name)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def _changed(record, always) -> dict:
    def differs(value, default) -> bool:  # ``sample`` may be an array: no ``!=`` on it
        return value is not default and (default is None or bool(value != default))

    return {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(record)
        if f.name in always or differs(getattr(record, f.name), f.default)
    }


__all__ = ["Options", "RemoveOptions", "SetOptions", "build", "check_int", "signature_of"]
