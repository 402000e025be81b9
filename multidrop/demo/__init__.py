"""``multidrop demo``: the whole job, on real data, in under two minutes on a 2-core CPU.

On the bundled digits CNN (`multidrop.digits`), or on the user's own model:
plan where dropout goes, insert it, verify that inference did not change, then
fine-tune with and without the added dropout (same start, same batches),
compare validation accuracy and step time, and use Monte Carlo dropout to find
the test digits the model is least sure of, drawn into a PNG.

A model of the user's runs the whole job when its one input holds 64 numbers
(8x8 images, flat or not) and its one output gives 10 classes; any other model
gets the plan, the insertion and the verification.

Example:
    >>> from multidrop import demo
    >>> demo.run(options=Options(0.1), epochs=5, out="results")
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time

import keras
import numpy as np
import rich.console
import rich.progress
import rich.table

import multidrop
from multidrop import uncertainty
from multidrop.demo import digits
from multidrop.options import Options

PNG_NAME = "multidrop_demo_uncertain.png"
SHOWN = 12  # uncertain digits in the table and the picture


def run(model=None, *, options: Options, epochs=5, samples=30, out=".", console=None) -> None:
    """Run the demo and print each stage.

    Args:
        model: a Keras model, or None for the bundled digits CNN.
        options: the `multidrop.options.Options` to insert dropout with.
        epochs: fine-tuning epochs for each of the two runs.
        samples: Monte Carlo samples per test digit.
        out: folder for the PNG of the most uncertain digits.
        console: a ``rich`` console to print to (default: stdout).
    """
    console = console or rich.console.Console()
    seed = 0 if options.seed is None else options.seed
    keras.utils.set_random_seed(seed)  # the same run every time, dropout masks included
    if model is None:
        model = keras.saving.load_model(digits.MODEL_PATH)
    console.rule(f"multidrop demo: '{model.name}' on {keras.backend.backend()}")
    plan = multidrop.plan(model, **options.changed())
    console.print(plan.table())
    rewired = multidrop.insert_dropout(model, **options.changed())

    data = _digits_for(model)
    x_check = data[2][0][:64] if data else None
    report = multidrop.verify(model, rewired, x_check)
    console.print(report.table())
    report.raise_on_mismatch()
    if data is None:
        console.print(
            f"'{model.name}' does not take 8x8 digit images (one input of 64 numbers, one "
            "output of 10 classes), so the fine-tuning and Monte Carlo parts are skipped.",
            soft_wrap=True,
        )
        return

    train, validation, test = data
    logits = not _gives_probabilities(model, test[0])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
    with _progress(console) as progress:
        runs = _fine_tune(
            {"without dropout": _copy(model), "with dropout": rewired},
            train,
            validation,
            loss,
            epochs,
            seed,
            progress,
        )
    console.print(_tuning_table(runs, len(plan)))

    tuned = runs[1].model
    mean, std, drawn = multidrop.mc_predict(tuned, test[0], samples, seed=seed, return_samples=True)
    if logits:
        drawn = keras.ops.convert_to_numpy(keras.ops.softmax(drawn))
        mean, std = drawn.mean(axis=0), drawn.std(axis=0)
    entropy = multidrop.predictive_entropy(mean)
    bald = multidrop.mutual_information(drawn)
    order = np.argsort(-entropy)
    console.print(_calibration_table(tuned, validation, test, mean, samples, seed, logits))
    console.print(_uncertain_table(order[:SHOWN], test[1], mean, std, entropy, bald, samples))
    console.print(_error_summary(order, test[1], mean), soft_wrap=True)
    png = _draw(order[:SHOWN], test, mean, entropy, pathlib.Path(out))
    console.print(f"wrote {png}", soft_wrap=True)


def _digits_for(model):
    """The digits splits shaped for ``model``'s input, or None if they do not fit it."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        return None
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape or math.prod(shape) != 64 or "float" not in str(model.inputs[0].dtype):
        return None
    if tuple(model.outputs[0].shape[1:]) != (digits.CLASSES,):
        return None
    return tuple((x.reshape(len(x), *shape), y) for x, y in digits.load())


def _gives_probabilities(model, x) -> bool:
    p = keras.ops.convert_to_numpy(model(x[:32], training=False))
    return bool(np.all(p >= 0) and np.allclose(p.sum(axis=-1), 1, atol=1e-3))


def _copy(model) -> keras.Model:
    """The same model with its own weights, so fine-tuning leaves ``model`` alone."""
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    return twin


def _progress(console) -> rich.progress.Progress:
    return rich.progress.Progress(
        rich.progress.TextColumn("fine-tuning {task.description:<16}"),
        rich.progress.BarColumn(),
        rich.progress.MofNCompleteColumn(),
        rich.progress.TextColumn("steps  loss {task.fields[loss]}"),
        rich.progress.TimeElapsedColumn(),
        console=console,
    )


class _StepClock(keras.callbacks.Callback):
    """Advances the progress bar and records the time between consecutive steps."""

    def __init__(self, progress, task):
        super().__init__()
        self.progress, self.task = progress, task
        self.seconds: list[float] = []
        self.last = None

    def on_epoch_begin(self, epoch, logs=None):
        self.last = None  # the time since the last epoch ended is not a step

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self.last is not None:
            self.seconds.append(now - self.last)
        self.last = now
        self.progress.update(self.task, advance=1, loss=f"{float(logs['loss']):.3f}")


@dataclasses.dataclass
class _Run:
    """One of the two fine-tuning runs."""

    name: str
    model: keras.Model
    clock: _StepClock
    accuracy_before: float
    accuracy_after: float = float("nan")

    @property
    def step_ms(self) -> float:
        return 1e3 * float(np.median(self.clock.seconds))


def _fine_tune(models, train, validation, loss, epochs, seed, progress) -> list[_Run]:
    """Fine-tune each model, taking turns epoch by epoch so that a busy moment of the
    machine slows both alike; both see the same batches."""
    steps = math.ceil(len(train[0]) / 32) * epochs
    runs = []
    for name, net in models.items():
        net.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
        before = net.evaluate(*validation, verbose=0, return_dict=True)["accuracy"]
        clock = _StepClock(progress, progress.add_task(name, total=steps, loss="-"))
        runs.append(_Run(name, net, clock, before))
    for epoch in range(epochs):
        for run in runs:
            keras.utils.set_random_seed(seed + epoch)
            run.model.fit(
                *train,
                batch_size=32,
                epochs=epoch + 1,
                initial_epoch=epoch,
                verbose=0,
                callbacks=[run.clock],
            )
    for run in runs:
        scores = run.model.evaluate(*validation, verbose=0, return_dict=True)
        run.accuracy_after = scores["accuracy"]
    return runs


def _tuning_table(runs, added) -> rich.table.Table:
    table = rich.table.Table(
        title=f"fine-tuning on the digits ({added} dropout layers added)",
        title_justify="left",
        caption="step time: median wall time between training steps",
        caption_justify="left",
    )
    for column in ("fine-tuned", "val acc before", "val acc after", "step time", "overhead"):
        table.add_column(column, justify="left" if column == "fine-tuned" else "right")
    base = runs[0].step_ms
    for r in runs:
        overhead = f"{100 * (r.step_ms / base - 1):+.0f}%" if r is not runs[0] else "-"
        table.add_row(
            r.name,
            f"{r.accuracy_before:.3f}",
            f"{r.accuracy_after:.3f}",
            f"{r.step_ms:.1f} ms",
            overhead,
        )
    return table


def _calibration_table(model, validation, test, mc_mean, samples, seed, logits):
    """Deterministic vs Monte Carlo predictions on the test digits: can their confidence be
    trusted? The temperature of each is fitted on the validation digits."""

    def probabilities(x):
        out = keras.ops.convert_to_numpy(model(x, training=False))
        return keras.ops.convert_to_numpy(keras.ops.softmax(out)) if logits else out

    drawn = multidrop.mc_predict(model, validation[0], samples, seed=seed + 1, return_samples=True)[
        2
    ]
    if logits:  # the mean of logits is no probability: a softmax per sample, then the mean
        drawn = keras.ops.convert_to_numpy(keras.ops.softmax(drawn))
    mc_validation = drawn.mean(axis=0)
    table = rich.table.Table(
        title="can the confidence be trusted? (test digits; temperature fitted on validation)",
        title_justify="left",
    )
    for column in ("prediction", "accuracy", "NLL", "ECE", "T", "NLL after T", "ECE after T"):
        table.add_column(column, justify="left" if column == "prediction" else "right")
    for name, held_out, calibration in (
        ("deterministic", probabilities(test[0]), probabilities(validation[0])),
        (f"MC dropout ({samples} samples)", mc_mean, mc_validation),
    ):
        t = uncertainty.fit_temperature(calibration, validation[1])
        scaled = uncertainty.temperature_scale(held_out, t)
        table.add_row(
            name,
            f"{uncertainty.accuracy(held_out, test[1]):.3f}",
            f"{uncertainty.nll(held_out, test[1]):.3f}",
            f"{uncertainty.ece(held_out, test[1]):.3f}",
            f"{t:.2f}",
            f"{uncertainty.nll(scaled, test[1]):.3f}",
            f"{uncertainty.ece(scaled, test[1]):.3f}",
        )
    return table


def _uncertain_table(shown, labels, mean, std, entropy, bald, samples) -> rich.table.Table:
    table = rich.table.Table(
        title=f"the {len(shown)} least certain test digits "
        f"(Monte Carlo dropout, {samples} samples)",
        title_justify="left",
    )
    for column in (
        "test #",
        "true",
        "predicted",
        "mean p",
        "± std",
        "runner-up",
        "entropy",
        "BALD",
    ):
        table.add_column(column, justify="right")
    for i in shown:
        first, second = np.argsort(-mean[i])[:2]
        table.add_row(
            str(i),
            str(labels[i]),
            str(first) + (" ✗" if first != labels[i] else ""),
            f"{mean[i, first]:.2f}",
            f"{std[i, first]:.2f}",
            f"{second} ({mean[i, second]:.2f})",
            f"{entropy[i]:.2f}",
            f"{bald[i]:.3f}",
        )
    return table


def _error_summary(order, labels, mean) -> str:
    wrong = np.argmax(mean, axis=-1) != labels
    top = len(order) // 10
    return (
        f"errors among the 10% least certain test digits: {wrong[order[:top]].sum()}/{top}; "
        f"among the other 90%: {wrong[order[top:]].sum()}/{len(order) - top}"
    )


def _draw(shown, test, mean, entropy, out: pathlib.Path) -> pathlib.Path:
    from matplotlib.figure import Figure

    images, labels = test
    columns, rows = 6, math.ceil(len(shown) / 6)
    figure = Figure(figsize=(1.6 * columns, 2.0 * rows), layout="constrained")
    figure.suptitle("The least certain test digits (Monte Carlo dropout)")
    for k, i in enumerate(shown):
        axes = figure.add_subplot(rows, columns, k + 1)
        axes.imshow(images[i].reshape(8, 8), cmap="gray_r")
        guess = int(np.argmax(mean[i]))
        axes.set_title(
            f"true {labels[i]}, says {guess}\np={mean[i, guess]:.2f} H={entropy[i]:.2f}",
            fontsize=8,
            color="black" if guess == labels[i] else "red",
        )
        axes.set_axis_off()
    out.mkdir(parents=True, exist_ok=True)
    path = out / PNG_NAME
    figure.savefig(path, dpi=100)
    return path
