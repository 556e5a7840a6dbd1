"""Two `itrkit train` processes on one run folder: the second (a `--resume` while the first still
runs) is refused naming the holder's pid; once the holder is SIGKILLed, `--resume` takes the stale
lock over with a note and finishes the run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from itrkit.cli import main

SETS = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
        "stages.0.lr=0.01", "checkpoint_every=1", "threads=1"]


def _argv(data: Path, out: Path, epochs: int) -> list[str]:
    sets = [*SETS, f"stages.0.epochs={epochs}"]
    return ["train", "--data", str(data), "--out", str(out), "--quiet"] + [x for s in sets for x in ("--set", s)]


def test_a_second_train_on_a_run_in_use_is_refused_then_a_dead_holder_is_taken_over(
        tmp_path: Path, synth_dir: Path, capsys) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "itrkit", *_argv(synth_dir, run, 400)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the holder has a checkpoint (its lock is taken before anything is written)
            if list((run / "checkpoints").glob("ckpt-*.json")) or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert holder.poll() is None and (run / ".lock").is_file()
        capsys.readouterr()
        assert main(_argv(synth_dir, run, 400) + ["--resume"]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").is_file()  # left behind by the killed holder
    assert main(_argv(synth_dir, run, 1) + ["--resume"]) == 0
    assert "took over a stale lock" in capsys.readouterr().err
    assert (run / "metrics.json").is_file() and not (run / ".lock").exists()
