"""`itrkit eval --unimodal coco:instances.json`: object-label image retrieval from a trained run,
checked against an explicit nearest-neighbour loop over the same embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from itrkit.cli import main
from itrkit.data.records import Dataset
from itrkit.data.synthetic import make_synthetic
from itrkit.eval.run import embed_dataset
from itrkit.models.io import load_model


def test_unimodal_coco_labels_from_a_run(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_synthetic(data, n_images=40, captions_per_image=2, seed=3, size=48)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--quiet"]
    for s in ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=8",
              "stages.0.epochs=1", "model.usa_heads=true"]:  # USA heads present but untrained: cross head is used
        args += ["--set", s]
    assert main(args) == 0
    test = Dataset.load(data).split("test")
    # A COCO instances file for the synthetic images: categories = the objects' shapes.
    shapes = sorted({lab.split()[-1] for r in test.records for lab in r.labels})
    cat = {s: i + 1 for i, s in enumerate(shapes)}
    anns = [{"image_id": r.id, "category_id": cat[lab.split()[-1]]} for r in test.records for lab in r.labels]
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({"images": [{"id": r.id} for r in test.records],
                                "categories": [{"id": i, "name": s} for s, i in cat.items()], "annotations": anns}))
    assert main(["eval", "--run", str(run), "--unimodal", f"coco:{inst}", "--json", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())

    emb = embed_dataset(load_model(run), test)["image_embeds"]
    labels = [{lab.split()[-1] for lab in r.labels} for r in test.records]
    sims = emb @ emb.T
    hits1 = hits5 = 0
    for i in range(len(emb)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i]
        hits1 += bool(labels[i] & labels[order[0]])
        hits5 += any(labels[i] & labels[j] for j in order[:5])
    assert abs(got["uni_cross_coco_R@1"] - 100 * hits1 / len(emb)) < 1e-9
    assert abs(got["uni_cross_coco_R@5"] - 100 * hits5 / len(emb)) < 1e-9
    assert main(["eval", "--run", str(run), "--unimodal", "cocos:x.json"]) == 2
    assert main(["eval", "--run", str(run), "--unimodal", f"coco:{tmp_path / 'nope.json'}"]) == 2
