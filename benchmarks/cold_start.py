"""The first training step in a fresh PyTorch process: ``python -m benchmarks.cold_start``

A 3-layer MLP (Dense 128, dropout 0.2, Dense 128, dropout 0.2, Dense 10; batch 32; one
thread), compiled with Adam, its first ``train_on_batch`` timed in fresh processes:

- ``keras``: Keras' own Dropout;
- ``multidrop, empty caches``: multidrop's Dropout with a new, empty kernel cache
  (``MULTIDROP_CACHE``) and a new, empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``): the
  first run on a machine. The process then trains on until the kernel built in the
  background (`multidrop.prebuilt`) is loaded, and reports when that was;
- ``multidrop, built``: a later process on the same machine (the kernel cache from the
  run before).

Each child also times 50 steps once its dropout runs at full speed (steady state) and,
for the empty-cache run, the steps taken while the kernel was being built (eager ops).
Writes ``cold_start.json`` and ``cold_start.md`` into ``--out``.

Example:
    $ python -m benchmarks.cold_start --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import benchmarks

VARIANTS = ("keras", "multidrop, empty caches", "multidrop, built")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cold_start")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child)))
        return 0
    results = {"date": _now(), "machine": _machine(), "runs": {v: [] for v in VARIANTS}}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            env = {**os.environ, "KERAS_BACKEND": "torch"}
            env["MULTIDROP_CACHE"] = os.path.join(folder, "multidrop")
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
            for variant in VARIANTS:  # in this order: "built" reuses the empty run's cache
                command = [sys.executable, "-m", "benchmarks.cold_start", "--child", variant]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                results["runs"][variant].append(run)
                print(variant, run, flush=True)
    text = markdown(results)
    benchmarks.save(args.out, "cold_start", results, text)
    print(text)
    return 0


def _child(variant: str) -> dict:
    """One fresh process: import, build, first step, then the steady state."""
    start = time.perf_counter()
    import keras
    import numpy as np
    import torch

    from multidrop import prebuilt
    from multidrop.dropout import Dropout

    torch.set_num_threads(1)
    imported = time.perf_counter() - start
    layer = keras.layers.Dropout if variant == "keras" else Dropout
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            layer(0.2),
            keras.layers.Dense(128, activation="relu"),
            layer(0.2),
            keras.layers.Dense(10),
        ]
    )
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 64), "float32"), rng.integers(0, 10, 32)
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    building, ready = [], 0.0
    if variant != "keras":
        while prebuilt.kernel(torch.float32, 1) is None:  # trains on while it is built
            if time.perf_counter() - start > 1200:
                raise SystemExit("the kernel was not built in 20 minutes")
            tick = time.perf_counter()
            model.train_on_batch(x, y)
            building.append(time.perf_counter() - tick)
        ready = time.perf_counter() - start
    steady = []
    for _ in range(50):
        tick = time.perf_counter()
        model.train_on_batch(x, y)
        steady.append(time.perf_counter() - tick)
    return {
        "import_s": imported,
        "first_step_s": first,
        "kernel_ready_s": ready,
        "steps_while_building": len(building),
        "step_while_building_ms": statistics.median(building) * 1e3 if building else None,
        "steady_step_ms": statistics.median(steady) * 1e3,
    }


def markdown(results: dict) -> str:
    """The table of medians over the fresh processes, with the date and machine."""
    keras_first = statistics.median(r["first_step_s"] for r in results["runs"]["keras"])
    lines = [
        "| dropout | first step s | over Keras' Dropout s | kernel loaded after s "
        "| step while building ms | steady step ms | processes |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, runs in results["runs"].items():

        def med(key, runs=runs):
            values = [r[key] for r in runs if r[key] is not None]
            return statistics.median(values) if values else None

        first, ready, building = med("first_step_s"), med("kernel_ready_s"), None
        building = med("step_while_building_ms")
        lines.append(
            f"| {variant} | {first:.2f} | {first - keras_first:+.2f} | "
            f"{'–' if variant == 'keras' else f'{ready:.1f}'} | "
            f"{'–' if building is None else f'{building:.2f}'} | "
            f"{med('steady_step_ms'):.2f} | {len(runs)} |"
        )
    lines += [
        "",
        f"First `train_on_batch` of a 3-layer MLP (batch 32, 1 thread) in a fresh process, "
        f"medians; {results['machine']}; {results['date']}. Empty caches: a new "
        "`MULTIDROP_CACHE` and `TORCHINDUCTOR_CACHE_DIR`; built: a later process with the "
        "kernel cache the empty run left.",
    ]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
