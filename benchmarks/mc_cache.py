"""What trunk caching saves in ``mc_predict``: cached against uncached, interleaved in one process.

ResNet50 (``weights=None``) with dropout only at its last few sites, the usual
fine-tuning setup: the trunk runs once per input when cached, ``samples`` times
when not. A second case puts dropout first, at the input, where nothing can be
cached: the cached call must not be slower. Prints medians with the spread
(half the inter-quartile range), the speed-up, and the peak resident memory
growth of each variant's first call (CPU).

Example:
    $ python -m benchmarks.mc_cache                   # ResNet50 64x64, batch 16, 30 samples
    $ python -m benchmarks.mc_cache --quick           # a small CNN, a few seconds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import time

import keras
import numpy as np

import multidrop
from multidrop import render, select


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


def _time(fn, reps: int) -> list[float]:
    return [_once(fn) for _ in range(reps)]


def _once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(seconds: list[float]) -> tuple[float, float]:
    q1, median, q3 = np.percentile(seconds, [25, 50, 75])
    return float(median), float(q3 - q1) / 2


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mc_cache")
    parser.add_argument("--quick", action="store_true", help="a small CNN instead of ResNet50")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    model = _model(args.quick)
    x = np.random.default_rng(0).random((args.batch, *model.input_shape[1:]), "float32")
    cases = {
        "last 3 sites": multidrop.insert_dropout(
            model, 0.2, where=select.activations() & select.last(3)
        ),
        "first site": multidrop.insert_dropout(
            model, 0.2, where=select.activations() & select.first(1)
        ),
    }
    rows = []
    for case, rewired in cases.items():
        calls = {
            cache: (
                lambda c=cache, m=rewired: multidrop.mc_predict(m, x, args.samples, seed=0, cache=c)
            )
            for cache in (True, False)
        }
        peak = {}
        for cache, call in calls.items():  # first calls build and compile; they also set peak RSS
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            call()
            peak[cache] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        seconds = {True: [], False: []}
        for _ in range(args.reps):  # interleaved
            for cache, call in calls.items():
                seconds[cache].append(_once(call))
        (cached, cached_spread), (plain, plain_spread) = (
            _summary(seconds[True]),
            _summary(seconds[False]),
        )
        rows.append(
            {
                "case": case,
                "cached_s": cached,
                "cached_spread_s": cached_spread,
                "uncached_s": plain,
                "uncached_spread_s": plain_spread,
                "speedup": plain / cached,
                "peak_growth_mb": {"cached": peak[True], "uncached": peak[False]},
            }
        )

    table = render.table(
        f"mc_predict, {'small CNN' if args.quick else 'ResNet50 64x64'}, batch {args.batch}, "
        f"{args.samples} samples, {keras.backend.backend()}, {platform.machine()}",
        (
            "dropout at",
            "#cached (s)",
            "#uncached (s)",
            "#speed-up",
            "#peak growth cached/uncached (MB)",
        ),
        caption=f"medians ± half IQR of {args.reps} interleaved calls; peak growth: max RSS "
        "increase during each variant's first call (the later one can only show what the first "
        "did not)",
    )
    for r in rows:
        table.add_row(
            r["case"],
            f"{r['cached_s']:.3f} ± {r['cached_spread_s']:.3f}",
            f"{r['uncached_s']:.3f} ± {r['uncached_spread_s']:.3f}",
            f"{r['speedup']:.1f}x",
            f"{r['peak_growth_mb']['cached']:.0f} / {r['peak_growth_mb']['uncached']:.0f}",
        )
    print(render.text(table))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "backend": keras.backend.backend(),
        "samples": args.samples,
        "batch": args.batch,
        "model": "cnn" if args.quick else "resnet50",
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mc_cache_{keras.backend.backend()}.json").write_text(json.dumps(result, indent=2))
    (out / f"mc_cache_{keras.backend.backend()}.md").write_text(
        f"```text\n{render.text(table)}```\n"
    )
    return result


if __name__ == "__main__":
    main()
