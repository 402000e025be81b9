"""Benchmark results as a markdown table, a JSON file and a PNG chart.

Example:
    >>> print(report.markdown(results))
    >>> report.write(results, pathlib.Path("benchmarks/results"), table)  # bench_torch.json, ...
"""

from __future__ import annotations

import pathlib

import matplotlib

import benchmarks

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DROPOUTS = ("keras", "multidrop", "multidrop seeded")
LABELS = {
    "keras": "Keras Dropout",
    "multidrop": "multidrop",
    "multidrop seeded": "multidrop seeded",
    "native": "native PyTorch",
}


def markdown(results: dict) -> str:
    """One row per model and mode: step time, added ms (median ±half IQR) and ratios."""
    native = results["backend"] == "torch"
    reference = "native" if native else "keras"
    header = ["model", "jit_compile", "batch", "sites", "step ms, no dropout"]
    header += ["native PyTorch added ms"] * native + [f"{LABELS[d]} added ms" for d in DROPOUTS]
    header += [
        "seeded / unseeded",
        "floor ms",
        "peak MiB (none / multidrop)",
        f"saved B/elem ({'native / ' * native}Keras / multidrop)",
    ]
    rows = []
    for row in results["rows"]:
        added = row["added"]
        cells = [
            row["model"],
            str(row["mode"] == "compiled"),
            str(row["batch"]),
            str(row["sites"]),
            _ms(row["variants"]["none"]),
        ]
        if native:
            cells.append(_ms(added["native"]))
        for name in DROPOUTS:
            ratio = row["ratios"].get(f"{name}/{reference}")
            cells.append(
                _ms(added[name])
                + ("" if ratio is None or name == reference else f" ({ratio:.2f}×)")
            )
        cells.append(_ratio(row["ratios"]["multidrop seeded/multidrop"]))
        cells.append("n/a" if row["floor_ms"] is None else f"{row['floor_ms']:.3f}")
        peaks = [row["variants"][v]["peak_mib"] for v in ("none", "multidrop")]
        cells.append("n/a" if None in peaks else " / ".join(f"{p:.0f}" for p in peaks))
        saved = row.get("saved_bytes_per_element")
        names = ("native", "keras", "multidrop") if native else ("keras", "multidrop")
        cells.append("n/a" if not saved else " / ".join(f"{saved[n]:.2f}" for n in names))
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    against = (
        "native PyTorch's added time (nn.Dropout at the same sites)"
        if native
        else "Keras Dropout's"
    )
    settings = results["settings"]
    caption = (
        f"{results['backend']} backend, {results['device']}; rate {settings['rate']}, median of "
        f"{settings['reps']} interleaved samples of {settings['steps']} steps (±half the "
        f"interquartile range); (n×) = added time over {against}. Saved B/elem: the bytes "
        "autograd keeps for backward per dropout element, over the model without dropout "
        "(one eager forward pass; PyTorch only)."
    )
    return "\n".join(lines) + "\n\n" + caption + "\n"


def write(results: dict, out: pathlib.Path, table: str) -> list[pathlib.Path]:
    """Write ``bench_<backend>.json``, ``.md`` and ``.png`` into ``out``; returns their paths."""
    paths = benchmarks.save(out, f"bench_{results['backend']}", results, table)
    paths.append(out / f"bench_{results['backend']}.png")
    chart(results, paths[2])
    return paths


def chart(results: dict, path: pathlib.Path) -> None:
    """Added ms per step of each dropout, one panel per model and mode, IQR as error bars."""
    rows = results["rows"]
    columns = min(len(rows), 4)
    lines = -(-len(rows) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 3.2 * lines), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        names = [n for n in (*DROPOUTS, "native") if n in row["added"]]
        stats = [row["added"][n] for n in names]
        medians = [s["median_ms"] for s in stats]
        errors = [
            [m - s["q1_ms"] for m, s in zip(medians, stats)],
            [s["q3_ms"] - m for m, s in zip(medians, stats)],
        ]
        ax.bar(
            range(len(names)),
            medians,
            yerr=errors,
            capsize=3,
            color=["#9e9e9e", "#1f77b4", "#6baed6", "#ff7f0e"][: len(names)],
        )
        ax.set_xticks(
            range(len(names)), [LABELS[n].replace(" ", "\n", 1) for n in names], fontsize=7
        )
        ax.set_title(f"{row['model']}, {row['mode']} (batch {row['batch']})", fontsize=9)
        ax.set_ylabel("added ms per step", fontsize=8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    figure.suptitle(
        f"Cost of dropout after every activation: {results['backend']}, {results['device']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ms(stat: dict) -> str:
    half = (stat["q3_ms"] - stat["q1_ms"]) / 2
    digits = 2 if abs(stat["median_ms"]) < 10 else 1
    return f"{stat['median_ms']:.{digits}f} ±{half:.{digits}f}"


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
