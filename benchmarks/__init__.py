"""Training-overhead benchmarks: what dropout after every activation costs per step.

Run from the repository root (the package is not installed with multidrop):

    python -m benchmarks --help
    python -m benchmarks                      # PyTorch: mlp and cnn, eager and compiled
    python -m benchmarks --quick              # a tiny MLP in a few seconds (what the tests run)

Modules: ``models`` (the Keras models and their dropout variants), ``twins``
(pure-PyTorch twins with nn.Dropout), ``timing`` (interleaved timing, the
device), ``report`` (markdown, JSON, PNG), ``run`` (the command line). The other
benchmarks (``floor``, ``mask_stats``, ``battery``, ``cold_start``, ...) each write their
results with `save`.
"""

from __future__ import annotations

import json
import pathlib


def save(out: pathlib.Path, name: str, results: dict, table: str) -> list[pathlib.Path]:
    """Write ``<name>.json`` (``results``) and ``<name>.md`` (``table``) into ``out``, made
    if missing; returns their paths.

    Example:
        >>> save(pathlib.Path("benchmarks/results"), "mask_stats", results, markdown(results))
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(results, indent=2) + "\n")
    paths[1].write_text(table)
    return paths
