"""Markdown tables of metrics (``itrkit eval``, ``itrkit train``, reports)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DEFAULT_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum",
                "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")


def format_table(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str] | None = None, digits: int = 1) -> str:
    """One row per entry of ``rows``; columns ``keys`` (default: the retrieval keys present)."""
    if keys is None:
        present = set().union(*[set(r) for r in rows.values()]) if rows else set()
        keys = [k for k in DEFAULT_KEYS if k in present] + sorted(k for k in present if k not in DEFAULT_KEYS
                                                                  and isinstance(next(r.get(k) for r in rows.values() if k in r), (int, float)))
    head = "| | " + " | ".join(keys) + " |"
    sep = "|---" * (len(keys) + 1) + "|"
    lines = [head, sep]
    for name, r in rows.items():
        cells = [(f"{r[k]:.{digits}f}" if isinstance(r.get(k), (int, float)) else "") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
