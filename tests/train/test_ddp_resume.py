"""2 DDP ranks killed mid-run, resumed with `--resume` under torchrun: every rank loads the same
checkpoint and the run ends bitwise where an uninterrupted 2-rank run ends."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_ddp import TORCHRUN

# Each rank SIGKILLs itself at its n-th training batch (torchrun then stops the job).
KILLER = r"""
import os, signal, sys
from itrkit.cli import main
from itrkit.train import data
n, argv = int(sys.argv[1]), sys.argv[2:]
count = [0]
orig = data.PairData.batch
def batch(self, idx):
    if self.teacher_image is None and self.n_pairs > 100:  # training batches only
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, idx)
data.PairData.batch = batch
sys.exit(main(argv))
"""


def _run(script: list[str], out: Path, data: Path, resume: bool = False) -> subprocess.CompletedProcess:
    sets = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
            "stages.0.epochs=3", "stages.0.lr=0.01", "threads=1", "checkpoint_every=4"]
    argv = ["train", f"--data={data}", f"--out={out}", "--quiet", *[x for s in sets for x in ("--set", s)]]
    if resume:
        argv.append("--resume")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", *script, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_rank_resume_is_bitwise(tmp_path: Path, synth_dir: Path) -> None:
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found")
    ref = _run(["-m", "itrkit"], tmp_path / "ref", synth_dir)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    # 8 global batches per epoch (each rank prepares its half of every one): the 14th is in epoch 2,
    # after the mid-epoch checkpoint at step 12, so the resume starts inside an epoch.
    dead = _run([str(killer), "14"], tmp_path / "run", synth_dir)
    assert dead.returncode != 0 and not (tmp_path / "run" / "metrics.json").exists()
    again = _run(["-m", "itrkit"], tmp_path / "run", synth_dir, resume=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ref" / "metrics.json").read_text() == (tmp_path / "run" / "metrics.json").read_text()
