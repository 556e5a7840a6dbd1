"""Import shim: ``itrkit reproduce`` is the experiments runner (:mod:`itrkit.experiments`)."""

from itrkit.config import to_dict  # noqa: F401
from itrkit.experiments.flickr8k import Reproduction
from itrkit.experiments.methods import BASE, DEFAULT_METHODS, METHODS, Method  # noqa: F401
from itrkit.experiments.runner import plot_results, results_table  # noqa: F401

__all__ = ["METHODS", "Reproduction", "results_table", "to_dict"]
