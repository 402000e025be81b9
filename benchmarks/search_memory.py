"""Does memory stay flat across search trials? RSS of one `multidrop.search` over 20 trainings.

The bundled digits CNN is fine-tuned 20 times (20 rates x 1 seed, a grid) on 300
digits for 2 epochs. The resident set size is read from ``/proc/self/statm``
after every training; a first, separate search of 2 trainings warms up imports,
kernels and allocator pools, so the numbers are the search's own growth.

Example:
    $ KERAS_BACKEND=jax python -m benchmarks.search_memory
"""

from __future__ import annotations

import importlib
import os
import resource

import keras
import numpy as np

from multidrop.demo import digits
from multidrop.search import search

search_module = importlib.import_module("multidrop.search")  # the module, not the function

TRIALS = 20


def rss_mb() -> float:
    """Resident memory of this process now (peak instead where /proc is missing)."""
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    model = keras.saving.load_model(digits.MODEL_PATH)
    (x, y), validation, _ = digits.load()
    train = (x[:300], y[:300])
    options = dict(
        where={"all": "activations"},
        loss="sparse_categorical_crossentropy",
        epochs=2,
        batch_size=32,
    )
    search(model, train, validation, rates=[0.0, 0.1], **options)  # warm-up

    readings = []
    trial = search_module._Search.trial

    def measured_trial(self, optuna_trial):  # the clone is freed when a trial returns
        value = trial(self, optuna_trial)
        readings.append(rss_mb())
        return value

    search_module._Search.trial = measured_trial
    start = rss_mb()
    try:
        rates = [round(0.01 + 0.04 * i, 2) for i in range(TRIALS)]
        result = search(model, train, validation, rates=rates, **options)
    finally:
        search_module._Search.trial = trial
    assert result.trained == len(readings) == TRIALS
    slope = np.polyfit(np.arange(TRIALS), readings, 1)[0]
    print(
        f"backend {keras.backend.backend()}: RSS {start:.0f} MB before the search; after "
        f"trial 1 {readings[0]:.0f} MB, after trial {TRIALS} {readings[-1]:.0f} MB"
    )
    print(
        f"growth over {TRIALS} trials: {readings[-1] - start:+.1f} MB from before the search, "
        f"{readings[-1] - readings[0]:+.1f} MB from trial 1 to {TRIALS} "
        f"(fitted slope {slope:+.2f} MB per trial)"
    )
    print("per trial (MB):", " ".join(f"{r:.0f}" for r in readings))


if __name__ == "__main__":
    main()
