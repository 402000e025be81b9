"""``multidrop demo search``: does dropout help a small-data fine-tune? Measured, on digits.

A small CNN is pretrained on the scikit-learn digits 0-4, then fine-tuned on the
digits 5-9 from only ``per_class`` examples of each (the small-data transfer case,
where overfitting is real). `multidrop.search` tries dropout in the head
(``select.last(2)``) and after every activation, at rates 0 (none), 0.2 and 0.5,
over several seeds, choosing on a validation split. Then the best dropout and no
dropout are both fine-tuned again with every seed and scored on held-out 5-9
digits that the search never saw, and the demo says plainly whether dropout
helped, by how much, and how that compares with the spread over seeds.

Nothing is downloaded; everything written goes under ``out``.

Example:
    >>> from multidrop.demo import search
    >>> search.run(out="results", seeds=5)
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import keras
import numpy as np
import rich.console

import multidrop
from multidrop import render, select
from multidrop.search import SearchResult
from multidrop.search import search as run_search

PLACEMENTS = {"head": select.last(2), "all": "activations"}
RATES = (0.0, 0.2, 0.5)
EPOCHS = 80  # fine-tuning epochs (5 steps each): enough to learn 100 examples by heart
PRETRAIN_EPOCHS = 5
LOSS = "sparse_categorical_crossentropy"


@dataclasses.dataclass
class HeldOut:
    """No dropout against the best dropout, each fine-tuned with every seed, on held-out data."""

    best: dict  # the search row of the best dropout (rate > 0)
    accuracy: dict  # "none" / "dropout" -> one held-out accuracy per seed
    loss: dict

    @property
    def difference(self) -> np.ndarray:
        """Held-out accuracy of dropout minus no dropout, seed by seed."""
        return np.array(self.accuracy["dropout"]) - np.array(self.accuracy["none"])

    def verdict(self) -> str:
        d = self.difference
        spread = d.std(ddof=1) if len(d) > 1 else math.nan
        wins = int((d > 0).sum())
        what = f"dropout {self.best['rate']:g} in '{self.best['placement']}'"
        clear = len(d) > 1 and abs(d.mean()) > 2 * spread / math.sqrt(len(d))
        if not clear:
            answer = f"no clear difference: {what} against no dropout is within the seeds' spread"
        elif d.mean() > 0:
            answer = f"yes: {what} beats no dropout"
        else:
            answer = f"no: {what} is worse than no dropout"
        return (
            f"{answer}. Held-out accuracy, dropout minus none: {d.mean():+.3f} ± "
            f"{spread:.3f} (mean ± std of the paired difference over {len(d)} seeds; "
            f"dropout better in {wins} of {len(d)})."
        )

    def table(self):
        table = render.table(
            f"held-out digits 5-9, never seen by the search ({len(self.difference)} seeds)",
            ["fine-tuned", "#accuracy", "#loss", "accuracy per seed"],
        )
        for key, label in (
            ("none", "no dropout"),
            ("dropout", f"{self.best['placement']}, rate {self.best['rate']:g}"),
        ):
            acc, loss = np.array(self.accuracy[key]), np.array(self.loss[key])
            table.add_row(
                label,
                f"{acc.mean():.3f} ± {acc.std(ddof=1):.3f}",
                f"{loss.mean():.3f} ± {loss.std(ddof=1):.3f}",
                " ".join(f"{a:.3f}" for a in acc),
            )
        return table


def run(
    *, out=".", seeds: int = 5, epochs: int = EPOCHS, per_class: int = 20, console=None
) -> tuple[SearchResult, HeldOut]:
    """Pretrain, search, compare on held-out data, and print each stage.

    Args:
        out: folder for the search (``search/``: the Optuna study, ``best.keras``,
            ``heatmap.png``). Run again with the same folder, the search resumes.
        seeds: fine-tunings per configuration (at least 2, for a spread).
        epochs: fine-tuning epochs.
        per_class: training examples of each digit 5-9.
        console: a ``rich`` console to print to (default: stdout).

    Returns:
        The `SearchResult` and the held-out comparison.
    """
    console = console or rich.console.Console()
    start = time.perf_counter()
    console.rule(f"multidrop demo search on {keras.backend.backend()}: where should dropout go?")
    pretrain, train, validation, test = split(per_class)
    model = transfer_model(pretrain)
    console.print(
        f"pretrained on {len(pretrain[0])} digits 0-4; fine-tuning on 5-9 with {per_class} "
        f"examples per class ({len(train[0])}), choosing on {len(validation[0])}, "
        f"then scoring on {len(test[0])} held-out digits",
        soft_wrap=True,
    )
    folder = pathlib.Path(out) / "search"
    result = run_search(
        model,
        train,
        validation,
        where=PLACEMENTS,
        rates=RATES,
        loss=LOSS,
        metrics=["accuracy"],
        objective="val_loss",
        epochs=epochs,
        seeds=seeds,
        batch_size=per_class,  # whole batches: one compiled training step on JAX
        directory=folder,
        verbose=True,
    )
    console.print(render.text(result.table()), end="", soft_wrap=True)
    console.print(f"best on validation: {result.best_call}", soft_wrap=True)
    heldout = held_out(model, result, train, test, epochs, seeds, per_class)
    console.print(render.text(heldout.table()), end="", soft_wrap=True)
    console.print(heldout.verdict(), soft_wrap=True)
    console.print(
        f"wrote {folder / 'heatmap.png'} and {folder / 'best.keras'} "
        f"in {time.perf_counter() - start:.0f} s",
        soft_wrap=True,
    )
    return result, heldout


def split(per_class: int, seed: int = 0):
    """Digits 0-4 (896 of them) to pretrain; 5-9 cut into ``per_class`` per digit to fine-tune
    (in batches of ``per_class``), 30 per digit to validate, and the rest to test.
    Images (n, 8, 8, 1) in [0, 1]; 5-9 become 0-4."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "validation": [], "test": []}
    for digit in range(5, 10):
        rows = rng.permutation(np.flatnonzero(y == digit))
        cuts = np.split(rows, [per_class, per_class + 30])
        for name, part in zip(parts, cuts):
            parts[name].append(part)
    low = np.flatnonzero(y < 5)
    low = low[: len(low) // 32 * 32]  # whole batches of 32
    pretrain = (x[low], y[low])
    return (pretrain, *((x[np.concatenate(p)], y[np.concatenate(p)] - 5) for p in parts.values()))


def transfer_model(pretrain, seed: int = 0) -> keras.Model:
    """Train a small CNN on digits 0-4; return its trunk with a new, untrained 5-way head."""
    keras.utils.set_random_seed(seed)
    x = inputs = keras.Input((8, 8, 1), name="image")
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    features = keras.layers.Dense(64, activation="relu", name="fc")(x)
    source = keras.Model(
        inputs, keras.layers.Dense(5, activation="softmax", name="digits_0_4")(features)
    )
    source.compile("adam", LOSS)
    source.fit(*pretrain, batch_size=32, epochs=PRETRAIN_EPOCHS, verbose=0)
    head = keras.layers.Dense(5, activation="softmax", name="digits_5_9")(features)
    return keras.Model(inputs, head, name="digits_transfer")


def held_out(model, result: SearchResult, train, test, epochs, seeds, batch_size) -> HeldOut:
    """Fine-tune no dropout and the best dropout once per seed, as the search did; score on test."""
    best = min((r for r in result.rows if r["rate"] > 0), key=lambda r: r["mean"])
    accuracy, loss = {"none": [], "dropout": []}, {"none": [], "dropout": []}
    for seed in range(seeds):
        for key in accuracy:
            keras.utils.set_random_seed(seed)
            if key == "none":
                net = keras.models.clone_model(model)
                net.set_weights(model.get_weights())
            else:
                net = multidrop.insert_dropout(
                    model, best["rate"], where=PLACEMENTS[best["placement"]], seed=seed
                )
            net.compile("adam", LOSS, metrics=["accuracy"])
            net.fit(*train, batch_size=batch_size, epochs=epochs, verbose=0)
            scores = net.evaluate(*test, verbose=0, return_dict=True)
            accuracy[key].append(scores["accuracy"])
            loss[key].append(scores["loss"])
    return HeldOut(best, accuracy, loss)
