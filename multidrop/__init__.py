"""multidrop: add dropout to trained Keras 3 models, correctly, on any backend.

Example:
    >>> import multidrop
    >>> rewired = multidrop.insert_dropout(model, 0.2)           # after every activation
    >>> print(multidrop.plan(model, 0.2))                         # the same, as a dry run
    >>> multidrop.verify(model, rewired).raise_on_mismatch()      # bitwise identical inference

Importing multidrop selects the PyTorch backend when ``KERAS_BACKEND`` is unset,
Keras has not been imported yet and PyTorch is installed; an explicit
``KERAS_BACKEND`` always wins.
"""

import importlib.util
import os
import sys

if (
    "KERAS_BACKEND" not in os.environ
    and "keras" not in sys.modules
    and importlib.util.find_spec("torch") is not None
):
    os.environ["KERAS_BACKEND"] = "torch"

from multidrop import select  # noqa: E402
from multidrop.mc import mc_predict, predictive_entropy  # noqa: E402
from multidrop.plan import Plan, Site, plan  # noqa: E402
from multidrop.rewire import insert_dropout, remove_dropout  # noqa: E402
from multidrop.verify import cross_backend, verify  # noqa: E402

__all__ = [
    "Plan",
    "Site",
    "cross_backend",
    "insert_dropout",
    "mc_predict",
    "plan",
    "predictive_entropy",
    "remove_dropout",
    "select",
    "verify",
]
