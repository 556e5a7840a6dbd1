"""``model.word_features=minilm``: the fusion matchers' word features are frozen all-MiniLM-L6-v2
token states from the prefix cache. The states a training batch and the evaluator's caption
chunks hand the model are compared with MiniLM's live ``last_hidden_state`` (an independent
forward, not the cache's code path), the masks with the tokenizer's attention mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.data.records import Dataset
from itrkit.errors import ConfigError
from tests.conftest import pixel_grid_store

TOL = {"float32": 1e-5, "float16": 2e-2}


@pytest.fixture(scope="module")
def word_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from itrkit.data.synthetic import make_synthetic
    from itrkit.eval.fusion import minilm_tower
    from itrkit.teachers.grid import open_grid_store

    root = tmp_path_factory.mktemp("words")
    make_synthetic(root / "syn", n_images=12, captions_per_image=2, seed=2, size=32)
    ds = Dataset.load(root / "syn").split("train")
    grid = open_grid_store(pixel_grid_store(ds, root / "grid.store"))
    return {"ds": ds, "grid": grid, "root": root, "tower": minilm_tower()}


def _live(tower, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiniLM's own forward on these captions: (last_hidden_state, attention_mask, input_ids)."""
    x = tower.prepare(texts)
    with torch.no_grad():
        h = tower.model(**x, return_dict=True).last_hidden_state
    return h, x["attention_mask"], x["input_ids"]


def _assert_states_match(states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                         live: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tol: float) -> None:
    h, live_mask, live_ids = live
    assert torch.equal(mask.long(), live_mask.long())
    assert torch.equal(lengths, live_mask.sum(1)) and torch.equal(tokens[:, :h.shape[1]], live_ids)
    real = live_mask.bool()
    err = float((states[:, :h.shape[1]][real] - h[real]).abs().max())
    assert err <= tol, err
    assert float(h[real].abs().max()) > 0.1  # not trivially small


def _sgr(word_dtype: str):
    from itrkit.models.sgraf import SGR

    torch.manual_seed(0)
    return SGR(region_dim=12, embed_dim=16, sim_dim=8, sgr_steps=1, word_features="minilm", prefix_dtype=word_dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_batch_and_evaluator_word_states_equal_minilm_last_hidden_state(word_data: dict, dtype: str,
                                                                         tmp_path: Path) -> None:
    from itrkit.eval.fusion import make_split

    ds = word_data["ds"]
    split = make_split(_sgr(dtype), ds, word_data["grid"], cache_dir=tmp_path)
    assert split.word_states.meta["dtype"] == dtype
    # A training batch: images 0..5 with one caption each (second captions, mixed lengths).
    img = np.arange(6)
    caps = split.first_caption[img] + 1
    b = split.batch(img, caps)
    assert b.word_states is not None and b.word_mask is not None and b.word_states.shape[2] == 384
    _assert_states_match(b.word_states, b.word_mask, b.tokens, b.lengths,
                         _live(word_data["tower"], [ds.texts[i] for i in caps]), TOL[dtype])
    # The evaluator's reader: caption chunks of the length order it scores in.
    order = torch.argsort(split.lengths, stable=True).numpy()
    read = split.word_reader(order)
    for start in (0, 5):
        rows = order[start:start + 5]
        states = read(start, start + 5)
        live = _live(word_data["tower"], [ds.texts[i] for i in rows])
        _assert_states_match(states, live[1], split.tokens[rows], split.lengths[rows], live, TOL[dtype])
    # The split's tokens and lengths (every caption) are the tokenizer's ids and mask sums.
    h, mask, ids = _live(word_data["tower"], ds.texts)
    assert torch.equal(split.lengths, mask.sum(1)) and torch.equal(split.tokens[:, :ids.shape[1]], ids)


def test_sgr_word_vectors_are_the_projected_states_and_ignore_padding(word_data: dict, tmp_path: Path) -> None:
    from itrkit.eval.fusion import make_split
    from itrkit.models.sgraf import l2norm

    model = _sgr("float32").eval()
    split = make_split(model, word_data["ds"], word_data["grid"], cache_dir=tmp_path)
    caps = np.arange(8)
    b = split.batch(np.arange(8), caps)
    words, lengths = model.encode_texts(b.tokens, b.lengths, b.word_states)
    W, bias = model.txt_fc.weight.detach(), model.txt_fc.bias.detach()
    for i in range(len(caps)):  # explicit loop over captions and tokens
        for j in range(words.shape[1]):
            want = l2norm(W @ b.word_states[i, j] + bias) if j < int(b.lengths[i]) else torch.zeros(16)
            torch.testing.assert_close(words[i, j].detach(), want, atol=1e-6, rtol=1e-5)
    noisy = b.word_states.clone()
    noisy[~b.word_mask.bool()] = 1e3  # whatever sits at padded positions never reaches the model
    torch.testing.assert_close(model.encode_texts(b.tokens, b.lengths, noisy)[0], words)


def test_other_caption_texts_are_another_cache_entry(word_data: dict, tmp_path: Path) -> None:
    from itrkit.eval.fusion import caption_states

    texts = list(word_data["ds"].texts[:6])
    a = caption_states(texts, tmp_path, "float32")
    changed = [*texts[:2], "a purple elephant reads a newspaper", *texts[3:]]
    b = caption_states(changed, tmp_path, "float32")
    assert a.folder != b.folder and a.folder.is_dir() and b.folder.is_dir()
    assert len(list((tmp_path / "prefix").iterdir())) == 2
    assert caption_states(texts, tmp_path, "float32").folder == a.folder  # the same texts: the same entry
    h, mask, _ = _live(word_data["tower"], changed[2:3])
    got = b.batch(np.array([2]))
    assert torch.equal(got["attention_mask"], mask)
    assert float((got["hidden"] - h).abs().max()) <= 1e-5
    old = a.batch(np.array([2]))["hidden"]
    assert old.shape != got["hidden"].shape or float((old - got["hidden"]).abs().max()) > 0.1


@pytest.mark.parametrize("name", ["sgr", "saf", "rerank"])
def test_unknown_word_features_is_a_one_line_config_error_naming_the_key(name: str) -> None:
    from itrkit.train.config import load_train_config

    with pytest.raises(ConfigError) as e:
        load_train_config(None, [f"model.name={name}", "model.word_features=bert"])
    assert "model.word_features" in str(e.value) and "bert" in str(e.value) and "\n" not in str(e.value)


def test_minilm_models_have_no_gru_and_refuse_missing_states() -> None:
    from itrkit.models.rerank import ReRanker

    torch.manual_seed(0)
    rr = ReRanker(region_dim=12, embed_dim=16, width=16, heads=2, word_features="minilm")
    assert rr.text_tower is None and not any(k.startswith("text_tower") for k in rr.state_dict())
    assert rr.word_proj.in_features == 384
    with pytest.raises(ConfigError, match="word_features=minilm"):
        rr.encode_texts(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 2]))
    with pytest.raises(ConfigError, match="word_features=minilm"):
        rr.prepare_texts(["a dog"])


def test_top_layers_over_the_cached_prefix_equal_minilm_last_hidden_state(word_data: dict, tmp_path: Path) -> None:
    from itrkit.eval.fusion import make_split
    from itrkit.models.sgraf import SGR

    torch.manual_seed(0)
    model = SGR(region_dim=12, embed_dim=16, sim_dim=8, sgr_steps=1, word_features="minilm",
                prefix_dtype="float32", text_trainable="top:2").eval()
    # Only the two top layers are the model's (trainable, saved); the frozen prefix is cached.
    keys = {k.split(".")[4] for k in model.state_dict() if k.startswith("text_tower.")}
    assert keys == {"0", "1"} and all(p.requires_grad for p in model.text_tower.parameters())
    split = make_split(model, word_data["ds"], word_data["grid"], cache_dir=tmp_path)
    assert split.word_states.cut == len(word_data["tower"].blocks()) - 2
    caps = np.arange(0, 12, 2)
    b = split.batch(np.arange(6), caps)
    with torch.no_grad():
        top = model.text_tower(b.word_states, b.lengths)
    _assert_states_match(top, b.word_mask, b.tokens, b.lengths,
                         _live(word_data["tower"], [word_data["ds"].texts[i] for i in caps]), 1e-5)
    with pytest.raises(ConfigError, match="model.text_trainable"):
        SGR(region_dim=12, word_features="minilm", text_trainable="top:7")
    with pytest.raises(ConfigError, match="word_features=minilm"):
        SGR(region_dim=12, text_trainable="top:1")
