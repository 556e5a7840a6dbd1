"""Import shim: ``itrkit demo`` is :mod:`itrkit.experiments.demo` (over the experiments runner)."""

from itrkit.experiments.demo import COMMON, CUSA, demo_configs, run_demo, unimodal_scores  # noqa: F401
