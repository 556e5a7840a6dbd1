"""``scripts/gpu_check.py --device cpu --quick`` runs every part (parity with the device hooks,
torchrun kill + resume, CLIP-sized throughput, evaluation vs a bare matmul, teacher extraction) at
tiny sizes, so the script cannot rot; and a device that is not there is one line, exit 2, nothing
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_quick_cpu_run_passes_every_part_and_writes_json_and_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = _run("--device", "cpu", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["device"] == "cpu" and r["quick"]
    assert r["parity"]["ok"] and r["parity"]["steps"] >= 8 and r["parity"]["max_rel_loss_diff"] <= 1e-4
    assert r["parity"]["hooked_inputs"] > 100 and r["parity"]["off_device_inputs"] == 0
    assert r["resume"]["ok"] and r["resume"]["bitwise"] and r["resume"]["killed_rc"] != 0
    rows = r["clip"]["rows"]
    assert {(x["precision"], x["loss"]) for x in rows} == {(p, lo) for p in ("fp32", "bf16") for lo in ("infonce", "cusa")}
    assert all(x["steps_per_s"] > 0 and x["pairs_per_s"] == pytest.approx(x["batch"] * x["steps_per_s"], rel=0.01)
               for x in rows)
    assert sum("cusa_over_infonce" in x for x in rows) == 2
    assert r["eval"]["ok"] and r["eval"]["captions"] == 5 * r["eval"]["images"] and r["eval"]["rsum"] > 0
    assert r["teacher"]["ok"] and r["teacher"]["items_per_s"] > 0
    for label in ("(a) parity", "(b) resume", "(c) clip", "(d) eval", "(e) teacher", "cusa/infonce"):
        assert label in proc.stdout


def test_a_missing_device_is_one_line_exit_2_and_no_json(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "gpu_check.json"
    proc = _run("--device", "cuda", "--quick", "--out", str(out))
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: device 'cuda' is not available"), err
    assert not out.exists()
