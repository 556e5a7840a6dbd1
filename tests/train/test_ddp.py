"""torchrun with 2 gloo ranks of B/2 reproduces 1 process of B (global-batch losses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _train(args: list[str], out: Path, data: Path, extra: list[str], nproc: int) -> None:
    base = [f"--data={data}", f"--out={out}", "--quiet",
            "--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text",
            "--set", "model.embed_dim=32", "--set", "batch_size=16", "--set", "stages.0.epochs=2",
            "--set", "stages.0.lr=0.01", "--set", "threads=1"]
    for e in extra:
        base += ["--set", e]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "itrkit", "train", *base]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "itrkit", "train", *base]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # a rank's own message
    assert proc.returncode == 0, "\n".join(errors) or proc.stderr[-2000:]


@pytest.mark.parametrize("name, extra", [
    ("infonce", []),
    ("cusa", ["model.trunk=mlp", "model.usa_heads=true", "loss.csa=1", "loss.usa=1", "loss.tau_teacher=0.1"]),
    ("instance", ["loss.instance=1"]),
])
def test_two_ranks_equal_one_process(tmp_path: Path, synth_dir: Path, teacher_stores: list[str], name: str,
                                     extra: list[str]) -> None:
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found")
    if "loss.csa=1" in extra:
        extra = extra + teacher_stores
    _train([], tmp_path / "one", synth_dir, extra, 1)
    _train([], tmp_path / "two", synth_dir, extra, 2)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # same maths, different summation order: equal to float32 rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
