"""torchrun with 2 gloo ranks of B/2 reproduces 1 process of B (global-batch losses)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


def _train(args: list[str], out: Path, data: Path, extra: list[str], nproc: int) -> None:
    towers = [] if any(e.startswith("model.name=") for e in extra) else \
        ["--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text", "--set", "model.embed_dim=32"]
    base = [f"--data={data}", f"--out={out}", "--quiet", *towers,
            "--set", "batch_size=16", "--set", "stages.0.epochs=2",
            "--set", "stages.0.lr=0.01", "--set", "threads=1", "--set", "log_every=1"]
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
    # Same maths, different summation order. The per-step losses agree to float32 rounding; the
    # weights to atol 1e-4 = 1 % of one step at lr 0.01: Adam divides each gradient entry by its own
    # running RMS, so a rounding difference in an entry whose gradient is near zero moves that
    # weight by up to lr (measured: largest difference 2e-5, text trunk, CUSA).
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")
    if name == "cusa":
        # The check can fail: per-rank soft labels (the authors' default) are another objective.
        _train([], tmp_path / "local", synth_dir, extra + ["loss.gather=local"], 2)
        c = load_file(str(tmp_path / "local" / "model" / "model.safetensors"))
        assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-2


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "train.log").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


FUSION = {
    # SGR without the region BatchNorm: its statistics are per rank on gloo (SyncBatchNorm is CUDA-only)
    "sgr": ["model.name=sgr", "model.region_norm=false", "model.embed_dim=16", "model.sim_dim=8",
            "model.word_dim=16", "model.text_hidden=16", "model.sgr_steps=2", "model.word_init=random",
            "loss.contrastive=0", "loss.triplet=1", "loss.sum_warmup_epochs=1", "grad_clip=2.0"],
    "rerank": ["model.name=rerank", "model.text_tower.embed_dim=16", "model.text_tower.hidden=16",
               "model.embed_dim=16", "model.width=16", "model.heads=2", "model.rerank_k=4", "loss.itm=1",
               "loss.tau_teacher=0.1", "grad_clip=2.0"],
}


@pytest.fixture(scope="module")
def fusion_grid(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from itrkit.data.records import Dataset
    from tests.conftest import pixel_grid_store

    return pixel_grid_store(Dataset.load(synth_dir), tmp_path_factory.mktemp("grid") / "grid.store")


@pytest.mark.parametrize("name", list(FUSION))
def test_two_ranks_equal_one_process_for_fusion_matchers(tmp_path: Path, synth_dir: Path, fusion_grid: Path,
                                                         name: str) -> None:
    """The B×B scores, hard negatives and losses span the gathered global batch: 2 ranks of B/2 =
    1 process of B (per-step losses to float32 rounding, weights to Adam-aware tolerance)."""
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found")
    extra = [*FUSION[name], f"data.grid_store={fusion_grid}", "data.max_val_images=0"]
    _train([], tmp_path / "one", synth_dir, extra, 1)
    _train([], tmp_path / "two", synth_dir, extra, 2)
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    # Biases that only shift every logit of a softmax row (the attention-pool score over regions; the
    # key bias of SGR's q·kᵀ edges) have a true gradient of exactly 0: Adam turns their rounding noise
    # into ±lr steps of either sign, so they are not comparable.
    shift_invariant = {k for k in a if re.fullmatch(r"pool_score\.bias|sgr\.\d+\.key\.bias", k)}
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a if k not in shift_invariant}
    print(f"{name}: largest weight difference {max(diffs.values()):.2e} ({max(diffs, key=diffs.get)})")
    for k in a:
        if k not in shift_invariant:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")
