"""`itrkit report RUN... --out DIR` on two real (tiny) runs: the files exist and agree with `itrkit eval`."""

from __future__ import annotations

import json
from pathlib import Path

from itrkit.cli import main
from itrkit.data.synthetic import make_synthetic


def test_report_two_runs(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    make_synthetic(data, n_images=40, captions_per_image=3, seed=2, size=48)
    runs = []
    for name, extra in [("infonce", []), ("vsepp", ["loss.contrastive=0", "loss.triplet=1"])]:
        run = tmp_path / "runs" / name
        args = ["train", "--data", str(data), "--out", str(run), "--quiet"]
        for s in ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16",
                  "batch_size=16", "stages.0.epochs=2", *extra]:
            args += ["--set", s]
        assert main(args) == 0
        runs.append(run)
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "metrics.json", "tsne_infonce.png", "tsne_vsepp.png", "retrievals_infonce.html",
            "retrievals_vsepp.html"} <= names
    reported = json.loads((out / "metrics.json").read_text())
    for run in runs:
        assert main(["eval", "--run", str(run), "--json", str(tmp_path / f"{run.name}.json")]) == 0
        evaluated = json.loads((tmp_path / f"{run.name}.json").read_text())
        assert reported[run.name]["rsum"] == evaluated["rsum"]
    assert (out / "tsne_infonce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| infonce" in capsys.readouterr().out
    assert main(["report", str(runs[0]), "--out", str(out), "--names", "a,b"]) == 2  # one-line error, exit 2
