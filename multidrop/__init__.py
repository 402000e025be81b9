"""multidrop: add dropout to trained Keras 3 models, correctly, on any backend.

Example:
    >>> import multidrop
    >>> rewired = multidrop.insert_dropout(model, 0.2)           # after every activation
    >>> print(multidrop.plan(model, 0.2))                         # the same, as a dry run
    >>> multidrop.verify(model, rewired).raise_on_mismatch()      # bitwise identical inference

Importing multidrop selects the PyTorch backend when ``KERAS_BACKEND`` is unset,
Keras has not been imported yet and PyTorch is installed; an explicit
``KERAS_BACKEND`` always wins, and ``os.environ`` is left as it was.
"""

from multidrop import _keras, select  # _keras first: it picks the backend before Keras loads
from multidrop.kinds import linear
from multidrop.mc import mc_predict
from multidrop.options import Options
from multidrop.plan import Plan, Site, plan
from multidrop.rewire import insert_dropout, remove_dropout, set_dropout, set_plan
from multidrop.search import SearchResult, search
from multidrop.uncertainty import (
    UncertaintyReport,
    evaluate_uncertainty,
    expected_entropy,
    fit_temperature,
    mutual_information,
    predictive_entropy,
    temperature_scale,
    variation_ratio,
)
from multidrop.verify import cross_backend, verify

KERAS_TESTED = _keras.TESTED  # the Keras releases multidrop's suite runs on (and keras-nightly)

__all__ = [
    "KERAS_TESTED",
    "Options",
    "Plan",
    "SearchResult",
    "Site",
    "UncertaintyReport",
    "cross_backend",
    "evaluate_uncertainty",
    "expected_entropy",
    "fit_temperature",
    "insert_dropout",
    "linear",
    "mc_predict",
    "mutual_information",
    "plan",
    "predictive_entropy",
    "remove_dropout",
    "search",
    "select",
    "set_dropout",
    "set_plan",
    "temperature_scale",
    "variation_ratio",
    "verify",
]
