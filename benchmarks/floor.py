"""One dropout site against the memory floor: ``python -m benchmarks.floor``.

Dropout is a memory-bound elementwise op: forward and backward together must
read the input and the incoming gradient and write the output and the outgoing
gradient. The floor is the same shapes through ``y = x * c`` (``c = 1``, a
runtime value no compiler folds away), forward and backward. At sizes from 4K
to 16M elements this times, interleaved in one process per backend, the floor,
the framework's native dropout (``torch.nn.functional.dropout``,
``tf.nn.dropout``, a ``jax.random.bernoulli`` mask as Flax's Dropout draws it),
Keras' Dropout (unseeded) and multidrop's, unseeded and seeded: PyTorch eager
and ``torch.compile``-d, JAX under ``jit``, TensorFlow under ``tf.function``.
It prints a markdown table (ms, and ratios to the floor and to native; on
PyTorch also the bytes autograd keeps for backward per element) and writes
``floor.json``, ``floor.md`` and ``floor.png`` (ratio to the floor against
size) into ``--out``.

Example:
    $ python -m benchmarks.floor                       # torch, jax, tensorflow: a few minutes
    $ python -m benchmarks.floor --backend torch --threads 1
    $ python -m benchmarks.floor --quick               # two small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

BACKENDS = ("torch", "jax", "tensorflow")
MODES = {"torch": ("eager", "compiled"), "jax": ("jit",), "tensorflow": ("function",)}
VARIANTS = ("floor", "native", "keras", "multidrop", "multidrop seeded")
SIZES = tuple(4096 * 4**k for k in range(7))  # 4K .. 16M elements
QUICK = {"sizes": "4096,65536", "reps": 3, "modes": "eager,jit,function"}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--backend",
        choices=(*BACKENDS, "all"),
        default="all",
        help="Keras backend; all runs one subprocess each (default: all)",
    )
    parser.add_argument(
        "--sizes", help="comma-separated element counts (default: 4096 * 4**k, up to 16M)"
    )
    parser.add_argument(
        "--sites",
        action="store_true",
        help="also the dropout sites' shapes of the model benchmark (cpu sizes)",
    )
    parser.add_argument(
        "--modes",
        help="comma-separated, from eager,compiled (torch), jit (jax), "
        "function (tensorflow) (default: all)",
    )
    parser.add_argument("--rate", type=float, default=0.2, help="dropout rate (default: 0.2)")
    parser.add_argument(
        "--reps", type=int, default=9, help="interleaved samples per variant (default: 9)"
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: the frameworks')")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared "
        "machine with --threads 1) (default: wall)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4K and 64K elements, eager PyTorch, 3 samples: a smoke test",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("benchmarks/results"),
        help="output directory (default: benchmarks/results)",
    )
    parser.add_argument("--json", type=pathlib.Path, help=argparse.SUPPRESS)  # a child's results
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else {}).items():
        if getattr(args, key) in (None, parser.get_default(key)):
            setattr(args, key, value)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    except ValueError:
        parser.error(f"--sizes takes comma-separated integers, got {args.sizes!r}")
    valid = [m for modes in MODES.values() for m in modes]
    args.modes = args.modes.split(",") if args.modes else valid
    unknown = [m for m in args.modes if m not in valid]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {','.join(valid)}")
    if min(args.sizes) < 1 or args.reps < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--sizes, --reps and --threads must be at least 1")
    if not 0 < args.rate < 1:
        parser.error(f"--rate must lie strictly between 0 and 1, got {args.rate}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.backend == "all":
        results = [_child(backend, argv) for backend in BACKENDS]
    else:
        results = [_run_backend(args)]
        if args.json:  # a child of --backend all: the parent reports
            args.json.write_text(json.dumps(results[0]))
            return 0
    merged = {
        "machine": results[0]["machine"],
        "settings": results[0]["settings"],
        "backends": {r["backend"]: r for r in results},
    }
    table = markdown(merged)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floor.json").write_text(json.dumps(merged, indent=2) + "\n")
    (args.out / "floor.md").write_text(table)
    chart(merged, args.out / "floor.png")
    for name in ("floor.json", "floor.md", "floor.png"):
        print(f"wrote {args.out / name}", file=sys.stderr)
    return 0


def _child(backend: str, argv) -> dict:
    """Run one backend in a subprocess (a process imports Keras with one backend)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "results.json"
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [
            sys.executable,
            "-m",
            "benchmarks.floor",
            *argv,
            "--backend",
            backend,
            "--json",
            str(out),
        ]
        subprocess.run(command, env=env, check=True)
        return json.loads(out.read_text())


# ---- one backend, in this process ----------------------------------------------------------


def _run_backend(args) -> dict:
    os.environ["KERAS_BACKEND"] = args.backend
    if args.backend == "jax" and args.threads == 1:  # before jax is imported
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
            "=false intra_op_parallelism_threads=1"
        )
    import keras

    from benchmarks import run, timing

    if keras.backend.backend() != args.backend:
        raise SystemExit(f"--backend {args.backend}: Keras is imported with another backend.")
    run._set_threads(args.threads)
    timing.kernels_ready()
    device = timing.Device.detect()
    threads = _threads(args.backend)
    print(
        f"floor benchmark: {args.backend}, {device.describe()}, {threads} threads", file=sys.stderr
    )
    shapes = [_shape(n) for n in args.sizes] + (_site_shapes(args.rate) if args.sites else [])
    modes = [m for m in MODES[args.backend] if m in args.modes]
    rows = []
    for shape in shapes:
        steps, memory = {}, {}
        for mode in modes:
            for variant in VARIANTS:
                steps[(mode, variant)] = _step(args.backend, mode, variant, shape, args.rate)
        if args.backend == "torch":
            memory = {v: _saved_per_element(v, shape, args.rate) for v in VARIANTS}
        elements = _prod(shape)
        per_sample = max(1, min(64, 2**20 // elements))  # ~1M elements of work per sample
        names = {f"{m}|{v}": step for (m, v), step in steps.items()}
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        samples = timing.interleave(
            names, device, reps=args.reps, warmup=2, steps=per_sample, clock=clock
        )
        for mode in modes:
            ms = {v: samples[f"{mode}|{v}"]["ms"] for v in VARIANTS}
            rows.append(
                {
                    "mode": mode,
                    "shape": list(shape),
                    "elements": elements,
                    "variants": {
                        v: {**timing.summary(ms[v]), "samples_ms": ms[v]} for v in VARIANTS
                    },
                    "saved_bytes_per_element": memory or None,
                }
            )
    return {
        "backend": args.backend,
        "machine": _machine(device),
        "threads": threads,
        "versions": run._versions(),
        "settings": {
            "rate": args.rate,
            "reps": args.reps,
            "threads": args.threads,
            "clock": args.clock,
        },
        "rows": rows,
    }


def _shape(elements: int) -> tuple:
    """A 2-d shape of ``elements`` (rows of 256 when it divides), as activations come."""
    return (elements // 256, 256) if elements % 256 == 0 else (elements,)


def _site_shapes(rate: float) -> list[tuple]:
    """The distinct dropout-site shapes (batch included) of the model benchmark's cpu sizes."""
    from benchmarks import models

    shapes = []
    for name in ("mlp", "cnn", "transformer"):
        spec = models.SPECS[name]
        size = spec.sizes["cpu"]
        for shape in models.sites(spec.build(size), rate):
            full = (size.batch, *shape)
            if full not in shapes:
                shapes.append(full)
    return shapes


def _prod(shape) -> int:
    result = 1
    for d in shape:
        result *= d
    return result


def _layer(variant: str, rate: float):
    """The Keras layer of ``variant``: Keras' Dropout, or multidrop's (seeded or not)."""
    import keras

    from multidrop.dropout import Dropout

    if variant == "keras":
        return keras.layers.Dropout(rate)
    return Dropout(rate, seed=0 if variant == "multidrop seeded" else None)


def _step(backend: str, mode: str, variant: str, shape: tuple, rate: float):
    """A callable running one forward and backward of ``variant`` on fresh-looking data."""
    return {"torch": _torch_step, "jax": _jax_step, "tensorflow": _tf_step}[backend](
        mode, variant, shape, rate
    )


def _torch_forward(variant: str, rate: float):
    import torch

    if variant == "floor":
        return lambda x: x * 1.0
    if variant == "native":
        return lambda x: torch.nn.functional.dropout(x, rate, training=True)
    layer = _layer(variant, rate)
    return lambda x: layer(x, training=True)


def _torch_step(mode, variant, shape, rate):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)
    forward = _torch_forward(variant, rate)
    if mode == "compiled":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        forward = torch.compile(forward, dynamic=False)

    def step():
        y = forward(x)
        return y, torch.autograd.grad(y, x, g)[0]

    return step


def _saved_per_element(variant: str, shape: tuple, rate: float) -> float:
    """Bytes autograd keeps for backward per element: one eager dropout after ``x * 1``."""
    import torch

    from benchmarks import timing

    x = torch.randn(shape, requires_grad=True)
    forward = _torch_forward(variant, rate)
    alone = timing.saved_bytes(lambda: forward(x * 1))
    return alone / _prod(shape)


def _jax_step(mode, variant, shape, rate):
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), "float32")
    g = jnp.asarray(np.random.default_rng(1).normal(size=shape), "float32")
    if variant in ("floor", "native"):
        state = (jnp.float32(1), jnp.uint32(0)) if variant == "floor" else (jax.random.key(0), 0)

        def forward(state, x):
            if variant == "floor":
                return x * state[0], state
            key = jax.random.fold_in(state[0], state[1])
            keep = jax.random.bernoulli(key, 1 - rate, x.shape)
            return jnp.where(keep, x / (1 - rate), 0), (state[0], state[1] + 1)
    else:
        layer = _layer(variant, rate)
        layer.build(shape)
        state = [v.value for v in layer.non_trainable_variables]

        def forward(state, x):
            return layer.stateless_call([], state, x, training=True)

    @jax.jit
    def fwd_bwd(state, x, g):
        y, vjp, state = jax.vjp(lambda x: forward(state, x), x, has_aux=True)
        return y, vjp(g)[0], state

    def step():
        nonlocal state
        y, dx, state = fwd_bwd(state, x, g)
        return jax.block_until_ready((y, dx))

    return step


def _tf_step(mode, variant, shape, rate):
    import numpy as np
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(size=shape), tf.float32)
    g = tf.constant(np.random.default_rng(1).normal(size=shape), tf.float32)
    one = tf.Variable(1.0)
    if variant == "floor":
        forward = lambda x: x * one  # noqa: E731
    elif variant == "native":
        forward = lambda x: tf.nn.dropout(x, rate)  # noqa: E731
    else:
        layer = _layer(variant, rate)
        forward = lambda x: layer(x, training=True)  # noqa: E731

    @tf.function
    def step_function(x, g):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
        return y, tape.gradient(y, x, output_gradients=g)

    return lambda: step_function(x, g)


def _threads(backend: str) -> int | None:
    if backend == "torch":
        import torch

        return torch.get_num_threads()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    return (
        1
        if "intra_op_parallelism_threads=1" in os.environ.get("XLA_FLAGS", "")
        else (os.cpu_count())
    )


def _machine(device) -> str:
    return f"{device.describe()}, {_cpu_name()}, {platform.system()} {platform.machine()}"


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        return next(
            line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line
        )
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# ---- report ----------------------------------------------------------------------------------

LABELS = {
    "floor": "floor (x * c)",
    "native": "native",
    "keras": "Keras Dropout",
    "multidrop": "multidrop",
    "multidrop seeded": "multidrop seeded",
}


def markdown(results: dict) -> str:
    """One row per backend, mode and size: ms (median ±half IQR) and ratios."""
    header = [
        "backend",
        "mode",
        "elements",
        *(f"{LABELS[v]} ms" for v in VARIANTS),
        "multidrop / floor",
        "multidrop / native",
        "seeded / unseeded",
        "saved B/elem (native / Keras / multidrop)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for backend, result in results["backends"].items():
        for row in result["rows"]:
            med = {v: s["median_ms"] for v, s in row["variants"].items()}
            cells = [backend, row["mode"], f"{row['elements']:,}"]
            if row["shape"] != list(_shape(row["elements"])):  # a model site's shape
                cells[-1] += " (" + "×".join(map(str, row["shape"])) + ")"
            for v in VARIANTS:
                ratio = "" if v == "floor" else f" ({med[v] / med['floor']:.1f}×)"
                cells.append(_ms(row["variants"][v]) + ratio)
            cells += [
                f"{med['multidrop'] / med['floor']:.2f}",
                f"{med['multidrop'] / med['native']:.2f}",
                f"{med['multidrop seeded'] / med['multidrop']:.2f}",
            ]
            saved = row["saved_bytes_per_element"]
            cells.append(
                "n/a"
                if not saved
                else " / ".join(f"{saved[v]:.2f}" for v in ("native", "keras", "multidrop"))
            )
            lines.append("| " + " | ".join(cells) + " |")
    settings = results["settings"]
    threads = ", ".join(f"{b}: {r['threads']}" for b, r in results["backends"].items())
    caption = (
        f"One dropout site, forward + backward, rate {settings['rate']}; {results['machine']}; "
        f"threads {threads}; {settings['clock']} time. Median of {settings['reps']} interleaved "
        "samples (±half the interquartile range), (n×) = over the floor. Native: "
        "torch.nn.functional.dropout, a jax.random.bernoulli mask, tf.nn.dropout. Saved "
        "B/elem: bytes autograd keeps for "
        "backward per element, one eager dropout alone (PyTorch)."
    )
    return "\n".join(lines) + "\n\n" + caption + "\n"


def chart(results: dict, path: pathlib.Path) -> None:
    """Each variant's time over the floor against size (log x), one panel per backend and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (b, m)
        for b, r in results["backends"].items()
        for m in dict.fromkeys(row["mode"] for row in r["rows"])
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for ax, (backend, mode) in zip(axes.flat, panels):
        rows = sorted(
            (r for r in results["backends"][backend]["rows"] if r["mode"] == mode),
            key=lambda r: r["elements"],
        )
        sizes = [r["elements"] for r in rows]
        for v in VARIANTS[1:]:
            ratios = [
                r["variants"][v]["median_ms"] / r["variants"]["floor"]["median_ms"] for r in rows
            ]
            ax.plot(sizes, ratios, marker="o", markersize=3, label=LABELS[v])
        ax.axhline(1, color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{backend}, {mode}", fontsize=9)
        ax.set_xlabel("elements", fontsize=8)
        ax.set_ylabel("time / floor", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(f"One dropout site, forward + backward: {results['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ms(stat: dict) -> str:
    half = (stat["q3_ms"] - stat["q1_ms"]) / 2
    digits = 3 if stat["median_ms"] < 1 else 2 if stat["median_ms"] < 10 else 1
    return f"{stat['median_ms']:.{digits}f} ±{half:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
