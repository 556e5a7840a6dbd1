"""scripts/paired_study.py: per-seed rows from a study's results.json and its runs' unimodal.json,
paired differences against an explicit per-seed loop."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("paired_study", ROOT / "scripts" / "paired_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_differences_equal_a_per_seed_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _script()
    rng = np.random.default_rng(0)
    truth: dict[str, dict[int, dict[str, float]]] = {}
    results = {}
    for name in ("infonce", "cusa", "cusa-shuffled"):
        truth[name] = {}
        runs = []
        for s in range(3):
            row = {"rsum": float(rng.uniform(200, 300)), "f8k_expert_tau_c": float(rng.uniform(40, 50))}
            runs.append({"seed": s, **row, "i2t_R@1": 1.0})
            uni = {"sts_stsb": float(rng.uniform(70, 80)), "image_r1": float(rng.uniform(50, 70)), "other": 1.0}
            (tmp_path / "runs" / name / f"seed{s}").mkdir(parents=True)
            (tmp_path / "runs" / name / f"seed{s}" / "unimodal.json").write_text(json.dumps(uni))
            truth[name][s] = {**row, "sts_stsb": uni["sts_stsb"], "image_r1": uni["image_r1"]}
        results[name] = {"runs": runs}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert mod.per_seed(tmp_path) == truth
    out = tmp_path / "pairs.json"
    mod.main(["--study", str(tmp_path), "--pairs", "cusa-cusa-shuffled", "--json", str(out)])
    got = json.loads(out.read_text())["pairs"]["cusa − cusa-shuffled"]
    for key in ("rsum", "f8k_expert_tau_c", "sts_stsb", "image_r1"):
        d = [truth["cusa"][s][key] - truth["cusa-shuffled"][s][key] for s in range(3)]
        mean = sum(d) / 3
        std = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5
        assert got[key]["mean"] == pytest.approx(mean) and got[key]["std"] == pytest.approx(std), key
        assert (got[key]["wins"], got[key]["losses"]) == (sum(x > 0 for x in d), sum(x < 0 for x in d)), key
    table = capsys.readouterr().out
    d = [truth["cusa"][s]["rsum"] - truth["infonce"][s]["rsum"] for s in range(3)]
    assert f"{sum(d) / 3:+.2f}" in table.splitlines()[3] and "| infonce |" in table
    with pytest.raises(SystemExit, match="--pairs 'cusa-nope'"):
        mod.main(["--study", str(tmp_path), "--pairs", "cusa-nope"])
