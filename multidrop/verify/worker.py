"""One backend's side of `cross_backend`: ``python -m multidrop.verify.worker MODEL TMP BACKEND
[MODULE...]``.

`cross_backend` starts one worker per backend, with ``KERAS_BACKEND`` set. The
worker loads the ``.keras`` file MODEL, inserts dropout with the `Options`
(or sets the layers' own rates with the `SetOptions`) pickled in TMP, checks
the clone bitwise against the original on the inputs saved in TMP, and writes
its `BackendRun` (report and outputs) back into TMP.

Example:
    $ KERAS_BACKEND=jax python -m multidrop.verify.worker model.keras /tmp/run jax
"""

from __future__ import annotations

import dataclasses
import importlib
import pathlib
import pickle
import sys

import keras
import numpy as np

import multidrop
from multidrop.options import SetOptions
from multidrop.verify import backends, compare, inputs


def main(model_path: str, tmp: str, backend: str, *modules: str) -> None:
    """Load, rewire, verify, and write the `BackendRun` to ``backends.result_path(tmp, backend)``.

    Args:
        model_path: the ``.keras`` file.
        tmp: the folder `cross_backend` shares with its workers.
        backend: the backend this process must run, as ``KERAS_BACKEND`` names it.
        modules: imported before the model loads (where its classes are registered).

    Example:
        >>> main("model.keras", "/tmp/run", "torch")   # in a process with KERAS_BACKEND=torch
    """
    tmp = pathlib.Path(tmp)
    backends.started_path(tmp, backend).touch()
    if keras.backend.backend() != backend:
        raise RuntimeError(f"KERAS_BACKEND={backend} but Keras runs {keras.backend.backend()}")
    for module in modules:
        importlib.import_module(module)
    model = keras.saving.load_model(model_path)
    opts = pickle.loads((tmp / backends.OPTIONS).read_bytes())
    with np.load(tmp / backends.INPUTS) as arrays:
        x = inputs.pack(model, [arrays[f"arr_{i}"] for i in range(len(arrays.files))])
    edit = multidrop.set_dropout if isinstance(opts, SetOptions) else multidrop.insert_dropout
    rewired = edit(model, **dataclasses.asdict(opts))
    atol = rtol = 0.0  # bitwise, unless a changed rate makes Keras pick another kernel
    if isinstance(opts, SetOptions) and any(
        change.kernel for change in multidrop.set_plan(model, **dataclasses.asdict(opts))
    ):
        atol, rtol = compare.tolerance_for(backends.working_dtype(model))
    report, outputs = compare.compare_models(model, rewired, x, atol, rtol)
    version = f"{backend} {importlib.import_module(backend).__version__}"
    run = backends.BackendRun(
        backend, "ok" if report.ok else "mismatch", version=version, report=report, outputs=outputs
    )
    backends.result_path(tmp, backend).write_bytes(pickle.dumps(run))


if __name__ == "__main__":
    main(*sys.argv[1:])
