"""One worker against two: the time of the demo's search grid with ``workers=1`` and ``2``.

The grid of ``multidrop demo search`` (placements ``head`` and ``all`` x rates 0, 0.2,
0.5, ``--seeds`` seeds, ``--epochs`` epochs, 20 digits per class) is searched from
scratch with each worker count on its own SQLite study in a temporary folder; the wall
time of the whole ``search`` call (worker start-up included) and the largest RSS growth
of a worker are printed, and the tables are checked to be bitwise the same.

Example:
    $ KERAS_BACKEND=torch python -m benchmarks.search_workers --json workers.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import keras
import optuna

from multidrop import search_workers
from multidrop.demo import search as demo
from multidrop.search import search


def timed(workers: int, seeds: int, epochs: int) -> dict:
    pretrain, train, validation, _ = demo.split(20)
    model = demo.transfer_model(pretrain)
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/search.db"
        start = time.perf_counter()
        result = search(model, train, validation, where=demo.PLACEMENTS, rates=demo.RATES,
                        loss=demo.LOSS, epochs=epochs, seeds=seeds, batch_size=20,
                        storage=url, workers=workers)  # fmt: skip
        seconds = time.perf_counter() - start
        store = search_workers.storage(url)
        trials = optuna.load_study(study_name="multidrop-search", storage=store).get_trials()
        store.engine.dispose()
    rss: dict[str, list] = {}
    for trial in sorted(trials, key=lambda t: t.datetime_complete or t.datetime_start):
        if "rss_mb" in trial.user_attrs:
            rss.setdefault(trial.user_attrs["worker"], []).append(trial.user_attrs["rss_mb"])
    warm = search_workers.WARM_UP
    growth = max(max(r) - r[min(warm, len(r)) - 1] for r in rss.values())
    return {"workers": workers, "seconds": seconds, "trained": result.trained,
            "processes": len(rss), "max_growth_mb": growth, "rows": result.rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=demo.EPOCHS)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    runs = [timed(n, args.seeds, args.epochs) for n in (1, 2)]
    assert runs[0]["rows"] == runs[1]["rows"], "1 and 2 workers gave different tables"
    ratio = runs[1]["seconds"] / runs[0]["seconds"]
    for run in runs:
        print(f"{keras.backend.backend()}, {run['workers']} worker(s): {run['seconds']:.0f} s for "
              f"{run['trained']} fine-tunes, {run['processes']} worker processes, largest RSS "
              f"growth of one {run['max_growth_mb']:+.1f} MB")  # fmt: skip
    print(f"2 workers / 1 worker: {ratio:.2f} of the time; tables bitwise the same")
    if args.json:
        report = {"backend": keras.backend.backend(), "cpus": os.cpu_count(),
                  "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
                  "seeds": args.seeds, "epochs": args.epochs, "ratio": ratio,
                  "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs]}  # fmt: skip
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
