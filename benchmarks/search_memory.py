"""Does memory stay flat across search trials? Worker RSS over 60 trials of the digits CNN.

The bundled digits CNN is fine-tuned once per trial (60 rates x 1 seed, a grid) on 300
digits for 2 epochs, by ``multidrop.search(..., storage=<a SQLite file>, workers=1)``.
Each worker process records its resident set size after every trial (the trial's
``rss_mb`` attribute); a worker that has grown by more than
``search_workers.RSS_GROWTH_MB`` after its warm-up (``WARM_UP`` trials) is replaced by
a fresh one. The table gives, per worker process, its trials and its growth from the
reading after its warm-up to its largest reading. ``--in-process`` measures the same
trials run in this process instead (no storage, no workers), where nothing is replaced.

Example:
    $ KERAS_BACKEND=tensorflow python -m benchmarks.search_memory --json memory.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import tempfile

import keras
import numpy as np
import optuna

from multidrop import search_workers
from multidrop.demo import digits
from multidrop.search import search

search_module = importlib.import_module("multidrop.search")  # the module, not the function


def setup(trials: int):
    model = keras.saving.load_model(digits.MODEL_PATH)
    (x, y), validation, _ = digits.load()
    rates = [round(0.005 + 0.01 * i, 3) for i in range(trials)]
    options = dict(
        where={"all": "activations"},
        loss="sparse_categorical_crossentropy",
        epochs=2,
        batch_size=32,
        rates=rates,
    )
    return model, (x[:300], y[:300]), validation, options


def in_workers(trials: int) -> list[dict]:
    """One row per worker process: trials, RSS after its first, its warm-up, at its largest."""
    model, train, validation, options = setup(trials)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/memory.db"
        result = search(model, train, validation, **options, storage=url, workers=1)
        store = search_workers.storage(url)
        done = optuna.load_study(study_name="multidrop-search", storage=store).get_trials()
        store.engine.dispose()
    assert result.trained == trials
    workers: dict[str, list] = {}
    for trial in sorted(done, key=lambda t: t.datetime_complete or t.datetime_start):
        if "rss_mb" in trial.user_attrs:
            workers.setdefault(trial.user_attrs["worker"], []).append(trial.user_attrs["rss_mb"])
    warm = search_workers.WARM_UP  # the growth counts from the reading after the warm-up
    return [
        {
            "worker": w,
            "trials": len(r),
            "first_mb": r[0],
            "warm_mb": r[min(warm, len(r)) - 1],
            "max_mb": max(r),
            "growth_mb": max(r) - r[min(warm, len(r)) - 1],
        }
        for w, r in workers.items()
    ]


def in_process(trials: int) -> dict:
    """The same trials in this process: RSS after the first trial and after the last."""
    model, train, validation, options = setup(trials)
    readings, trial = [], search_module._Search.trial

    def measured_trial(self, optuna_trial):  # the clone is freed when a trial returns
        value = trial(self, optuna_trial)
        readings.append(search_workers.rss_mb())
        return value

    search_module._Search.trial = measured_trial
    try:
        search(model, train, validation, **options)
    finally:
        search_module._Search.trial = trial
    slope = float(np.polyfit(np.arange(len(readings)), readings, 1)[0])
    return {"trials": len(readings), "first_mb": readings[0], "last_mb": readings[-1],
            "growth_mb": readings[-1] - readings[0], "slope_mb_per_trial": slope}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--in-process", action="store_true", help="no workers: this process")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    backend = keras.backend.backend()
    if args.in_process:
        report = {"backend": backend, "mode": "in-process", **in_process(args.trials)}
        print(
            f"{backend}, in this process: {report['first_mb']:.0f} MB after trial 1, "
            f"{report['last_mb']:.0f} MB after trial {report['trials']} "
            f"({report['growth_mb']:+.1f} MB, {report['slope_mb_per_trial']:+.2f} MB per trial)"
        )
    else:
        rows = in_workers(args.trials)
        report = {"backend": backend, "mode": "workers", "trials": args.trials,
                  "rss_growth_limit_mb": search_workers.RSS_GROWTH_MB, "workers": rows}  # fmt: skip
        print(f"{backend}, {args.trials} trials, workers replaced past "
              f"+{search_workers.RSS_GROWTH_MB} MB:")  # fmt: skip
        for row in rows:
            print(f"  worker {row['worker']}: {row['trials']} trials, {row['first_mb']:.0f} MB "
                  f"after its first, {row['warm_mb']:.0f} MB after its warm-up, at most "
                  f"{row['max_mb']:.0f} MB "
                  f"({row['growth_mb']:+.1f} MB)")  # fmt: skip
        print(f"largest growth of one worker: {max(r['growth_mb'] for r in rows):+.1f} MB")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
