"""Contract test over every registry entry (timm's ``test_models.py`` over ``list_models()``):
every tower spec name and every fusion model builds from its config, runs a training forward whose
loss gives ``*_loss`` terms, and survives a save/load round trip with equal outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itrkit.models.fusion_base import FusionBatch
from itrkit.models.registry import build_fusion_model, fusion_options_class, list_fusion_models
from itrkit.models.towers import _REGISTRY

# One small local spec per tower registry name (no download): tiny random HF folders stand in.
TOWER_SPECS = {
    "efficientnet-lite0": "efficientnet-lite0", "efficientnet-lite1": "efficientnet-lite1",
    "efficientnet-lite2": "efficientnet-lite2", "minilm": "minilm", "st": "st:{st}", "hf": "hf:{st}",
    "clip": "clip:{clip}", "hf-vision": "hf-vision:{vit}", "gru": "gru:minilm", "lstm": "lstm:minilm",
    "tiny-image": "tiny-image", "tiny-text": "tiny-text",
}


def test_every_tower_registry_name_is_covered() -> None:
    assert set(TOWER_SPECS) == set(_REGISTRY)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import ViTConfig, ViTModel

    from tests.models.test_clip import clip_folder as _clip
    from tests.models.test_hf_text import tiny_st_folder as _st

    vit = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(vit)
    (vit / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    return {"st": str(_st.__wrapped__(tmp_path_factory)), "clip": str(_clip.__wrapped__(tmp_path_factory)),
            "vit": str(vit)}


def _images(tmp: Path) -> list[str]:
    g = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = tmp / f"{i}.png"
        Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


TEXTS = ["a red circle", "two dogs on the grass", "a man riding a bike"]


@pytest.mark.parametrize("name", list(TOWER_SPECS))
def test_tower_builds_trains_and_round_trips(name: str, folders: dict[str, str], tmp_path: Path) -> None:
    from itrkit.losses import ContrastiveLoss
    from itrkit.models.dual_encoder import ModelConfig, build_model
    from itrkit.models.io import load_model, save_model

    spec = TOWER_SPECS[name].format(**folders)
    modalities = _REGISTRY[name][2]
    image = spec if "image" in modalities else "tiny-image"
    text = spec if "text" in modalities else "tiny-text"
    torch.manual_seed(0)
    cfg = ModelConfig(image_tower=image, text_tower=text, cached_features=False, image_trainable="all",
                      text_trainable="all", embed_dim=8, usa_heads=True)
    model = build_model(cfg)
    paths = _images(tmp_path)
    out = model({"image_inputs": model.image_tower.prepare(paths), "text_inputs": model.text_tower.prepare(TEXTS)})
    assert out["image_embeds"].shape == (3, 8) and out["text_embeds"].shape == (3, 8) and "image_uni" in out
    terms = ContrastiveLoss()(out["image_embeds"], out["text_embeds"], torch.arange(3))
    assert set(terms) == {"contrastive_loss"} and torch.isfinite(terms["contrastive_loss"])
    terms["contrastive_loss"].backward()
    assert any(p.grad is not None for p in model.image_tower.parameters()) or not list(model.image_tower.parameters())
    model.eval()
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    np.testing.assert_array_equal(again.encode_images(paths), model.encode_images(paths))
    np.testing.assert_array_equal(again.encode_texts(TEXTS), model.encode_texts(TEXTS))


def _fusion_batch(region_dim: int, tokens: torch.Tensor, lengths: torch.Tensor) -> FusionBatch:
    g = torch.Generator().manual_seed(1)
    return FusionBatch(torch.rand(4, 6, region_dim, generator=g), tokens, lengths, torch.tensor([0, 1, 1, 2]),
                       torch.randn(4, 9, generator=g), torch.randn(4, 7, generator=g))


SMALL = {"sgr": {"embed_dim": 8, "sim_dim": 4, "word_dim": 8, "text_hidden": 8, "sgr_steps": 1},
         "saf": {"embed_dim": 8, "sim_dim": 4, "word_dim": 8, "text_hidden": 8},
         "rerank": {"embed_dim": 8, "width": 8, "heads": 2, "text_tower": {"embed_dim": 8, "hidden": 8}}}


def test_every_fusion_model_is_covered() -> None:
    assert set(SMALL) == set(list_fusion_models())


@pytest.mark.parametrize("name", list_fusion_models())
def test_fusion_model_builds_trains_and_round_trips(name: str, tmp_path: Path) -> None:
    from itrkit.config import from_dict
    from itrkit.models.io import load_fusion_model, save_fusion_model
    from itrkit.train.config import load_train_config
    from itrkit.train.tasks import FusionTask

    opts = from_dict(fusion_options_class(name), {"name": name, "region_dim": 5, "usa_heads": True, **SMALL[name]})
    torch.manual_seed(0)
    model = build_fusion_model(opts)
    enc = model.prepare_texts(TEXTS + ["a cat"])
    batch = _fusion_batch(5, enc["input_ids"], enc["lengths"])
    # the family's loss, built as the training task builds it (CUSA terms on)
    cfg = load_train_config(None, [f"model.name={name}", "loss.csa=0.5", "loss.usa=0.5"])
    task = FusionTask.__new__(FusionTask)
    task.cfg, task.model = cfg, model
    loss = task._build_loss()
    task.loss = loss
    model.train()
    terms = task.compute(task.after_gather(model(batch)), batch)
    keys = {k for k in terms if k.endswith("_loss")}
    assert {"csa_loss", "usa_loss"} <= keys and len(keys) >= 3 and all(torch.isfinite(terms[k]) for k in keys)
    sum(terms[k] for k in keys).backward()
    model.eval()
    save_fusion_model(model, tmp_path / "m")
    again, meta = load_fusion_model(tmp_path / "m")
    assert meta["model"]["name"] == name
    with torch.no_grad():
        a = model.score_all(batch.regions, batch.tokens, batch.lengths, progress=False)
        b = again.score_all(batch.regions, batch.tokens, batch.lengths, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
