"""``itrkit demo``: the main job on the embedded synthetic data, no download, nothing from outside.

1. render the synthetic captioned-image set (known multi-positive relations),
2. extract the frozen teachers once (EfficientNet-Lite2 for images, all-MiniLM-L6-v2 for text,
   both from PyPI wheels) into feature stores,
3. cache frozen EfficientNet-Lite0 / all-MiniLM-L6-v2 student features, then train two models
   side by side from the same initialisation and batch order: the InfoNCE baseline and CUSA
   (InfoNCE + α·CSA + β·USA, docs/method.md §1) on the same trainable trunk; epochs picked on validation,
4. evaluate both on the held-out test images: cross-modal retrieval and the uni-modal gain
   (image→image and caption→caption R@1 by shared objects),
5. build a search index of the test images with the CUSA model and print the ``itrkit serve`` command.
Everything is written under ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.experiments.runner import Runner
from itrkit.train.config import TrainConfig, load_train_config

# Shared by both runs so that only the loss differs (same trunk, heads, seed, batch order).
COMMON = ["batch_size=64", "stages.0.lr=0.001", "loss.tau=0.1", "loss.tau_learnable=false", "log_every=20",
          "model.trunk=mlp", "model.trunk_hidden=512", "model.embed_dim=256"]
# CUSA with a sharp teacher (docs/method.md §5.1, F1: at teacher temperature 1.0 the soft labels are uniform).
CUSA = ["loss.csa=1.0", "loss.usa=1.0", "loss.tau_teacher=0.1", "model.usa_heads=true"]
IMAGE_TEACHER, TEXT_TEACHER = "efficientnet-lite2", "minilm"


def demo_configs(out: Path, data: Path, teachers: Path, quick: bool) -> dict[str, TrainConfig]:
    epochs = "3" if quick else "12"
    base = [f"data.path={data}", f"cache_dir={out / 'cache'}", f"stages.0.epochs={epochs}"] + COMMON
    stores = [f"teacher.image_store={teachers / 'image.store'}", f"teacher.text_store={teachers / 'text.store'}"]
    return {
        "InfoNCE": load_train_config(None, base + [f"out={out / 'runs' / 'infonce'}"]),
        "CUSA": load_train_config(None, base + CUSA + stores + [f"out={out / 'runs' / 'cusa'}"]),
    }


def unimodal_scores(image_emb: np.ndarray, text_emb: np.ndarray, ds: Any) -> dict[str, float]:
    """R@1 (×100) of uni-modal retrieval by content: the nearest *other* image of each image, and the
    nearest caption of another image for each caption, is a hit when the two scenes share an object
    (same shape and colour). Captions of the query's own image are excluded (they would be trivial)."""
    objects = [set(r.labels) for r in ds.records]
    share = np.array([[bool(a & b) for b in objects] for a in objects])

    def r1(emb: np.ndarray, owner: np.ndarray) -> float:
        e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        sims = e @ e.T
        sims[owner[:, None] == owner[None, :]] = -np.inf  # itself and same-image items
        return float(100.0 * share[owner, owner[sims.argmax(1)]].mean())

    return {"img2img_R@1": r1(np.asarray(image_emb), np.arange(len(objects))),
            "txt2txt_R@1": r1(np.asarray(text_emb), np.asarray(ds.txt2img))}


def run_demo(out: Path, quick: bool = False, device: str = "auto") -> dict[str, Any]:
    from itrkit.data.records import Dataset
    from itrkit.data.synthetic import make_synthetic
    from itrkit.eval.table import format_table
    from itrkit.index.build import build_index
    from itrkit.models.embed import embed_dataset, split_features
    from itrkit.models.io import load_model

    t0 = time.time()
    out = out.resolve()
    runner = Runner(out, progress=True, device=device)
    data, teachers = out / "data", out / "teachers"
    n = 150 if quick else 600
    if not (data / "dataset.json").is_file():
        print(f"[1/5] rendering {n} synthetic scenes with 5 captions each → {data}")
        make_synthetic(data, n_images=n, captions_per_image=5, seed=0)
    else:
        print(f"[1/5] synthetic data already at {data}")
    ds = Dataset.load(data)
    print(f"[2/5] teacher features ({IMAGE_TEACHER}, {TEXT_TEACHER}) of the training split → {teachers}")
    runner.teachers(data, IMAGE_TEACHER, TEXT_TEACHER)
    print("[3/5] caching frozen EfficientNet-Lite0 / all-MiniLM-L6-v2 features, training InfoNCE and CUSA heads")
    cfgs = demo_configs(out, data, teachers, quick)
    metrics = {name: runner.run(cfg) for name, cfg in cfgs.items()}

    print("[4/5] held-out test images (epoch picked on validation):")
    test = ds.split("test")
    rows = {f"{name} (test)": m["test"] for name, m in metrics.items()}
    print(format_table(rows, first="method"))
    from itrkit.utils.device import resolve_device

    models = {name: load_model(cfg.out).to(resolve_device(device)) for name, cfg in cfgs.items()}
    img_f, txt_f = split_features(models["InfoNCE"], test, str(out / "cache"))
    uni = {"frozen towers": unimodal_scores(img_f, txt_f, test)}
    for name, model in models.items():
        emb = embed_dataset(model, test, str(out / "cache"))
        uni[f"{name} (cross head)"] = unimodal_scores(emb["image_embeds"], emb["text_embeds"], test)
        if "image_uni" in emb:
            uni[f"{name} (USA head)"] = unimodal_scores(emb["image_uni"], emb["text_uni"], test)
    print("uni-modal retrieval, R@1 of sharing an object with the nearest other image / other image's caption:")
    print(format_table(uni, keys=["img2img_R@1", "txt2txt_R@1"], first="features"))
    gain = metrics["CUSA"]["test"]["rsum"] - metrics["InfoNCE"]["test"]["rsum"]
    print(f"CUSA − InfoNCE test RSUM: {gain:+.1f} (one seed; see README for the multi-seed Flickr8k study)")

    index_dir = out / "index"
    print(f"[5/5] building a search index of the test images with the CUSA model → {index_dir}")
    build_index(models["CUSA"], test, index_dir, run_dir=Path(cfgs["CUSA"].out), overwrite=True)
    print(f"try it:  itrkit serve --index {index_dir}   (then open http://127.0.0.1:8000)")
    print(f"         itrkit search --index {index_dir} --text \"a red circle\" -k 5")
    summary = {"retrieval": rows, "unimodal": uni, "cusa_minus_infonce_rsum": gain,
               "runs": {name: str(cfg.out) for name, cfg in cfgs.items()}, "index": str(index_dir),
               "seconds": round(time.time() - t0, 1)}
    from itrkit.utils.io import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    print(f"done in {summary['seconds']:.0f} s; runs in {out / 'runs'}, summary in {out / 'summary.json'}")
    return summary
