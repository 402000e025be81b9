"""Interleaved timing of training steps, bytes saved for backward, and the device.

Every variant of one model is timed in the same process, round-robin: each
repetition times ``steps`` consecutive steps of every variant once, the order
rotating from one repetition to the next, so that a slow spell of the machine
lands on all variants alike. Added time is then taken per repetition, between
two variants timed moments apart (a paired difference), and summarised by its
median and interquartile range.

Example:
    >>> device = Device.detect()
    >>> samples = interleave({"none": a, "dropout": b}, device, reps=15, warmup=3, steps=3)
    >>> added(samples["dropout"]["ms"], samples["none"]["ms"])   # {"median_ms": ..., ...}
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import keras
import numpy as np
import rich.console
import rich.progress


@dataclasses.dataclass
class Device:
    """The device Keras runs on: a name, how to wait for it, and its peak memory."""

    backend: str
    gpu: bool
    name: str

    @classmethod
    def detect(cls) -> Device:
        backend = keras.backend.backend()
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return cls(backend, True, torch.cuda.get_device_name())
            return cls(backend, False, f"torch threads: {torch.get_num_threads()}")
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            gpu = device.platform == "gpu"
            return cls(backend, gpu, device.device_kind if gpu else "")
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return cls(backend, bool(gpus), gpus[0].name if gpus else "")

    def describe(self) -> str:
        if self.gpu:
            return f"GPU {self.name}"
        cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        return f"CPU ({'; '.join(filter(None, (self.name, cpu)))})"

    def sync(self) -> None:
        """Wait until the device has finished the work queued so far (GPU only)."""
        if not self.gpu:
            return
        if self.backend == "torch":
            import torch

            torch.cuda.synchronize()
        elif self.backend == "jax":
            import jax

            jax.effects_barrier()
        else:
            import tensorflow as tf

            tf.test.experimental.sync_devices()

    def reset_peak_memory(self) -> None:
        if self.gpu and self.backend == "torch":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_memory_mib(self) -> float | None:
        """Peak device memory (MiB) since the last reset: PyTorch on a GPU, else None."""
        if self.gpu and self.backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        return None

    def bandwidth_gbps(self) -> float | None:
        """Measured device memory bandwidth (GB/s) of a large copy, on a PyTorch GPU; else None."""
        if not (self.gpu and self.backend == "torch"):
            return None
        import torch

        source = torch.empty(2**28, dtype=torch.uint8, device="cuda")
        target = torch.empty_like(source)
        best = float("inf")
        for _ in range(10):
            self.sync()
            start = time.perf_counter()
            target.copy_(source)
            self.sync()
            best = min(best, time.perf_counter() - start)
        return 2 * source.numel() / best / 1e9


def kernels_ready() -> None:
    """On PyTorch's CPU, wait until multidrop's dropout kernel is built (`multidrop.prebuilt`,
    float32, on one thread and on all of PyTorch's), so that no timing runs its eager
    stand-in. Elsewhere nothing to wait for."""
    if keras.backend.backend() != "torch":
        return
    import torch

    from multidrop import prebuilt

    if not torch.cuda.is_available():
        for threads in sorted({1, torch.get_num_threads()}):
            prebuilt.wait(torch.float32, threads)


def interleave(
    steps_by_name: dict,
    device: Device,
    *,
    reps: int,
    warmup: int,
    steps: int,
    clock=time.perf_counter,
) -> dict:
    """Time each ``step()`` round-robin; returns ``{name: {"ms": [...], "peak_mib": ...}}``.

    Each callable runs ``warmup`` times first (compilation happens there); then
    each of ``reps`` samples is the mean time of ``steps`` consecutive steps, read
    from ``clock`` (wall time; ``time.process_time``, this process's CPU time, is
    steadier on a shared machine for one thread).
    """
    names = list(steps_by_name)
    results = {name: {"ms": [], "peak_mib": None} for name in names}
    with rich.progress.Progress(
        console=rich.console.Console(stderr=True), transient=True
    ) as progress:
        task = progress.add_task("warm-up", total=len(names) * (warmup + reps))
        for name in names:
            for _ in range(warmup):
                steps_by_name[name]()
                progress.advance(task)
        device.sync()
        progress.update(task, description="timing")
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                device.reset_peak_memory()
                device.sync()
                start = clock()
                for _ in range(steps):
                    steps_by_name[name]()
                device.sync()
                results[name]["ms"].append((clock() - start) / steps * 1e3)
                peak = device.peak_memory_mib()
                if peak is not None:
                    results[name]["peak_mib"] = max(peak, results[name]["peak_mib"] or 0.0)
                progress.advance(task)
    return results


def saved_bytes(forward) -> int:
    """Bytes of the tensors PyTorch's autograd saves for backward while ``forward()`` runs,
    each storage counted once (weights included: subtract a baseline's)."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def summary(samples: list[float]) -> dict:
    """Median, quartiles, min and max of a list of milliseconds."""
    q1, median, q3 = np.percentile(samples, [25, 50, 75])
    return {
        "median_ms": float(median),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "min_ms": min(samples),
        "max_ms": max(samples),
    }


def added(samples: list[float], baseline: list[float]) -> dict:
    """The time ``samples`` add over ``baseline``, from the per-repetition differences."""
    return summary([a - b for a, b in zip(samples, baseline)])


def ratio(a: dict | None, b: dict | None) -> float | None:
    """``a``'s median added time over ``b``'s; None if either is missing or ``b`` is not > 0."""
    if a is None or b is None or b["median_ms"] <= 0:
        return None
    return a["median_ms"] / b["median_ms"]
