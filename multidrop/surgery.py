"""Surgery on a copy: edit structure that lives in Python by replacing sublayers.

A graph is edited by the rebuild (`multidrop.rebuild`). A subclassed model, a
custom layer or a keras-hub backbone whose blocks add their residuals in
``call()`` has no graph to replay: its structure is its code. Surgery edits it
the way module surgery edits a PyTorch model (Composer's ``replace_module_classes``,
Baal's ``patch_module``), but on a copy:

1. **Copy** the object by Keras' own recipe, ``from_config(get_config())`` on its
   class, built by the call the probe saw it make (else by ``build_from_config``),
   then copy every weight and state by path the way a ``.keras`` file restores them
   (``save_own_variables``/``load_own_variables``, assets too), so adapted
   preprocessing state and LoRA survive; names and ``trainable`` flags are copied
   layer by layer. A class whose config does not give it back is refused with what
   to fix (a ``get_config`` that returns every ``__init__`` argument). Nothing else
   is tried: a deep copy would share or duplicate backend state Keras does not
   expect, and pickling is no more faithful than the config.
2. **Replace** chosen sublayers of the copy: wrap one in `multidrop.layers.Then`
   ("the sublayer, then a dropout"), swap one for a reconfigured or always-on
   copy, or unwrap a ``Then`` again. The copy is already built, and Keras locks a
   built layer against *new* sublayers; a replacement keeps the count, and is
   made through Keras' own tracker (`multidrop._keras.replace_sublayer`).
3. **Record** each edit as (path, what), in order, on the copy, whose class becomes
   a subclass of the original's made by `edited_class` (same name; ``isinstance``
   holds). Keras saves that subclass under the registered name
   ``multidrop>Edited``, so a saved copy loads back *with* its edits (after
   ``import multidrop``, with your classes registered as Keras requires for any
   subclassed model): `Edited.from_config` makes the original class from its own
   config, builds it, replays the edits, and the weights then load by path. A file
   that silently loses an edit is never written.
4. **Check** the result: each recorded path leads to the layer put there.

Example:
    >>> from multidrop import surgery
    >>> edited = surgery.edit(model, [(block, block.ffn, lambda ffn: Then(ffn, dropout))])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras

from multidrop import _keras, probe
from multidrop.layers import Then

EDITED = "multidrop>Edited"
_CLASSES: dict[type, type] = {}

Edit = tuple  # (owner, sublayer, factory): both of the original; factory(copy's sublayer) -> layer


def edit(unit, edits: Sequence[Edit]) -> keras.layers.Layer:
    """A copy of ``unit`` (a layer or model) with sublayers replaced; ``unit`` is only read.

    Args:
        unit: a built layer or model that holds every ``owner`` of ``edits``.
        edits: ``(owner, sublayer, factory)``: in the copy, ``owner``'s ``sublayer``
            becomes ``factory(sublayer's copy)``.

    Returns:
        The copy, of ``unit``'s class (or `edited_class` of it when edits remain).
    """
    copy = clone(unit)
    counterpart = dict(zip(map(id, _keras.all_layers(unit)), _keras.all_layers(copy)))
    paths = _paths(copy)
    records = list(copy.__dict__.get("_multidrop_edits", ()))
    jobs = [(counterpart[id(owner)], counterpart[id(old)], make) for owner, old, make in edits]
    jobs.sort(key=lambda job: -len(paths[id(job[1])]))  # inner edits first, as a load replays
    for owner, old, make in jobs:
        path = paths[id(old)]
        if _resolve(copy, path) is not old:
            raise RuntimeError(f"multidrop's surgery on '{unit.name}' lost its way to {old.name}")
        new = make(old)
        _keras.replace_sublayer(owner, old, new)
        records = _recorded(records, path, old, new)
    _mark(copy, records)
    probe.share_sample(unit, copy)
    return copy


def clone(unit, changes: dict | None = None) -> keras.layers.Layer:
    """``unit`` copied by Keras' own recipe, ``from_config(get_config())`` on its class
    (with ``changes`` in the config; an edited copy's edits replayed), then its state
    copied as a ``.keras`` file copies it; names and ``trainable`` flags layer by layer.
    The copy is built by a call on what the probe saw ``unit`` called with, else from
    its build config, as a load builds it."""
    call = probe.call_of(unit)
    base = getattr(type(unit), "_multidrop_base", type(unit))
    try:
        config = unit.get_config()
        edits = config.pop("edits", [])
        if made(unit):
            config = config["base"]["config"]
        copy = base.from_config({**config, **(changes or {})})
        if call is None:
            if not copy.built:  # keras-hub's blocks can build themselves from their config
                copy.build_from_config(unit.get_build_config())
        else:  # before the edits: keras-hub's blocks make their sublayers in build()
            copy(*call.args, **{**call.kwargs, **_inference(copy)})
        _replay(copy, edits)
    except Exception as error:
        raise _not_copyable(unit, error) from error
    old, new = _keras.all_layers(unit), _keras.all_layers(copy)
    # By class name: multidrop.Dropout comes back as the keras.layers.Dropout it is saved as.
    if not copy.built or [type(x).__name__ for x in old] != [type(x).__name__ for x in new]:
        what = "is not built" if not copy.built else "holds other sublayers than the original"
        raise _not_copyable(unit, f"the copy {what}")
    try:
        _keras.copy_state(unit, copy)
    except Exception as error:
        raise TypeError(
            f"the state of {type(unit).__name__} '{unit.name}' does not fit its copy "
            f"({type(error).__name__}: {error}). Its get_config() probably misses an argument."
        ) from error
    for a, b in zip(old, new):  # top-down: a container's flag first, then its sublayers'
        b.name = a.name
        b.trainable = a.trainable
    return copy


def _replay(obj, edits: list) -> None:
    """Make the ``edits`` (records of `edit`) on ``obj``, in order, and mark it: how both a
    copy and a load make an edited object."""
    for record in edits:
        owner, old = _owner(obj, record["path"])
        if "then" in record:
            new = Then(old, keras.saving.deserialize_keras_object(record["then"]))
        else:
            new = keras.saving.deserialize_keras_object(record["layer"])
        _keras.replace_sublayer(owner, old, new)
    _mark(obj, edits)


def made(layer) -> bool:
    """True for a copy that surgery made (its state is copied already)."""
    return "_multidrop_edits" in layer.__dict__


def check_copyable(unit) -> None:
    """Raise the error `clone` would, without building or copying anything: ``unit`` must
    come back from its config."""
    base = getattr(type(unit), "_multidrop_base", type(unit))
    try:
        config = unit.get_config()
        base.from_config(config["base"]["config"] if made(unit) else config)
    except Exception as error:
        raise _not_copyable(unit, error) from error


def _not_copyable(unit, error) -> TypeError:
    cause = f"{type(error).__name__}: {error}" if isinstance(error, Exception) else error
    return TypeError(
        f"multidrop copies {type(unit).__name__} '{unit.name}' as Keras does, "
        f"from_config(get_config()), and that failed ({cause}). Give it a get_config() that "
        "returns every __init__ argument (and register its class with "
        "@keras.saving.register_keras_serializable() to save it)."
    )


def _inference(layer) -> dict:
    return {"training": False} if _keras.takes_training(layer) else {}


def _recorded(records: list, path: list, old, new) -> list:
    """``records`` with the replacement of ``old`` at ``path`` by ``new`` added."""
    if isinstance(old, Then) and new is old.layer:  # a Then taken out again
        return [r for r in records if not (r["path"] == path and "then" in r)]
    if isinstance(new, Then) and new.layer is old:
        return [*records, {"path": path, "then": keras.saving.serialize_keras_object(new.after)}]
    return [*records, {"path": path, "layer": keras.saving.serialize_keras_object(new)}]


def _mark(copy, records: list) -> None:
    base = getattr(type(copy), "_multidrop_base", type(copy))
    copy.__class__ = edited_class(base) if records else base
    copy.__dict__["_multidrop_edits"] = records  # past Keras' tracking: plain JSON


def edited_class(base: type) -> type:
    """The subclass of ``base`` that edited copies have: named as ``base``, saved as
    `EDITED` with the base's config and the edits, so that a load replays them."""
    if base not in _CLASSES:

        def get_config(self):
            return {
                "base": {
                    "module": base.__module__,
                    "class_name": base.__name__,
                    "registered_name": _keras.registered_name(base),
                    "config": base.get_config(self),
                },
                "build_config": self.get_build_config(),
                "edits": self.__dict__["_multidrop_edits"],
            }

        namespace = {
            "get_config": get_config,
            "_multidrop_base": base,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        _CLASSES[base] = type(base.__name__, (base,), namespace)
        _keras.save_under(_CLASSES[base], EDITED)
    return _CLASSES[base]


@keras.saving.register_keras_serializable(package="multidrop", name="Edited")
class Edited:
    """Loads what `edited_class` saved: the base object from its config, built, with the
    edits replayed in order; its weights then load by path as for any layer."""

    def get_config(self):  # Keras registers only classes with one; instances never exist
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        obj = keras.saving.deserialize_keras_object(config["base"])
        if config.get("build_config") and not obj.built:  # as a load builds it; then edits
            obj.build_from_config(config["build_config"])
        _replay(obj, config["edits"])
        return obj


def cloner(edits: Sequence[Edit], base: Callable) -> Callable:
    """A ``clone`` for `multidrop.rebuild.rebuild`: an operation that holds an owner of
    ``edits`` is copied by `edit`, with the edits inside it; any other by ``base``."""

    def clone_op(op):
        holds = edits and isinstance(op, keras.layers.Layer)
        inside = {id(layer) for layer in _keras.all_layers(op)} if holds else set()
        mine = [e for e in edits if id(e[0]) in inside]
        return edit(op, mine) if mine else base(op)

    return clone_op


def _paths(root) -> dict[int, list]:
    """``{id(layer): path}`` for every layer in ``root``, the path a list of steps
    (``["blocks", 1]``, ``["ffn"]``) as `multidrop._keras.children` names them."""
    paths = {id(root): []}
    pending = [root]
    while pending:
        layer = pending.pop(0)
        for steps, child in _keras.children(layer):
            if id(child) not in paths:
                paths[id(child)] = [*paths[id(layer)], list(steps)]
                pending.append(child)
    return paths


def _get(obj, step):
    holder = getattr(obj, step[0], None)
    return holder if len(step) == 1 or holder is None else holder[step[1]]


def _owner(root, path):
    owner = root
    for step in path[:-1]:
        owner = _get(owner, step)
    return owner, _get(owner, path[-1])


def _resolve(root, path):
    return _owner(root, path)[1] if path else root
