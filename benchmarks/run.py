"""What dropout costs per training step: the command line behind ``python -m benchmarks``.

For each model and mode (``jit_compile`` off and on) it times, interleaved in
one process: the model without dropout; with a dropout after every hidden
activation placed by Keras' ``clone_model`` recipe, by multidrop unseeded and
by multidrop seeded; and, on the PyTorch backend, a pure-PyTorch twin with and
without ``nn.Dropout`` at the same sites. It prints a markdown table and writes
``bench_<backend>.json``, ``.md`` and ``.png`` into ``--out``.

Example:
    $ python -m benchmarks                 # PyTorch: mlp and cnn, eager and compiled
    $ python -m benchmarks --backend jax --models mlp,cnn,transformer,resnet50
    $ python -m benchmarks --quick         # a tiny MLP, a few seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import sys

MODELS = ("mlp", "cnn", "transformer", "resnet50")
MODES = ("eager", "compiled")
QUICK = {"size": "quick", "models": "mlp", "modes": "eager", "reps": 3, "warmup": 1, "steps": 1}
DEFAULTS = {"models": "mlp,cnn", "modes": "eager,compiled", "reps": 15, "warmup": 3, "steps": 3}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "jax", "tensorflow"),
        help="Keras backend (default: $KERAS_BACKEND, else torch)",
    )
    parser.add_argument(
        "--models", help=f"comma-separated, from {','.join(MODELS)} (default: mlp,cnn)"
    )
    parser.add_argument(
        "--modes",
        help="comma-separated: eager (jit_compile=False), compiled "
        "(jit_compile=True) (default: both)",
    )
    parser.add_argument(
        "--size",
        choices=("quick", "cpu", "gpu"),
        help="model and batch sizes (default: gpu on a GPU, else cpu)",
    )
    parser.add_argument("--reps", type=int, help="interleaved samples per variant (default: 15)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 3)")
    parser.add_argument("--steps", type=int, help="steps per sample (default: 3)")
    parser.add_argument("--rate", type=float, default=0.2, help="dropout rate (default: 0.2)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for torch and tensorflow (default: theirs)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the quickest run: a tiny MLP, eager, 3 samples"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("benchmarks/results"),
        help="output directory (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models, args.modes = args.models.split(","), args.modes.split(",")
    for name, chosen, valid in (("--models", args.models, MODELS), ("--modes", args.modes, MODES)):
        unknown = [c for c in chosen if c not in valid]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {','.join(valid)}")
    if min(args.reps, args.steps) < 1 or args.warmup < 0:
        parser.error("--reps and --steps must be at least 1, --warmup at least 0")
    if not 0 < args.rate < 1:
        parser.error(f"--rate must lie strictly between 0 and 1, got {args.rate}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != args.backend:
            raise SystemExit(
                f"--backend {args.backend}: Keras is already imported with another backend."
            )
        os.environ["KERAS_BACKEND"] = args.backend
    import keras

    from benchmarks import report, timing

    _set_threads(args.threads)
    timing.kernels_ready()
    device = timing.Device.detect()
    size = args.size or ("gpu" if device.gpu else "cpu")
    bandwidth = device.bandwidth_gbps()
    print(f"benchmarking on {keras.backend.backend()}, {device.describe()}", file=sys.stderr)
    results = {
        "backend": keras.backend.backend(),
        "device": device.describe(),
        "gpu": device.gpu,
        "bandwidth_gbps": bandwidth,
        "versions": _versions(),
        "settings": {
            "rate": args.rate,
            "reps": args.reps,
            "warmup": args.warmup,
            "steps": args.steps,
            "size": size,
            "threads": args.threads,
        },
        "rows": [
            _benchmark(name, mode, size, args, device, bandwidth)
            for name in args.models
            for mode in args.modes
        ],
    }
    table = report.markdown(results)
    print(table)
    for path in report.write(results, args.out, table):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _benchmark(name, mode, size_name, args, device, bandwidth) -> dict:
    """Time every variant of one model in one mode; one row of the results."""
    import keras
    import numpy as np

    from benchmarks import models, timing

    print(f"{name}, {mode}", file=sys.stderr)
    if mode == "compiled" and keras.backend.backend() == "torch":
        _fresh_dynamo()
    spec = models.SPECS[name]
    size = spec.sizes[size_name]
    keras.utils.set_random_seed(0)
    model = spec.build(size)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(size.batch, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, models.CLASSES, size.batch)
    steps = {}
    variants = models.keras_variants(model, args.rate)
    for variant, net in variants.items():
        net.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=mode == "compiled",
        )
        steps[variant] = functools.partial(
            net.train_on_batch, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        )
    shapes = models.sites(model, args.rate)
    elements = size.batch * sum(int(np.prod(shape)) for shape in shapes)
    saved = None
    if keras.backend.backend() == "torch":
        twin_steps, twin_nets = _twins(name, size, args.rate, len(shapes), x, y, mode == "compiled")
        steps.update(twin_steps)
        saved = _saved_per_element(variants, twin_nets, x, elements)
    samples = timing.interleave(steps, device, reps=args.reps, warmup=args.warmup, steps=args.steps)

    ms = {v: s["ms"] for v, s in samples.items()}
    added = {v: timing.added(ms[v], ms["none"]) for v in ("keras", "multidrop", "multidrop seeded")}
    if "torch dropout" in ms:
        added["native"] = timing.added(ms["torch dropout"], ms["torch none"])
    ratios = {
        "multidrop seeded/multidrop": timing.ratio(added["multidrop seeded"], added["multidrop"])
    }
    for v in ("keras", "multidrop", "multidrop seeded"):
        ratios[f"{v}/native"] = timing.ratio(added[v], added.get("native"))
        ratios[f"{v}/keras"] = timing.ratio(added[v], added["keras"])
    # float32: forward reads x, writes y and a 1-byte mask; backward reads dy and mask, writes dx
    floor_bytes = elements * (4 * 4 + 2)
    return {
        "model": name,
        "mode": mode,
        "batch": size.batch,
        "input_shape": list(model.input_shape[1:]),
        "sites": len(shapes),
        "dropout_elements": elements,
        "floor_bytes": floor_bytes,
        "floor_ms": None if bandwidth is None else floor_bytes / bandwidth / 1e6,
        "variants": {
            v: {**timing.summary(s["ms"]), "peak_mib": s["peak_mib"], "samples_ms": s["ms"]}
            for v, s in samples.items()
        },
        "added": added,
        "seeded_minus_unseeded": timing.added(ms["multidrop seeded"], ms["multidrop"]),
        "ratios": ratios,
        "saved_bytes_per_element": saved,
    }


def _twins(name, size, rate, sites, x, y, compiled) -> tuple[dict, dict]:
    """``torch none`` and ``torch dropout``, the twin without and with nn.Dropout: their
    training steps, and the nets."""
    import torch

    from benchmarks import twins

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tx = twins.to_twin_input(torch.from_numpy(x)).to(device)
    ty = torch.from_numpy(y).to(device)
    steps, nets = {}, {}
    for variant, r in (("torch none", 0.0), ("torch dropout", rate)):
        net = nets[variant] = twins.build(name, size, r).to(device)
        found = sum(isinstance(m, torch.nn.Dropout) for m in net.modules())
        if r and found != sites:
            raise AssertionError(f"the {name} twin has {found} dropout sites, multidrop {sites}")
        step = twins.train_step(net, compiled)
        steps[variant] = functools.partial(step, tx, ty)
    return steps, nets


def _saved_per_element(variants: dict, twin_nets: dict, x, elements: int) -> dict:
    """Bytes autograd keeps for backward per dropout element, over the model without
    dropout: one eager forward pass in training mode of each Keras variant and twin."""
    import torch

    from benchmarks import timing, twins

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kx = torch.from_numpy(x).to(device)
    tx = twins.to_twin_input(kx)
    saved = {
        v: timing.saved_bytes(lambda n=net: n(kx, training=True)) for v, net in variants.items()
    }
    saved.update({v: timing.saved_bytes(lambda n=net: n(tx)) for v, net in twin_nets.items()})
    per_element = {v: (saved[v] - saved["none"]) / elements for v in variants if v != "none"}
    per_element["native"] = (saved["torch dropout"] - saved["torch none"]) / elements
    return per_element


def _fresh_dynamo() -> None:
    """Forget earlier compilations. Every Keras model's train step is one code object
    to torch.compile, so the variants of a model need a cache entry each."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)


def _set_threads(threads) -> None:
    if threads is None:
        return
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _versions() -> dict:
    import importlib.metadata

    names = ("keras", "torch", "jax", "tensorflow", "multidrop")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), **found}
