"""PyTorch's CPU dropout kernel: compiled once per machine, in the background; loaded in ms.

`multidrop.Dropout`'s kernel (hash, threshold and multiply in one pass: `dropout._kernel`)
needs a compiler to run at full speed, and Inductor's first compile in a fresh process
takes 15-30 s on a small CPU, with another 3-5 s in every later process even when its
disk cache is warm. So the CPU kernel is not compiled in the user's process: the first
training call starts ``python -m multidrop.prebuilt`` in a subprocess, which exports the
kernel with ``torch.export`` and compiles it with AOTInductor into one ``.pt2`` file per
(kernel source, PyTorch version, CPU, dtype, threads) in the cache folder. Until the file
is there the layer runs the same kernel as eager tensor ops (the same bits, slower at
large sizes); once it is there, every process on the machine loads it in a few
milliseconds, with no Dynamo guards on the call (about 8 us per call at 4K elements).

The cache folder is ``$MULTIDROP_CACHE`` or ``~/.cache/multidrop`` (``$XDG_CACHE_HOME``
respected). Should a build fail (no C++ compiler, no writable cache) the layer warns
once, with the build's last words, and stays on the eager ops.

Example:
    >>> from multidrop import prebuilt
    >>> prebuilt.kernel(torch.float32, threads=1)     # None until built; the build starts
    >>> prebuilt.wait(torch.float32, threads=1)       # block until built (tests, benchmarks)
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from multidrop import dropout

_POLL = 0.5  # seconds between looks for a build's file
_STALE = 1800  # seconds after which a build lock counts as abandoned
_BUILDS: dict = {}  # (dtype, threads) -> _Build


def kernel(dtype: torch.dtype, threads: int):
    """The compiled kernel for flat CPU tensors of ``dtype`` on ``threads`` threads, called
    as ``kernel(x, state, t, scale) -> (y, after, before)``; None while it is being built
    (the first call starts the build) or when building failed (after one warning)."""
    build = _BUILDS.get((dtype, threads))
    if build is None:
        build = _BUILDS[dtype, threads] = _Build(dtype, threads)
    return build.poll()


def wait(dtype: torch.dtype, threads: int, timeout: float = 1800):
    """`kernel`, blocking until it is built (raises ``RuntimeError`` if the build fails or
    takes longer than ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while (runner := kernel(dtype, threads)) is None:
        build = _BUILDS[dtype, threads]
        if build.failed:
            raise RuntimeError(f"multidrop: building the dropout kernel failed: {build.failed}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"multidrop: the dropout kernel was not built in {timeout} s")
        time.sleep(0.05)
    return runner


def cache_folder() -> pathlib.Path:
    """Where the compiled kernels live: ``$MULTIDROP_CACHE``, else ``multidrop`` in
    ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    if "MULTIDROP_CACHE" in os.environ:
        return pathlib.Path(os.environ["MULTIDROP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "multidrop"


def path(dtype: torch.dtype, threads: int) -> pathlib.Path:
    """The ``.pt2`` file of a kernel: its name hashes everything the compiled code depends
    on (the source of `multidrop.dropout`, PyTorch, Python, the CPU's instruction set,
    dtype, threads)."""
    source = pathlib.Path(dropout.__file__).read_text()  # the kernel and all it calls
    cpu = torch.backends.cpu.get_cpu_capability() + platform.machine() + _cpu_flags()
    key = "|".join((source, torch.__version__, sys.version, cpu, str(dtype), str(threads)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_folder() / f"dropout-{str(dtype).removeprefix('torch.')}-{threads}t-{digest}.pt2"


def _cpu_flags() -> str:
    """The CPU's feature flags (Inductor compiles for ``-march=native``), where Linux says."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


class _Build:
    """One kernel: loaded from its file, or built by a detached subprocess (one per machine
    at a time, by a lock file beside it, so that it may outlive this process and finish the
    cache for the next), looked for every `_POLL` seconds."""

    def __init__(self, dtype: torch.dtype, threads: int):
        self.dtype, self.threads = dtype, threads
        self.file = path(dtype, threads)
        self.lock, self.log = self.file.with_suffix(".lock"), self.file.with_suffix(".log")
        self.runner = None
        self.building = False  # this process launched the build, or saw another's lock
        self.failed = ""
        self.next_look = 0.0

    def poll(self):
        if self.runner is not None or self.failed:
            return self.runner
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + _POLL
        if self.file.exists():
            try:
                self.runner = _load(self.file)
            except Exception as error:  # a damaged file: say so, run eager
                self._fail(f"cannot load {self.file} ({error!r}); delete it to build it again")
        elif _stale(self.lock):
            self.lock.unlink(missing_ok=True)  # its builder died: build again
            self.building = False
        elif not self.lock.exists():
            if self.building:  # the build ended without its file
                self._fail(self.log.read_text(errors="replace") if self.log.exists() else "")
            elif not any(b.building and b.lock.exists() for b in _BUILDS.values()):
                self._start()  # one build at a time from this process
        else:
            self.building = True
        return self.runner

    def _start(self) -> None:
        try:
            self.lock.parent.mkdir(parents=True, exist_ok=True)
            lock = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError as error:
            if isinstance(error, FileExistsError) and self.lock.parent.is_dir():
                self.building = True  # another process builds it: keep looking for the file
            else:
                self._fail(f"cannot write to the cache folder {self.lock.parent}: {error}")
            return
        os.close(lock)
        self.building = True
        command = _command(self.file, self.dtype, self.threads)
        launch = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
        here = str(pathlib.Path(dropout.__file__).parents[1])  # multidrop importable there too
        paths = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
        env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": paths}
        with open(self.log, "wb") as log:  # the launcher exits at once; the build goes on
            subprocess.run(
                [sys.executable, "-c", launch, *command], stdout=log, stderr=log, env=env
            )

    def _fail(self, why: str) -> None:
        self.failed = why.strip()[-600:] or "no message"
        warnings.warn(
            f"multidrop: building the dropout kernel failed ({self.failed}); running it as "
            "slower eager tensor ops (the same masks).",
            RuntimeWarning,
            stacklevel=4,
        )


def _stale(lock: pathlib.Path) -> bool:
    """Whether ``lock`` is held by a build that is no longer running: its builder wrote
    ``host pid`` into it and is gone from this host, or it is older than `_STALE` seconds."""
    try:
        host, _, pid = lock.read_text().partition(" ")
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False  # no lock
    if host == socket.gethostname() and pid.isdigit() and os.name == "posix":
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    return age > _STALE


def _command(file: pathlib.Path, dtype: torch.dtype, threads: int) -> list[str]:
    """The build's command line: this module as a script."""
    name = str(dtype).removeprefix("torch.")
    return [sys.executable, "-m", "multidrop.prebuilt", str(file), name, str(threads)]


def _load(file: pathlib.Path):
    """A compiled package as a plain function: PyTorch's C++ loader (microseconds per call),
    or its public Python wrapper where the loader's signature differs. The package reads
    ``x`` as contiguous memory, so a strided ``x`` (an expanded gradient has stride 0) is
    made contiguous first."""
    try:
        run = torch._C._aoti.AOTIModelPackageLoader(str(file), "model", False, 1, -1).run
    except (AttributeError, TypeError, RuntimeError):
        from torch._inductor import aoti_load_package

        package = aoti_load_package(str(file))
        run = lambda args: package(*args)  # noqa: E731

    def kernel(x, state, t, scale):
        return run([x.contiguous(), state, t, scale])

    return kernel


def build(file: pathlib.Path, dtype: torch.dtype, threads: int) -> None:
    """Export `dropout._kernel` for flat ``dtype`` tensors of any size and compile it with
    AOTInductor on ``threads`` threads into ``file`` (written whole or not at all)."""
    from torch._inductor import aoti_compile_and_package

    torch.set_num_threads(threads)

    class Kernel(torch.nn.Module):
        def forward(self, x, state, t, scale):
            return dropout._kernel(x, state, t, scale)

    x = torch.ones(4096, dtype=dtype)
    args = (x, torch.zeros(2, dtype=torch.int32), torch.zeros((), dtype=torch.int32))
    args += (torch.ones((), dtype=dtype),)
    size = torch.export.Dim("size", min=2, max=2**31 - 1)
    program = torch.export.export(Kernel(), args, dynamic_shapes=({0: size}, None, None, None))
    with tempfile.TemporaryDirectory(dir=file.parent) as folder:
        package = aoti_compile_and_package(program, package_path=os.path.join(folder, file.name))
        os.replace(package, file)


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    target.with_suffix(".lock").write_text(f"{socket.gethostname()} {os.getpid()}")
    try:
        build(target, getattr(torch, sys.argv[2]), int(sys.argv[3]))
    finally:  # after the file is in place: a lock gone without a file means a failed build
        target.with_suffix(".lock").unlink(missing_ok=True)
