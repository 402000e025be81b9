"""What editing inside a ``call()`` costs: the edit itself, and a training step after it.

Two measurements on a subclassed model of residual feed-forward blocks (the kind of code
keras-io writes), interleaved in one process, medians with quartiles:

* **edit**: ``insert_dropout`` on the subclassed model (probe call, copy, surgery) against
  Keras' own recipe for a copy, ``from_config(get_config())`` + build + ``set_weights``;
* **step**: one training step (``train_on_batch``) of the edited model, whose dropout is a
  `multidrop.layers.Then` around a sublayer, against the same model with the same dropout
  written into ``call()`` by hand.

Example:
    $ KERAS_BACKEND=jax python -m benchmarks.surgery --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import keras
import numpy as np
import rich.console
import rich.table

import multidrop
from benchmarks.timing import Device, interleave, summary
from multidrop import select
from multidrop.dropout import Dropout


class Block(keras.layers.Layer):
    def __init__(self, dim, rate=None, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.rate = dim, rate
        self.norm = keras.layers.LayerNormalization()
        self.ffn = keras.layers.Dense(4 * dim, activation="gelu")
        self.drop = None if rate is None else Dropout(rate, seed=0)  # by hand
        self.proj = keras.layers.Dense(dim)

    def call(self, x, training=None):
        h = self.ffn(self.norm(x))
        if self.drop is not None:
            h = self.drop(h, training=training)
        return x + self.proj(h)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "rate": self.rate}


class Net(keras.Model):
    def __init__(self, dim=256, depth=4, rate=None, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.depth, self.rate = dim, depth, rate
        self.stem = keras.layers.Dense(dim)
        self.blocks = [Block(dim, rate) for _ in range(depth)]
        self.head = keras.layers.Dense(10)

    def call(self, x, training=None):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, training=training)
        return self.head(x)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "depth": self.depth, "rate": self.rate}


def keras_copy(model, x):
    """Keras' own recipe: from_config(get_config()), built, weights copied."""
    copy = type(model).from_config(model.get_config())
    copy(x)
    copy.set_weights(model.get_weights())
    return copy


def measure(dim: int, depth: int, batch: int, reps: int) -> dict:
    device = Device.detect()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, dim)).astype("float32")
    y = rng.integers(0, 10, batch)
    plain = Net(dim, depth)
    plain(x)
    where = select.activations()  # each block's gelu feed-forward Dense

    edit_ms = {"multidrop": [], "keras": []}
    for rep in range(reps):
        for name in ["multidrop", "keras"][rep % 2 :] + ["multidrop", "keras"][: rep % 2]:
            start = time.perf_counter()
            if name == "keras":
                keras_copy(plain, x)
            else:
                multidrop.insert_dropout(plain, 0.1, where=where, seed=0)
            edit_ms[name].append((time.perf_counter() - start) * 1e3)

    wrapped = multidrop.insert_dropout(plain, 0.1, where=where, seed=0)
    by_hand = Net(dim, depth, rate=0.1)
    by_hand(x)
    steps = {}
    for name, model in (("wrapped", wrapped), ("by hand", by_hand)):
        model.compile("adam", "sparse_categorical_crossentropy")
        steps[name] = lambda model=model: model.train_on_batch(x, y)
    samples = interleave(steps, device, reps=reps, warmup=3, steps=5)
    return {
        "backend": keras.backend.backend(),
        "device": device.describe(),
        "date": time.strftime("%Y-%m-%d"),
        "model": f"subclassed, {depth} residual blocks of width {dim}, batch {batch}",
        "edit": {name: summary(ms) for name, ms in edit_ms.items()},
        "edit_ratio": float(np.median(edit_ms["multidrop"]) / np.median(edit_ms["keras"])),
        "step": {name: summary(s["ms"]) for name, s in samples.items()},
        "step_ratio": float(
            np.median(samples["wrapped"]["ms"]) / np.median(samples["by hand"]["ms"])
        ),
    }


def table(result: dict) -> rich.table.Table:
    table = rich.table.Table(title=f"{result['model']} ({result['backend']}, {result['device']})")
    for column in ("what", "variant", "median ms", "q1-q3 ms", "ratio"):
        table.add_column(column)
    for what, ratio_key in (("edit", "edit_ratio"), ("step", "step_ratio")):
        for i, (variant, s) in enumerate(result[what].items()):
            ratio = f"{result[ratio_key]:.2f}x" if i == 0 else ""
            spread = f"{s['q1_ms']:.1f}-{s['q3_ms']:.1f}"
            table.add_row(what, variant, f"{s['median_ms']:.1f}", spread, ratio)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", help="folder for surgery_<backend>.json")
    args = parser.parse_args(argv)
    result = measure(args.dim, args.depth, args.batch, args.reps)
    rich.console.Console().print(table(result))
    if args.out:
        path = pathlib.Path(args.out, f"surgery_{result['backend']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
