"""Import shim: fusion methods are entries of :data:`itrkit.experiments.methods.METHODS`
(``recipe`` and ``ensemble`` kinds) run by :mod:`itrkit.experiments.flickr8k`."""

from itrkit.experiments.flickr8k import run_method  # noqa: F401
from itrkit.experiments.methods import FUSION_METHODS
from itrkit.experiments.methods import METHODS as _ALL

METHODS = FUSION_METHODS
TRAINED = {n: (_ALL[n].recipe, []) for n in FUSION_METHODS if _ALL[n].kind == "recipe"}
ENSEMBLES = {n: _ALL[n].members for n in FUSION_METHODS if _ALL[n].kind == "ensemble"}
