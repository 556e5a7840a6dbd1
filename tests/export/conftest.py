"""Models to export: real towers (MiniLM, EfficientNet-Lite0), a tiny random CLIP saved to disk,
tiny towers; heads and trunks get random weights so an export that dropped or mis-ordered a
stage could not match by accident (a fresh trunk is the identity, a fresh head near zero)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itrkit.models.dual_encoder import DualEncoder, ModelConfig, build_model
from itrkit.models.io import save_model

CAPTIONS = ["A dog runs on the beach.", "  two CATS sleep on a red sofa  ", "a man rides a bike", "x",
            "a very long caption " * 40]


def randomise_heads(model: DualEncoder, seed: int = 0) -> DualEncoder:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("image_tower.", "text_tower.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def save_run(model: DualEncoder, folder: Path) -> Path:
    """A run-shaped folder: ``folder/model/`` (what ``itrkit train`` writes as the selected model)."""
    save_model(model, folder / "model")
    return folder


def images(n: int = 4, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (80, 40), (33, 33), (120, 90), (64, 64)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="session")
def minilm_mlp_run(tmp_path_factory) -> tuple[Path, DualEncoder]:
    """EfficientNet-Lite0 + all-MiniLM-L6-v2 (from the PyPI wheels), residual MLP trunks, USA heads."""
    cfg = ModelConfig(image_tower="efficientnet-lite0", text_tower="minilm", embed_dim=32, trunk="mlp",
                      trunk_hidden=48, usa_heads=True, usa_dim=24)
    model = randomise_heads(build_model(cfg), seed=1).eval()
    return save_run(model, tmp_path_factory.mktemp("minilm-mlp")), model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, DualEncoder]:
    cfg = ModelConfig(image_tower="tiny-image", text_tower="tiny-text", embed_dim=16, trunk="mlp", trunk_hidden=24,
                      usa_heads=False)
    model = randomise_heads(build_model(cfg), seed=2).eval()
    return save_run(model, tmp_path_factory.mktemp("tiny")), model


# --- a tiny random CLIP folder (the loaders are the real ones; no hub access) ---------------------
def _byte_chars() -> list[str]:
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-clip")
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in _byte_chars():
            vocab[c + suffix] = len(vocab)
    merges = [("a", "t</w>"), ("d", "o"), ("do", "g</w>"), ("c", "at</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=eos,
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 32}}))
    return root


@pytest.fixture(scope="session")
def clip_run(clip_folder: Path, tmp_path_factory) -> tuple[Path, DualEncoder]:
    cfg = ModelConfig(image_tower=f"clip:{clip_folder}", text_tower=f"clip:{clip_folder}", embed_dim=20,
                      trunk="mlp", trunk_hidden=40, image_trainable="all", text_trainable="all",
                      cached_features=False)
    model = randomise_heads(build_model(cfg), seed=3)
    with torch.no_grad():  # a "fine-tuned" tower: its weights differ from the folder's
        model.image_tower.vision_model.post_layernorm.bias.add_(0.3)
        model.text_tower.projection.weight.mul_(1.5)
    run = save_run(model.eval(), tmp_path_factory.mktemp("clip-run"))
    (run / "metrics.json").write_text(json.dumps({"temperatures": {"tau": 0.05}}))
    return run, model


@pytest.fixture(scope="session")
def tiny_bert_run(tmp_path_factory) -> tuple[Path, DualEncoder]:
    """``hf:PATH`` on a tiny random BERT saved to disk: lower-casing tokenizer, cls+mean pooling
    (two modes concatenated), not normalised; residual trunk and USA heads."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from itrkit.models.towers import build_tower

    root = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for c in CAPTIONS for w in c.lower().replace(".", " .").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz."]
    (root / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=24)).save_pretrained(root)
    BertTokenizer(str(root / "vocab.txt"), do_lower_case=True).save_pretrained(root)
    cfg = ModelConfig(image_tower="tiny-image", text_tower=f"hf:{root}", embed_dim=12, trunk="mlp", trunk_hidden=20,
                      usa_heads=True, usa_dim=10)
    text = build_tower({"name": f"hf:{root}", "pooling": "mean+cls"}, "text")
    model = randomise_heads(DualEncoder(build_tower("tiny-image", "image"), text, cfg), seed=4).eval()
    return save_run(model, tmp_path_factory.mktemp("bert-run")), model
