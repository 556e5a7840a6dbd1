"""clip:PATH and hf-vision:PATH on tiny random models saved to disk (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itrkit.errors import ConfigError
from itrkit.models.towers import build_tower


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _byte_chars():
        vocab[c] = len(vocab)
    for c in _byte_chars():
        vocab[c + "</w>"] = len(vocab)
    merges = [("a", "t</w>"), ("d", "o"), ("do", "g</w>"), ("c", "at</w>"), ("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges), vocab


def save_tiny_clip(root: Path, layers: int = 2, max_positions: int = 16, dropout: float = 0.0) -> Path:
    """A tiny random ``CLIPModel`` (+ tokenizer, preprocessor config) saved to ``root``."""
    from transformers import CLIPConfig, CLIPModel

    tok, vocab = _tiny_clip_tokenizer()
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=max_positions, eos_token_id=eos,
                         bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos, dropout=dropout),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=32, patch_size=8, dropout=dropout),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": 32}}))
    return root


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _reference_model(folder: Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()


def test_clip_image_tower_equals_get_image_features(clip_folder: Path) -> None:
    tower = build_tower(f"clip:{clip_folder}", "image")
    assert tower.output_dim == 24 and tower.spec == {"name": "clip", "path": str(clip_folder.resolve())}
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    x = tower.prepare(imgs)
    # Preprocessing by hand: shorter side 48 → 32 (width 42.7 → 43, bicubic), centre crop from
    # column round(5.5) = 6, /255, (x − mean)/std.
    resized = np.asarray(imgs[0].resize((43, 32), Image.BICUBIC), np.float32)[:, 6:38] / 255.0
    ref = (resized - np.array([0.5, 0.4, 0.3], np.float32)) / np.array([0.2, 0.25, 0.3], np.float32)
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    with torch.inference_mode():
        ours = tower(x)
        theirs = _reference_model(clip_folder).get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(ours, theirs)
    assert len(tower.blocks()) == 1 + 2 + 1


def test_clip_text_tower_equals_get_text_features(clip_folder: Path) -> None:
    tower = build_tower({"name": f"clip:{clip_folder}"}, "text")
    texts = ["the dog", "a cat at the door of the house", "the the the the the the the the the the the"]
    inputs = tower.prepare(texts)
    assert inputs["input_ids"].shape[1] <= 16  # truncated to the position table
    with torch.inference_mode():
        ours = tower(inputs)
        theirs = _reference_model(clip_folder).get_text_features(**inputs).pooler_output
    assert ours.shape == (3, 24)
    torch.testing.assert_close(ours, theirs)
    tower.set_trainable("top:1")
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {"text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias",
                         "projection.weight"}
    with pytest.raises(ConfigError, match="image side only"):
        build_tower({"name": f"clip:{clip_folder}", "image_size": 64}, "text")


def test_clip_image_tower_at_another_size_interpolates_positions(clip_folder: Path) -> None:
    tower = build_tower({"name": f"clip:{clip_folder}", "image_size": 48}, "image")
    x = tower.prepare([Image.new("RGB", (100, 60), (200, 30, 10))])
    assert x.shape == (1, 3, 48, 48)
    with torch.inference_mode():
        ours = tower(x)
        theirs = _reference_model(clip_folder).get_image_features(pixel_values=x, interpolate_pos_encoding=True)
    torch.testing.assert_close(ours, theirs.pooler_output)


def test_hf_vision_tower_pooled_output(tmp_path: Path, clip_folder: Path) -> None:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    ViTModel(cfg).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    tower = build_tower(f"hf-vision:{tmp_path}", "image")
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 50, 3), dtype=np.uint8))
    x = tower.prepare([img])
    # ViT-style processors resize to height×width without cropping.
    ref = (np.asarray(img.resize((32, 32), Image.BICUBIC), np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(2, 0, 1), atol=1e-5)
    model = ViTModel.from_pretrained(str(tmp_path), local_files_only=True).eval()
    with torch.inference_mode():
        out = model(pixel_values=x)
        torch.testing.assert_close(tower(x), out.pooler_output)
        mean_tower = build_tower({"name": f"hf-vision:{tmp_path}", "pooling": "mean"}, "image")
        torch.testing.assert_close(mean_tower(x), out.last_hidden_state.mean(1))
    assert tower.output_dim == 32 and len(tower.blocks()) >= 3
    with pytest.raises(ConfigError, match="is a CLIP model"):
        build_tower(f"hf-vision:{clip_folder}", "image")
