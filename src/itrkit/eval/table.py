"""Markdown tables of metrics (``itrkit eval``, ``itrkit train``, reports).

Cells are padded so the table also reads well in a terminal; it stays valid Markdown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

DEFAULT_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum",
                "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _cell(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if _is_number(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    return str(v)


def default_keys(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The retrieval keys present, in the usual order, then any other numeric keys sorted."""
    present = {k for r in rows.values() for k, v in r.items() if _is_number(v)}
    return [k for k in DEFAULT_KEYS if k in present] + sorted(present - set(DEFAULT_KEYS))


def format_table(rows: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None,
                 digits: int = 1, first: str = "") -> str:
    """One Markdown row per entry of ``rows`` (name → metrics); columns ``keys``
    (default: :func:`default_keys`). Floats get ``digits`` decimals; missing cells stay empty."""
    keys = list(keys) if keys is not None else default_keys(rows)
    table = [[first, *keys]] + [[str(name), *(_cell(r.get(k), digits) for k in keys)] for name, r in rows.items()]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]

    def line(cells: list[str]) -> str:
        # names left-aligned, numbers right-aligned
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(table[0]), sep, *(line(r) for r in table[1:])])


def print_run_summary(out: Mapping[str, Any] | None, run_dir: Any) -> None:
    """What ``itrkit train`` / ``train-fusion`` print at the end: val (selected) and test rows."""
    if not out:
        return
    rows = {k: v for k, v in (("val (selected)", out.get("val")), ("test", out.get("test"))) if v}
    print(format_table(rows))
    print(f"run: {run_dir}  (model/, metrics.json, config.yaml, train.log)")
