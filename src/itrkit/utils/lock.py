"""One process per run folder: ``run_dir/.lock`` names the holder's pid, host and start time.

``with RunLock(run_dir):`` creates the lock file with ``O_CREAT | O_EXCL`` (so exactly one of two
racing processes wins) and removes it on exit. A second process is refused with a one-line
:class:`RunLockedError` naming the holder's pid. A lock whose process is gone (killed with SIGKILL,
the machine rebooted) is stale: it is taken over with a one-line note on stderr.

"Gone" means: no process with that pid, or a process with that pid that started at another time
than the holder did (the pid was reused). A lock written on another host cannot be checked from
here and is never taken over; the message says which file to delete once that run is known dead.

Acquiring and releasing happen under a short ``flock`` on the run folder itself, so two processes
that both find the same stale lock cannot both take it over, and nobody reads a half-written lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from itrkit.errors import ItrkitError

LOCK_NAME = ".lock"

# Locks this process holds: path -> (token, depth). A lock file naming our pid that is not in
# here was left by an earlier process that had the same pid (a restarted container), so it is stale.
_HELD: dict[str, tuple[str, int]] = {}
_HELD_GUARD = threading.Lock()


class RunLockedError(ItrkitError):
    """The run folder is in use by another live process."""


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder for the few lines that read or write the lock file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS: O_EXCL alone
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network mounts): O_EXCL alone
            pass
        yield
    finally:
        os.close(fd)  # closing drops the flock


class RunLock:
    """Context manager (re-entrant within one process) that owns ``run_dir/.lock`` while it is open."""

    def __init__(self, run_dir: str | os.PathLike, create: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.create = create
        self.took_over: dict[str, Any] | None = None

    # --- the lock file -----------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        """The holder recorded in the lock file; None if there is none; {} if unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            holder = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _write_new(self, token: str) -> bool:
        """Create the lock file exclusively; False if one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
                  "token": token, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return True

    def _stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the recorded holder is gone, or None if it may still be running."""
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return "the lock file is unreadable"
        if holder.get("host") not in (None, socket.gethostname()):
            return None  # another machine's process: cannot be checked from here
        if pid == os.getpid():
            return f"pid {pid} is this process, which does not hold the lock (an earlier process with the same pid)"
        if not _pid_alive(pid):
            return f"pid {pid} is gone"
        recorded, now = holder.get("start"), _proc_start(pid)
        if recorded is not None and now is not None and recorded != now:
            return f"pid {pid} now belongs to another process"
        return None

    # --- context manager ---------------------------------------------------------------------
    def acquire(self) -> RunLock:
        key = str(self.path.resolve())
        with _HELD_GUARD:
            if key in _HELD:
                token, depth = _HELD[key]
                _HELD[key] = (token, depth + 1)
                return self
        if self.create:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.run_dir.is_dir():
            raise ItrkitError(f"{self.run_dir}: run folder not found")
        token = uuid.uuid4().hex
        with _folder_guard(self.run_dir):
            if not self._write_new(token):
                holder = self._read() or {}
                reason = self._stale_reason(holder)
                if reason is None:
                    pid, host = holder.get("pid"), holder.get("host")
                    where = "" if host in (None, socket.gethostname()) else f" on host {host}"
                    hint = "wait for it to finish" if not where else f"delete {self.path} once that run is stopped"
                    raise RunLockedError(f"{self.run_dir} is in use by pid {pid}{where} (lock {self.path}); {hint}")
                self.path.unlink()
                if not self._write_new(token):  # pragma: no cover - excluded by the folder guard
                    raise RunLockedError(f"{self.run_dir}: lost the race for the stale lock {self.path}")
                self.took_over = holder
                print(f"note: {self.path}: took over a stale lock ({reason})", file=sys.stderr)
        with _HELD_GUARD:
            _HELD[key] = (token, 1)
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        with _HELD_GUARD:
            if key not in _HELD:
                return
            token, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (token, depth - 1)
                return
            del _HELD[key]
        with _folder_guard(self.run_dir):
            holder = self._read()
            # Only our own lock file is removed: never one a later process took over.
            if holder and holder.get("token") == token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded holder of ``run_dir``'s lock (pid, host, start, since), or None if unlocked."""
    return RunLock(run_dir)._read()
