"""Where training records go besides ``train.log`` (config ``report_to``, ``--report-to``; the HF
Trainer's ``report_to``).

- ``jsonl``: ``train.log``, one JSON object per record. Always written (``--resume`` and
  ``itrkit runs`` read it); naming it is accepted.
- ``csv``: ``metrics.csv`` in the run folder, one row per record, one column per field (nested
  validation metrics as ``val.rsum``); a field first seen later widens the file (rewritten atomically).
- ``tensorboard``: event files under ``<run>/tensorboard`` (``torch.utils.tensorboard``), numeric
  fields as scalars against the step: ``train/loss``, ``val/rsum``, ...; needs the ``tensorboard``
  package (``pip install 'itrkit[tensorboard]'``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from itrkit.errors import ConfigError
from itrkit.utils.io import atomic_path

REPORTERS = ("jsonl", "csv", "tensorboard")
CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``"csv,tensorboard"`` or ``["csv"]`` → checked, de-duplicated names (``none`` / empty → [])."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if not name or name == "none":
            continue
        if name not in REPORTERS:
            raise ConfigError(f"report_to: unknown reporter '{item}' (use {', '.join(REPORTERS)} or none)")
        if name not in out:
            out.append(name)
    return out


def check_available(names: Sequence[str]) -> None:
    """Fail before any work when a reporter's package is missing (one line naming the extra)."""
    if "tensorboard" in names:
        from itrkit.utils.optional import require

        require("tensorboard", "tensorboard", "report_to: tensorboard")
        require("torch.utils.tensorboard", "tensorboard", "report_to: tensorboard")


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"val": {"rsum": 1}}`` → ``{"val.rsum": 1}``."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class CsvReporter:
    """``metrics.csv``: the records of ``train.log`` as a table (a resumed run appends to it)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / CSV_NAME
        self.columns: list[str] = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), [])

    def write(self, record: Mapping[str, Any]) -> None:
        row = flatten(record)
        new = [k for k in row if k not in self.columns]
        if new or not self.path.is_file():
            self._rewrite(self.columns + new)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: _cell(v) for k, v in row.items()})

    def _rewrite(self, columns: list[str]) -> None:
        rows: list[dict[str, str]] = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(buf.getvalue(), encoding="utf-8")
        self.columns = columns

    def close(self) -> None:
        pass


def _cell(v: Any) -> Any:
    return "" if v is None else v


class TensorBoardReporter:
    """Numeric fields as scalars: ``train/<field>`` for step records, ``val/<metric>`` for validation."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def write(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        fields = flatten(record)
        for k, v in fields.items():
            if k in ("time", "step", "epoch") or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if not math.isfinite(float(v)):
                continue
            tag = k.replace(".", "/", 1) if k.startswith("val.") else f"train/{k}"
            self.writer.add_scalar(tag, float(v), global_step=step, walltime=record.get("time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Reporters:
    """The configured reporters of one run; ``write`` each record the loop logs, ``close`` at the end."""

    def __init__(self, names: Sequence[str], run_dir: str | Path) -> None:
        self.names = parse_report_to(list(names))
        self.run_dir = Path(run_dir)
        self._open: list[Any] | None = None

    def _reporters(self) -> list[Any]:
        if self._open is None:  # opened on the first record: the run folder exists by then
            kinds = {"csv": CsvReporter, "tensorboard": TensorBoardReporter}
            self._open = [kinds[n](self.run_dir) for n in self.names if n in kinds]
        return self._open

    def write(self, record: Mapping[str, Any]) -> None:
        for r in self._reporters():
            r.write(record)

    def close(self) -> None:
        for r in self._open or []:
            r.close()
        self._open = None
