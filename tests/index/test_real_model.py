"""The index, CLI and service with a real (tiny, random) ``DualEncoder`` saved to and loaded from a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

import itrkit.cli.index as cli
from itrkit.index.build import Encoder, load_index


@pytest.fixture
def tiny_run(tmp_path: Path):
    from itrkit.models import ModelConfig, build_model, save_model

    model = build_model(ModelConfig(image_tower="tiny-image", text_tower="tiny-text", embed_dim=16,
                                    usa_heads=True, usa_dim=8))
    save_model(model, tmp_path / "run" / "model")
    return tmp_path / "run", model


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="itrkit")
    cli.add_parsers(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_dual_encoder_through_cli_and_service(tmp_path: Path, tiny_run, colour_dataset, capsys) -> None:
    from fastapi.testclient import TestClient

    from itrkit.serve.app import create_app

    run_dir, model = tiny_run
    assert isinstance(model, Encoder)
    colour_dataset.save(tmp_path / "data")
    out = tmp_path / "ix"
    assert run(["index", "build", "--run", str(run_dir), "--images", str(tmp_path / "data"), "--out", str(out),
                "--quiet"]) == 0
    capsys.readouterr()
    index = load_index(out)
    assert index.has_uni and index.image_uni.shape == (8, 8) and index.fingerprint == model.fingerprint()

    assert run(["search", "--index", str(out), "--text", "a purple square", "-k", "8", "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    # Reference: the model's own embeddings, scored pair by pair.
    q = model.encode_texts(["a purple square"])[0]
    gallery = model.encode_images(colour_dataset.image_paths)
    ref = sorted(((-float(sum(a * b for a, b in zip(q.tolist(), g.tolist()))), j)
                  for j, g in enumerate(gallery)))
    assert [r["id"] for r in results] == [colour_dataset.image_ids[j] for _, j in ref]
    np.testing.assert_allclose([r["score"] for r in results], [-s for s, _ in ref], atol=1e-5)

    # The service loads the same model lazily from the run named in the manifest.
    client = TestClient(create_app(out))
    body = client.get("/api/search", params={"q": "a purple square", "k": 8}).json()
    assert [r["id"] for r in body["results"]] == [r["id"] for r in results]
    photo = colour_dataset[3].path.read_bytes()
    r = client.post("/api/search/image", files={"file": ("y.png", photo, "image/png")}, data={"k": "1"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "yellow"
