"""Proof that rewiring changed nothing at inference: in one process, and across backends.

``verify`` runs the original and the rewired model on the same inputs with
``training=False`` and compares every output bitwise. ``cross_backend`` runs
the same saved model on PyTorch, JAX and TensorFlow, one subprocess each
(Keras fixes its backend once per process): each subprocess loads the model,
inserts dropout, verifies the clone bitwise and records its outputs on one
shared input; the parent then compares every pair of backends within
tolerances taken from the model's dtype.

Modules, one job each: `compare` (outputs compared, `verify`, tolerances by
dtype), `inputs` (generated, flattened, packed), `backends` (`cross_backend`:
the subprocesses and the pairs), `worker` (one backend's subprocess).

Example:
    >>> multidrop.verify(model, multidrop.insert_dropout(model, 0.2)).raise_on_mismatch()
    >>> report = multidrop.cross_backend("model.keras", rate=0.2)
    >>> print(report); report.ok
    True
"""

from multidrop.verify.backends import BackendRun, CrossBackendReport, Pair, cross_backend
from multidrop.verify.compare import (
    TOLERANCES,
    Difference,
    Report,
    VerificationError,
    tolerance_for,
    verify,
)
from multidrop.verify.inputs import sample_inputs

__all__ = [
    "TOLERANCES",
    "BackendRun",
    "CrossBackendReport",
    "Difference",
    "Pair",
    "Report",
    "VerificationError",
    "cross_backend",
    "sample_inputs",
    "tolerance_for",
    "verify",
]
