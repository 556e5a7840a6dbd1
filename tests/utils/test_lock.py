"""The run-folder lock, with real processes: a live holder refuses, a SIGKILLed one is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from itrkit.utils.lock import LOCK_NAME, RunLock, RunLockedError, lock_holder

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, says so, then holds it until stdin closes (or until it is killed).
HOLDER = textwrap.dedent("""
    import sys
    from itrkit.utils.lock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")

# Says "ready", waits for a line on stdin, tries the lock once: prints "won" (and holds it until
# stdin closes) or the refusal's one line.
CONTENDER = textwrap.dedent("""
    import sys
    from itrkit.utils.lock import RunLock, RunLockedError
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        with RunLock(sys.argv[1]):
            print("won", flush=True)
            sys.stdin.read()
    except RunLockedError as e:
        print("refused:", e, flush=True)
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        assert lock_holder(run_dir)["pid"] == holder.pid
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid} ") as err:
            RunLock(run_dir).acquire()
        assert "\n" not in str(err.value) and str(run_dir) in str(err.value)
        # Another real process is refused the same way.
        out = subprocess.run([sys.executable, "-c", CONTENDER, str(run_dir)], input="go\n", capture_output=True,
                             text=True, env=_env(), check=True).stdout
        assert out.startswith(f"ready\nrefused: {run_dir} is in use by pid {holder.pid} ")
        assert lock_holder(run_dir)["pid"] == holder.pid  # the refusals left the lock alone
    finally:
        holder.communicate("")  # closes stdin: the holder leaves its with-block
    assert holder.returncode == 0
    assert not (run_dir / LOCK_NAME).exists()
    with RunLock(run_dir):
        assert lock_holder(run_dir)["pid"] == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_sigkilled_holders_lock_is_taken_over_with_a_note(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert lock_holder(run_dir)["pid"] == holder.pid  # killed: nobody removed it
    with RunLock(run_dir) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
        assert lock_holder(run_dir)["pid"] == os.getpid()
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: {run_dir / LOCK_NAME}: took over a stale lock (pid {holder.pid} is gone)"]
    assert not (run_dir / LOCK_NAME).exists()


def test_processes_racing_for_a_stale_lock_get_exactly_one_winner(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    holder.kill()
    holder.wait()
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(4)]
    assert all(p.stdout.readline().strip() == "ready" for p in procs)  # type: ignore[union-attr]
    for p in procs:  # all four try at once
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    # Every answer is in before the winner lets go (it holds the lock until its stdin closes).
    outs = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
    results = [p.communicate("") for p in procs]
    winners = [p.pid for p, out in zip(procs, outs) if out == "won"]
    assert len(winners) == 1, outs
    # The losers name the winner; exactly one process printed the takeover note.
    assert all(o == "won" or f"in use by pid {winners[0]} " in o for o in outs), outs
    assert sum("took over a stale lock" in err for _, err in results) == 1
    assert not (run_dir / LOCK_NAME).exists()


def test_a_reused_pid_and_our_own_pid_from_an_earlier_process_are_stale(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    # pid 1 is alive, but it is not the process that started at tick "0".
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "start": "0"}))
    with RunLock(run_dir):
        pass
    assert "pid 1 now belongs to another process" in capsys.readouterr().err
    # A lock naming this very process, which never took it: left by an earlier process with our pid.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with RunLock(run_dir):
        pass
    assert "earlier process with the same pid" in capsys.readouterr().err
    # An unreadable lock (a holder killed while writing it) is stale too.
    lock.write_text("{\"pi")
    with RunLock(run_dir):
        pass
    assert "unreadable" in capsys.readouterr().err


def test_a_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "elsewhere.invalid", "start": None}))
    with pytest.raises(RunLockedError, match="in use by pid 4242 on host elsewhere.invalid .*delete"):
        RunLock(run_dir).acquire()
    assert lock_holder(run_dir)["host"] == "elsewhere.invalid"


def test_reentrant_in_one_process_and_released_on_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError):
        with RunLock(run_dir):
            with RunLock(run_dir):  # e.g. stage II inside the same training process
                assert lock_holder(run_dir)["pid"] == os.getpid()
            assert (run_dir / LOCK_NAME).exists()  # the outer block still holds it
            raise ValueError("boom")
    assert not (run_dir / LOCK_NAME).exists()


def test_release_never_removes_a_lock_someone_else_took_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir).acquire()
    # Someone deleted our lock by hand and another process took the folder.
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "x", "token": "theirs"}))
    lock.release()
    assert lock_holder(run_dir)["token"] == "theirs"


def test_missing_folder_without_create(tmp_path: Path) -> None:
    from itrkit.errors import ItrkitError

    with pytest.raises(ItrkitError, match="run folder not found"):
        RunLock(tmp_path / "nope", create=False).acquire()
