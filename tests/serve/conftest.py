"""The serve tests reuse the colour encoder and index fixtures of tests/index/conftest.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Loaded under its own module name: every conftest.py is otherwise called "conftest".
_spec = importlib.util.spec_from_file_location("itrkit_tests_index_fixtures",
                                               Path(__file__).resolve().parents[1] / "index" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

colour_encoder = _fixtures.colour_encoder
colour_dataset = _fixtures.colour_dataset
colour_index = _fixtures.colour_index
make_encoder = _fixtures.make_encoder
solid = _fixtures.solid

