"""Progress of long work (feature caching, teacher extraction, training epochs, scoring, index
builds) that reads well both in a terminal and in a log file.

On a terminal :func:`progress` is a tqdm bar. When stderr is not a terminal (``itrkit train > log
2>&1``, a CI job, ``nohup``) tqdm would either stay silent (``disable=None``) or write a carriage-
return frame per update, megabytes of them in a log; instead :func:`progress` writes one plain
line to stderr at a steady pace: items done / total, percent, rate, elapsed time and ETA. Work
that lasts beyond the first interval says first what it computes (``what``) and where the result
goes (``cached_at``), so a 15-minute feature cache names itself within seconds, while work done in
under one interval (a small cache, a quick epoch) writes nothing at all.

Knobs (environment):

``ITRKIT_PROGRESS_SECONDS``
    seconds between two lines when not on a terminal (default 10; 0 = a line per update, for tests).
``ITRKIT_PROGRESS``
    ``auto`` (default: a bar on a terminal, lines otherwise), ``bar``, ``lines`` or ``off``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

DEFAULT_SECONDS = 10.0
PREFIX = "[itrkit]"


def _interval() -> float:
    raw = os.environ.get("ITRKIT_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def _mode(stream: TextIO) -> str:
    mode = os.environ.get("ITRKIT_PROGRESS", "auto").strip().lower() or "auto"
    if mode in ("bar", "lines", "off"):
        return mode
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        tty = False
    # Jupyter's stderr is no terminal but shows tqdm.auto's widget well.
    return "bar" if tty or "ipykernel" in sys.modules else "lines"


def format_seconds(s: float) -> str:
    """``75.2`` → ``"1:15"``, ``3700`` → ``"1:01:40"``; unknown → ``"?"``."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _rate(r: float) -> str:
    return f"{r:.3g}" if r < 100 else f"{r:.0f}"


class Progress:
    """One unit of long work: ``update(n)`` as items finish, ``close()`` at the end (or use it as a
    context manager / iterate it). The same interface drives a tqdm bar or plain lines."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", what: str | None = None, cached_at: Any = None, enabled: bool = True,
                 stream: TextIO | None = None, leave: bool = False, where_label: str = "cached at") -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self._skipped = 0  # done before this process started (resumed shards): not part of the rate
        self._postfix = ""
        self._bar: Any = None
        self._closed = False
        self._lines = 0
        self.mode = _mode(self.stream) if enabled else "off"
        self.interval = _interval()
        self._t0 = time.monotonic()
        self._next = self._t0 + self.interval  # deadlines on a fixed grid: a steady pace without drift
        self._announce = ""
        if self.mode == "off":
            return
        if what:
            where = f"; {where_label} {cached_at}" if cached_at else ""
            count = f" ({total} {unit})" if total is not None else ""
            self._announce = f"{PREFIX} {desc or 'working'}: {what}{count}{where}"
        if self.mode == "bar" and self._announce:
            self._write(self._announce)
            self._announce = ""
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc or None, unit=unit, leave=leave, dynamic_ncols=True,
                             file=self.stream)

    # --- the interface -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def skip(self, n: int) -> None:
        """``n`` items already done (kept from an interrupted run): counted, not part of the rate."""
        if n <= 0:
            return
        self.n += n
        self._skipped += n
        if self._bar is not None:
            self._bar.update(n)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.total is not None and self.n >= self.total:
            return  # close() writes the closing tally
        if now >= self._next:
            self._next += self.interval
            if self._next <= now:  # a long stall: restart the grid from now
                self._next = now + self.interval
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        """Extra fields shown after the counts (``loss=0.1234``)."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            # Work long enough to have reported gets a closing tally; short work stays quiet.
            now = time.monotonic()
            if self._lines or now - self._t0 >= self.interval:
                self._line(now, final=True)

    # --- lines --------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or full log must not stop the work
            pass

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self._t0
        fresh = self.n - self._skipped
        rate = fresh / elapsed if elapsed > 0 else float("nan")
        parts = []
        if self.total:
            parts.append(f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n} {self.unit}")
        parts.append(f"{_rate(rate)} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if final:
            parts[-1] = f"done in {format_seconds(elapsed)}"
        elif self.total:
            left = (self.total - self.n) / rate if rate and math.isfinite(rate) and rate > 0 else float("nan")
            parts.append(f"ETA {format_seconds(left)}")
        if self._postfix:
            parts.append(self._postfix)
        if self._announce:  # work that lasts says first what it computes (short work stays quiet)
            self._write(self._announce)
            self._announce = ""
        self._lines += 1
        self._write(f"{PREFIX} {self.desc or 'progress'}: " + ", ".join(parts))


def progress(iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             what: str | None = None, cached_at: Any = None, enabled: bool = True, leave: bool = False,
             stream: TextIO | None = None, where_label: str = "cached at") -> Progress:
    """A tqdm bar on a terminal, steady plain lines on stderr otherwise (see the module doc).

    ``iterable``: iterate the result to get its items (updates itself); without one, call
    ``update(n)`` / ``close()``. ``what`` ("computing image features with the clip tower") and
    ``cached_at`` make the first line say what is computed and where it is kept (``where_label``:
    the words before that path). ``enabled=False`` is silent (``--quiet``, ranks other than 0).
    """
    return Progress(iterable, total=total, desc=desc, unit=unit, what=what, cached_at=cached_at,
                    enabled=enabled, stream=stream, leave=leave, where_label=where_label)
