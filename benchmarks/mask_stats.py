"""Can a test tell multidrop's dropout masks from numpy's PCG64? ``python -m benchmarks.mask_stats``

The statistics `tests/test_mask_stats.py` asserts, computed for multidrop's
`Dropout` (masks drawn from the layer itself, on the backend Keras is imported
with) and for the same masks drawn by ``numpy.random.default_rng`` (PCG64):

- calls: the keep masks of ``calls`` consecutive training calls of one layer on
  ``size`` elements; every pair's Pearson correlation ``r``; ``sum(size * r**2)``
  over the pairs is chi-square with one degree per pair if the calls are
  independent: reported as standard deviations from its mean (``z``) with the
  largest ``|r|``;
- seeds: the same over the first call of layers seeded 0..63;
- swapped: calls ``(seed s, count c)`` against ``(seed c, count s)``: how many pairs keep
  exactly as many elements (a permutation would make them all tie) and their ``z``;
- lags: within one call of 2**20 elements, the correlation of elements ``d`` apart
  (d = 1, 2, 4, ..., 2**16, and 3, 5, 7) and of even against odd elements (the previous
  generator gave those two one Threefry block), as ``z = r * sqrt(n)``;
- rates: the kept fraction at rates 0.1, 0.5 and 0.9 in standard deviations.

It prints a markdown table and writes ``mask_stats.json`` and ``mask_stats.md`` into
``--out``.

Example:
    $ KERAS_BACKEND=jax python -m benchmarks.mask_stats
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform

import numpy as np

import benchmarks

LAGS = (*(2**k for k in range(17)), 3, 5, 7)


def layer_masks(rate: float, seed: int, calls: int, size: int, count: int = 0) -> np.ndarray:
    """``(calls, size)`` booleans: which elements calls ``count .. count + calls - 1`` of a
    ``multidrop.Dropout(rate, seed=seed)`` keep, on ones."""
    import keras

    from multidrop.dropout import Dropout

    layer = Dropout(rate, seed=seed)
    layer.build((size,))
    layer.seed_generator.state.assign(np.array([seed, count], "int32"))
    x = keras.ops.ones((size,))
    return np.stack(
        [keras.ops.convert_to_numpy(layer(x, training=True)) != 0 for _ in range(calls)]
    )


def pcg64_masks(rate: float, seed: int, calls: int, size: int, count: int = 0) -> np.ndarray:
    """The same shape of masks from numpy's PCG64, one stream per (seed, count)."""
    return np.stack(
        [np.random.default_rng([seed, count + i]).random(size) >= rate for i in range(calls)]
    )


def pairs(masks: np.ndarray) -> dict:
    """Every pair of rows: the chi-square of their correlations in standard deviations
    (``z``), and the largest ``|r|``."""
    rows, size = masks.shape
    x = masks.astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r = (x @ x.T)[np.triu_indices(rows, 1)].astype(np.float64)
    chi2, n = float(np.sum(size * r**2)), r.size
    return {"z": (chi2 - n) / np.sqrt(2 * n), "max_r": float(np.abs(r).max()), "pairs": n}


def swapped(draw, seeds: int = 32, size: int = 4096) -> dict:
    """(seed s, count c) against (seed c, count s) for s < c < ``seeds``: ties of the kept
    counts (expected about 0.9% of pairs at rate 0.5, 4096 elements) and ``pairs``' z of
    the two masks' correlations."""
    a, b = [], []
    for s in range(seeds):
        for c in range(s + 1, seeds):
            a.append(draw(0.5, s, 1, size, c)[0])
            b.append(draw(0.5, c, 1, size, s)[0])
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    ties = int(np.sum(a.sum(1) == b.sum(1)))
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    r = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    n = r.size
    return {"ties": ties, "pairs": n, "z": float((np.sum(size * r**2) - n) / np.sqrt(2 * n))}


def lags(keep: np.ndarray) -> dict:
    """``{name: z}``: correlation of elements ``d`` apart, and of even against odd elements,
    in one flat mask, scaled by the square root of the number of pairs."""
    x = keep.astype(np.float64)
    x = (x - x.mean()) / x.std()

    def z(a, b):
        return float(np.mean(a * b) * np.sqrt(a.size))

    result = {f"lag {d}": z(x[:-d], x[d:]) for d in LAGS}
    result["even/odd"] = z(x[0::2], x[1::2])
    return result


def rates(draw, size: int = 2**20) -> dict:
    """``{rate: z}``: the kept fraction of one call, in standard deviations from 1 - rate."""
    result = {}
    for rate in (0.1, 0.5, 0.9):
        kept = draw(rate, 3, 1, size).mean()
        result[str(rate)] = float((kept - (1 - rate)) / np.sqrt(rate * (1 - rate) / size))
    return result


def measure(draw) -> dict:
    """Every statistic above for one way of drawing masks."""
    return {
        "calls (1024 x 4096, rate 0.5)": pairs(draw(0.5, 0, 1024, 4096)),
        "seeds 0..63 (16384 elements)": pairs(
            np.concatenate([draw(0.5, s, 1, 16384) for s in range(64)])
        ),
        "(s, c) vs (c, s), s < c < 32": swapped(draw),
        "within one call (2^20, rate 0.5)": lags(draw(0.5, 1, 1, 2**20)[0]),
        "kept fraction": rates(draw),
    }


def markdown(results: dict) -> str:
    """One row per statistic: multidrop's value and PCG64's."""
    lines = [
        "| statistic | multidrop | numpy PCG64 | independent masks |",
        "|---|---|---|---|",
    ]
    mine, theirs = results["multidrop"], results["pcg64"]
    for group, values in mine.items():
        for key, value in values.items():
            if key == "pairs":
                continue
            expected = {"z": "N(0, 1)", "max_r": "< 0.12", "ties": "~4.4 of 496"}.get(
                key, "N(0, 1)"
            )
            cells = [f"{group}: {key}", _fmt(value), _fmt(theirs[group][key]), expected]
            lines.append("| " + " | ".join(cells) + " |")
    caption = (
        f"Mask statistics, {results['backend']}, {results['date']}, {results['machine']}. "
        "z: standard deviations from what independent fair draws give; max_r: the largest "
        "correlation between two masks."
    )
    return "\n".join(lines) + "\n\n" + caption + "\n"


def _machine() -> str:
    """The CPU's model name and cores, and the system (the statistics need no accelerator)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        name = next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {platform.system()}"


def _fmt(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:+.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mask_stats")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)
    import keras

    results = {
        "backend": keras.backend.backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "multidrop": measure(layer_masks),
        "pcg64": measure(pcg64_masks),
    }
    table = markdown(results)
    print(table)
    benchmarks.save(args.out, "mask_stats", results, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
