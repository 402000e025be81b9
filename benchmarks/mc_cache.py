"""What trunk caching saves in ``mc_predict``: cached, uncached and ``model.predict``, interleaved.

ResNet50 (``weights=None``) with dropout only at its last few sites, the usual
fine-tuning setup: the trunk runs once per input when cached, ``samples`` times
when not. A second case puts dropout first, at the input, where nothing can be
cached: the cached call must not be slower. Each round times the three variants
one after the other (a busy moment of the machine slows a whole round), after a
first call of each that builds and compiles; the table gives medians with the
spread (half the inter-quartile range), the speed-up of caching, and the cached
call over one ``model.predict`` of the same rows.

``--memory`` also measures each variant's memory fairly: every (case, variant)
runs in a subprocess of its own, which builds the model and calls the variant
twice, reading ``/proc/self/status`` (Linux): the first call's growth (its peak
over the resident memory after building, which includes building the MC view
and compiling) and, after resetting the peak (``/proc/self/clear_refs``), the
second call's peak resident memory (``VmHWM``), what every later call needs.

Example:
    $ python -m benchmarks.mc_cache --samples 16 --memory   # ResNet50 64x64, batch 16
    $ python -m benchmarks.mc_cache --quick                 # a small CNN, a few seconds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import keras
import numpy as np

import multidrop
from benchmarks import timing
from benchmarks.run import _set_threads, _versions
from multidrop import render, select

CASES = {"last 3 sites": select.last(3), "first site": select.first(1)}
VARIANTS = ("cached", "uncached", "predict")


def _model(quick: bool) -> keras.Model:
    if quick:
        x = keras.Input((16, 16, 3))
        h = x
        for filters in (8, 16, 16):
            h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        h = keras.layers.Dense(16, activation="relu")(h)
        return keras.Model(x, keras.layers.Dense(10, activation="softmax")(h))
    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)


def _calls(rewired, x, samples: int) -> dict:
    """The three variants, each a function of no arguments."""
    return {
        "cached": lambda: multidrop.mc_predict(rewired, x, samples, seed=0, cache=True),
        "uncached": lambda: multidrop.mc_predict(rewired, x, samples, seed=0, cache=False),
        "predict": lambda: rewired.predict(x, batch_size=len(x), verbose=0),
    }


def _setup(args, case: str):
    model = _model(args.quick)
    x = np.random.default_rng(0).random((args.batch, *model.input_shape[1:]), "float32")
    rewired = multidrop.insert_dropout(model, 0.2, where=select.activations() & CASES[case])
    return rewired, x


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(seconds: list[float]) -> tuple[float, float]:
    q1, median, q3 = np.percentile(seconds, [25, 50, 75])
    return float(median), float(q3 - q1) / 2


def _mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (the peak since the last reset) of this process, in MiB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _growth(call) -> float:
    """The peak resident memory during ``call()`` over the resident memory before it, MiB."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _mib("VmRSS")
    call()
    return _mib("VmHWM") - before


def _one(args) -> None:
    """Subprocess of ``--memory``: one case and variant; prints its memory as JSON."""
    _set_threads(args.threads)
    timing.kernels_ready()
    case, variant = args.one.split("=")
    rewired, x = _setup(args, case)
    call = _calls(rewired, x, args.samples)[variant]
    first = _growth(call)
    print(json.dumps({"first_mib": first, "growth_mib": _growth(call), "peak_mib": _mib("VmHWM")}))


def _memory(args, case: str) -> dict:
    """``{variant: {"first_mib", "growth_mib", "peak_mib"}}``, one process per variant: the
    growth of its first call and of its second, and the second's peak resident memory."""
    found = {}
    for variant in VARIANTS:
        argv = [sys.executable, "-m", "benchmarks.mc_cache", "--one", f"{case}={variant}"]
        argv += ["--samples", str(args.samples), "--batch", str(args.batch)]
        argv += ["--quick"] if args.quick else []
        argv += ["--threads", str(args.threads)] if args.threads else []
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        found[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mc_cache")
    parser.add_argument("--quick", action="store_true", help="a small CNN instead of ResNet50")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, help="intra-op threads (PyTorch, TensorFlow); default: theirs"
    )
    parser.add_argument(
        "--memory", action="store_true", help="also each variant's peak memory, one process each"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # CASE=VARIANT: a --memory subprocess
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.one:
        return _one(args)
    _set_threads(args.threads)
    timing.kernels_ready()

    rows = []
    for case in CASES:
        rewired, x = _setup(args, case)
        calls = _calls(rewired, x, args.samples)
        for call in calls.values():  # first calls build and compile
            call()
        seconds = {variant: [] for variant in calls}
        for _ in range(args.reps):  # interleaved
            for variant, call in calls.items():
                seconds[variant].append(_once(call))
        row = {"case": case, "seconds": seconds}
        for variant in calls:
            row[f"{variant}_s"], row[f"{variant}_spread_s"] = _summary(seconds[variant])
        row["speedup"] = row["uncached_s"] / row["cached_s"]
        row["cached_over_predict"] = row["cached_s"] / row["predict_s"]
        if args.memory:
            row["memory_mib"] = _memory(args, case)
        rows.append(row)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": timing.Device.detect().describe(),
        "versions": _versions(),
        "settings": {
            "samples": args.samples,
            "batch": args.batch,
            "reps": args.reps,
            "threads": args.threads,
        },
        "backend": keras.backend.backend(),
        "model": "cnn" if args.quick else "resnet50",
        "rows": rows,
    }
    text = render.text(_table(result))
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mc_cache_{keras.backend.backend()}.json").write_text(json.dumps(result, indent=2))
    (out / f"mc_cache_{keras.backend.backend()}.md").write_text(f"```text\n{text}```\n")
    return result


def _table(result: dict):
    """The rich table of a result: what ``main`` prints, and writes beside the JSON."""
    settings, memory = result["settings"], "memory_mib" in result["rows"][0]
    columns = ["dropout at", "#cached (s)", "#uncached (s)", "#speed-up", "#model.predict (s)"]
    columns += ["#cached / predict"]
    columns += ["#peak MiB: cached / uncached / predict", "#first call +MiB"] if memory else []
    model = "small CNN" if result["model"] == "cnn" else "ResNet50 64x64"
    table = render.table(
        f"mc_predict, {model}, batch {settings['batch']}, {settings['samples']} samples, "
        f"{result['backend']}, {result['device']}",
        tuple(columns),
        caption=f"medians ± half IQR of {settings['reps']} interleaved rounds; peak: the resident "
        "memory's peak during a second call, each variant in a process of its own; first call: its "
        "peak over the memory after building the model (it includes building the MC view and "
        "compiling)",
    )
    for r in result["rows"]:
        cells = [r["case"]]
        cells += [f"{r[f'{v}_s']:.3f} ± {r[f'{v}_spread_s']:.3f}" for v in VARIANTS[:2]]
        cells += [f"{r['speedup']:.1f}x", f"{r['predict_s']:.3f} ± {r['predict_spread_s']:.3f}"]
        cells += [f"{r['cached_over_predict']:.2f}x"]
        if memory:
            m = r["memory_mib"]
            cells += [
                " / ".join(f"{m[v][key]:.0f}" for v in VARIANTS)
                for key in ("peak_mib", "first_mib")
            ]
        table.add_row(*cells)
    return table


if __name__ == "__main__":
    main()
