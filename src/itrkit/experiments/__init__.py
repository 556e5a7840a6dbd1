"""One experiments runner behind ``itrkit reproduce`` and ``itrkit demo``.

- :mod:`itrkit.experiments.methods`: every method in one registry — dual-encoder methods tuned
  on dev (``tuned``), bundled recipes (``recipe``: the fusion matchers) and ensembles of other
  methods' runs (``ensemble``: SGRAF = SGR + SAF);
- :mod:`itrkit.experiments.runner`: prepares data, teachers and grid features once, runs or
  reuses runs (a finished run's ``metrics.json`` is reused, an unfinished one resumed), pairs seeds,
  aggregates (mean ± std, paired Δ, wins / losses), writes tables and plots;
- :mod:`itrkit.experiments.flickr8k` (the study) and :mod:`itrkit.experiments.demo` (the main job on
  the synthetic set) are two experiments over it.
"""
