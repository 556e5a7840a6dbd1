"""Transformer text towers: minilm / st:PATH equal sentence-transformers; hf:PATH mean pooling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from itrkit.errors import ConfigError
from itrkit.models.hf_text import minilm_path
from itrkit.models.towers import build_tower

TEXTS = [
    "A black dog and a spotted dog are fighting",
    "  two children play football in a park .  ",
    "x",
    "A man in a red shirt climbs a rock wall while another man belays him from below . " * 20,  # > 256 tokens
    "Ünïcödé café, naïve résumé — 東京",
]


@pytest.fixture(scope="module")
def minilm():
    return build_tower("minilm", "text")


@pytest.mark.slow
def test_minilm_equals_sentence_transformers_encode(minilm) -> None:
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(TEXTS, batch_size=2)
    with torch.inference_mode():
        ours = minilm(minilm.prepare(TEXTS)).numpy()
    assert ours.shape == (len(TEXTS), 384) and minilm.output_dim == 384
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert minilm.spec == {"name": "minilm"} and minilm.max_length == 256 and minilm.normalize
    assert len(minilm.blocks()) == 1 + 6  # embeddings + 6 layers (the unused pooler is left out)


@pytest.fixture(scope="module")
def tiny_st_folder(tmp_path_factory) -> Path:
    """A small random BERT saved as a sentence-transformers folder: CLS+mean pooling, Dense(tanh), Normalize."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-st")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": True}))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (root / "2_Dense").mkdir()
    (root / "2_Dense" / "config.json").write_text(json.dumps({
        "in_features": 64, "out_features": 16, "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh"}))
    save_file({"linear.weight": torch.randn(16, 64) * 0.3, "linear.bias": torch.randn(16) * 0.1},
              str(root / "2_Dense" / "model.safetensors"))
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    return root


def test_st_folder_with_dense_and_cls_mean_pooling_equals_sentence_transformers(tiny_st_folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    tower = build_tower(f"st:{tiny_st_folder}", "text")
    assert tower.output_dim == 16 and tower.pooling == ("cls", "mean") and tower.max_length == 12
    ref = SentenceTransformer(str(tiny_st_folder), device="cpu").encode(TEXTS)
    with torch.inference_mode():
        ours = tower(tower.prepare(TEXTS)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    again = build_tower(tower.spec, "text")
    assert again.spec == tower.spec and again.fingerprint() == tower.fingerprint()
    assert isinstance(tower.blocks()[-1], torch.nn.Module) and len(tower.blocks()) == 1 + 2 + 1


def test_hf_folder_mean_pooling_equals_per_sentence_loop(tiny_st_folder: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    tower = build_tower({"name": "hf", "path": str(tiny_st_folder)}, "text")
    assert tower.output_dim == 32 and not tower.normalize and tower.max_length == 64
    texts = ["a dog", "the quick brown fox jumps over the lazy dog", "x y"]
    with torch.inference_mode():
        ours = tower(tower.prepare(texts))
        model = BertModel.from_pretrained(str(tiny_st_folder), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(tiny_st_folder), local_files_only=True)
        for i, t in enumerate(texts):  # one sentence at a time: no padding at all
            hidden = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
            torch.testing.assert_close(ours[i], hidden.mean(0), atol=1e-5, rtol=1e-4)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a sentence-transformers folder"):
        build_tower(f"st:{tmp_path}", "text")
    with pytest.raises(ConfigError, match="is not a model folder"):
        build_tower(f"hf:{tmp_path / 'missing'}", "text")
    with pytest.raises(ConfigError, match="takes no path"):
        build_tower({"name": "minilm", "path": str(tmp_path)}, "text")
