"""ReRanker (ITC dual encoder + ITM fusion head) and the re-ranking callback, against explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itrkit.errors import ConfigError
from itrkit.eval.fusion import evaluate_reranker
from itrkit.eval.rerank import make_rerank
from itrkit.eval.retrieval import evaluate_retrieval, metrics_from_ranks, metrics_from_scores
from itrkit.losses import ContrastiveLoss
from itrkit.losses.itm import mining_generator, sample_hard_negatives, soft_negative_targets
from itrkit.losses.matching import ReRankLoss
from itrkit.losses.soft_labels import SoftLabelLoss
from itrkit.models.fusion_base import FusionBatch
from itrkit.models.rerank import Attention, ReRanker

TEXT = {"embed_dim": 16, "hidden": 24, "max_length": 16, "seed": 3}


@pytest.fixture(scope="module")
def tower():
    from itrkit.models.rnn import RNNTextTower

    return RNNTextTower("gru", **TEXT)


LOSS_KEYS = ("alpha", "beta", "soft_itm", "soft_itm_tau", "tau_teacher", "tau")


class _Trained:
    """A re-ranker with its training loss (:class:`ReRankLoss`), called like the old model+loss:
    ``m(batch, step=…)`` → the loss terms."""

    def __init__(self, model: ReRanker, loss: ReRankLoss) -> None:
        self.model, self.loss = model, loss

    def __getattr__(self, name):
        return getattr(self.model, name)

    def train(self):
        self.model.train()
        self.loss.train()
        return self

    def __call__(self, batch: FusionBatch, step: int | None = None):
        if step is not None:
            self.loss.mining_step.fill_(step)
        out = self.model(batch)
        return self.loss(out, batch.img_ids, batch.t_img, batch.t_txt, lambda i, t: self.model.itm_batch_pairs(out, i, t))


def _model(tower, seed: int = 0, **kw):
    torch.manual_seed(seed)
    lk = {k: kw.pop(k) for k in LOSS_KEYS if k in kw}
    args = {"embed_dim": 16, "width": 16, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "pair_batch": 7, **kw}
    if lk.get("beta", 0) > 0:
        args["usa_heads"] = True
    m = ReRanker(region_dim=12, text_tower=TEXT, **args).double()
    if not lk:
        return m
    soft = SoftLabelLoss(alpha=lk.get("alpha", 0.0), beta=lk.get("beta", 0.0), tau_teacher=lk.get("tau_teacher", 0.1))
    loss = ReRankLoss(ContrastiveLoss(tau=lk.get("tau", 0.05)), soft_itm=lk.get("soft_itm", 0.0),
                      soft_itm_tau=lk.get("soft_itm_tau", 0.0), soft=soft).double()
    return _Trained(m, loss)


def _batch(seed: int, b: int = 6, r: int = 5, ids=None, teacher: bool = False) -> FusionBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (b,), generator=g)
    tokens = torch.randint(1000, 3000, (b, int(lengths.max()) + 2), generator=g)
    ids = torch.arange(b) if ids is None else torch.as_tensor(ids)
    return FusionBatch(torch.randn(b, r, 12, generator=g, dtype=torch.float64), tokens, lengths, ids,
                       torch.randn(b, 9, generator=g, dtype=torch.float64) if teacher else None,
                       torch.randn(b, 7, generator=g, dtype=torch.float64) if teacher else None)


# --- the fusion head -------------------------------------------------------------------------
def _attention_loop(att: Attention, x: torch.Tensor, ctx: torch.Tensor, n_keys: int) -> torch.Tensor:
    """One sequence: every head and query position by hand, keys restricted to the first n_keys."""
    w = x.shape[1]
    h = att.heads
    d = w // h
    q, k, v = att.q(x), att.k(ctx[:n_keys]), att.v(ctx[:n_keys])
    out = torch.zeros_like(x)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        for i in range(x.shape[0]):
            logits = [(q[i, sl] @ k[j, sl]).item() / math.sqrt(d) for j in range(n_keys)]
            mx = max(logits)
            e = [math.exp(z - mx) for z in logits]
            ctx_vec = sum(e[j] / sum(e) * v[j, sl] for j in range(n_keys))
            out[i, sl] = ctx_vec
    return att.out(out)


def test_attention_matches_loop():
    torch.manual_seed(0)
    att = Attention(8, 2).double()
    x, ctx = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    n_keys = torch.tensor([6, 2, 4])
    mask = torch.arange(6)[None, :] < n_keys[:, None]
    got = att(x, ctx, mask)
    for b in range(3):
        torch.testing.assert_close(got[b], _attention_loop(att, x[b], ctx[b], int(n_keys[b])))


def _itm_loop(m: ReRanker, regions: torch.Tensor, words: torch.Tensor) -> float:
    """ITM logit of one (image, caption) pair without padding, built from primitive ops."""

    def ln(mod, t):
        return F.layer_norm(t, (t.shape[-1],), mod.weight, mod.bias, mod.eps)

    x = words
    for blk in m.blocks:
        y = ln(blk.ln_self, x)
        x = x + _attention_loop(blk.self_attn, y, y, len(y))
        x = x + _attention_loop(blk.cross_attn, ln(blk.ln_cross, x), regions, len(regions))
        x = x + blk.mlp[2](F.gelu(blk.mlp[0](ln(blk.ln_mlp, x))))
    x = ln(m.ln_final, x)
    logit = m.itm_head(x.mean(0)).item()
    if m.itm_residual:  # + scale · cos(ITC image, ITC caption)
        logit += m.itm_sim_scale.item() * _cos(m.itc_image(regions.mean(0)), m.itc_text(words.mean(0)))
    return logit


@pytest.mark.parametrize("residual", [False, True])
def test_itm_head_matches_per_pair_loop(tower, residual):
    m = _model(tower, itm_residual=residual).eval()
    bt = _batch(1)
    with torch.no_grad():
        img = m.encode_images(bt.regions)
        words, lengths = m.encode_texts(bt.tokens, bt.lengths)
        img_index = torch.tensor([0, 3, 3, 5, 1, 0])
        got = m.itm_pairs(img, words, lengths, img_index)
        full = m.score(img, words, lengths)
        for p in range(6):
            ref = _itm_loop(m, img[img_index[p]], words[p, :lengths[p]])
            assert got[p].item() == pytest.approx(ref, abs=1e-9)
            # score() is every image with every caption, batched with padding
            assert full[img_index[p], p].item() == pytest.approx(ref, abs=1e-6)
        # score_all (blocks of images / captions) equals score on the whole split
        torch.testing.assert_close(m.score_all(bt.regions, bt.tokens, bt.lengths, img_chunk=4, txt_chunk=4,
                                               progress=False), full)


# --- hard negatives --------------------------------------------------------------------------
def _sample_loop(sim: np.ndarray, ids: list[int], u: np.ndarray) -> tuple[list[int], list[int]]:
    b = len(ids)

    def draw(row: list[float], allowed: list[bool], ui: float) -> int:
        if not any(allowed):
            return -1
        mx = max(z for z, a in zip(row, allowed) if a)
        w = [math.exp(z - mx) if a else 0.0 for z, a in zip(row, allowed)]
        total, acc = sum(w), 0.0
        for j in range(b):
            acc += w[j]
            if acc > ui * total and allowed[j]:
                return j
        return max(j for j in range(b) if allowed[j])

    neg_txt = [draw(list(sim[i]), [ids[j] != ids[i] for j in range(b)], u[0, i]) for i in range(b)]
    neg_img = [draw(list(sim[:, j]), [ids[i] != ids[j] for i in range(b)], u[1, j]) for j in range(b)]
    return neg_txt, neg_img


def test_hard_negatives_match_loop_and_never_positive():
    ids = [0, 0, 1, 2, 2, 2, 3, 4]
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        sim = torch.randn(8, 8, generator=g, dtype=torch.float64) * 3
        neg_txt, neg_img = sample_hard_negatives(sim, torch.tensor(ids), torch.Generator().manual_seed(seed))
        u = torch.rand(2, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
        ref_txt, ref_img = _sample_loop(sim.numpy(), ids, u)
        assert neg_txt.tolist() == ref_txt and neg_img.tolist() == ref_img
        for i in range(8):
            assert ids[neg_txt[i]] != ids[i] and ids[neg_img[i]] != ids[i]


def test_hard_negatives_follow_softmax_and_are_deterministic():
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([0, 1, 2, 3, 3])
    a = sample_hard_negatives(sim, ids, torch.Generator().manual_seed(7))
    b = sample_hard_negatives(sim, ids, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Frequencies: B rows that all see the same column logits v[j % 4] (own column excluded), one
    # draw each; the expected category mass is averaged over rows.
    n = 2000
    v = torch.tensor([1.0, 0.0, -1.0, 2.0], dtype=torch.float64)
    big = v[torch.arange(n) % 4].expand(n, n)
    neg_txt, neg_img = sample_hard_negatives(big, torch.arange(n), torch.Generator().manual_seed(0))
    assert not bool((neg_txt == torch.arange(n)).any())
    freq = torch.bincount(neg_txt % 4, minlength=4).double() / n
    expected = torch.zeros(4, dtype=torch.float64)
    for c in range(4):
        own = torch.zeros(4, dtype=torch.float64)
        own[c] = 1
        mass = (n / 4 - own) * v.exp()
        expected += mass / mass.sum() / 4
    torch.testing.assert_close(freq, expected, atol=0.04, rtol=0)
    # caption side: column j's logits are all v[j % 4], so the image draw is uniform over i ≠ j
    assert not bool((neg_img == torch.arange(n)).any())
    torch.testing.assert_close(torch.bincount(neg_img % 4, minlength=4).double() / n,
                               torch.full((4,), 0.25, dtype=torch.float64), atol=0.04, rtol=0)
    # no negative in the batch: -1
    none = sample_hard_negatives(torch.zeros(3, 3), torch.tensor([5, 5, 5]), torch.Generator().manual_seed(0))
    assert none[0].tolist() == [-1, -1, -1] and none[1].tolist() == [-1, -1, -1]


# --- the training loss -----------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("soft_itm, soft_tau", [(0.0, 0.0), (0.3, 0.0), (0.3, 0.7)])
def test_itm_loss_matches_per_pair_bce_loop(tower, soft_itm, soft_tau):
    ids = [0, 1, 1, 2, 3, 4]
    m = _model(tower, alpha=0.0, beta=0.0, soft_itm=soft_itm, tau_teacher=0.2, soft_itm_tau=soft_tau)
    tau_t = soft_tau or 0.2
    m.train()
    bt = _batch(2, ids=ids, teacher=True)
    out = m(bt, step=11)
    params = [m.itm_head.weight, m.blocks[0].cross_attn.k.weight, m.region_proj[1].weight, m.word_proj.weight]
    got_grads = torch.autograd.grad(out["itm_loss"], params)

    # reference: ITC embeddings and similarities by hand, the same draw, per-pair logits and BCE
    img = m.encode_images(bt.regions)
    words, lengths = m.encode_texts(bt.tokens, bt.lengths)
    zi = [m.itc_image(img[i].mean(0)) for i in range(6)]
    zt = [m.itc_text(words[j, :lengths[j]].mean(0)) for j in range(6)]
    tau = m.loss.contrastive.tau.item()
    sim = torch.tensor([[_cos(zi[i].detach(), zt[j].detach()) / tau for j in range(6)] for i in range(6)])
    u = torch.rand(2, 6, generator=mining_generator(0, 11), dtype=torch.float64).numpy()
    neg_txt, neg_img = _sample_loop(sim.numpy(), ids, u)
    pairs = [(i, i, 1.0) for i in range(6)]

    def target(t, a, b):  # teacher soft label ratio p[a, b] / p[a, a] by hand
        row = [math.exp(_cos(t[a], t[c]) / tau_t) for c in range(6)]
        return soft_itm * row[b] / row[a]

    pairs += [(i, neg_txt[i], target(bt.t_img, i, neg_txt[i])) for i in range(6) if neg_txt[i] >= 0]
    pairs += [(neg_img[j], j, target(bt.t_txt, j, neg_img[j])) for j in range(6) if neg_img[j] >= 0]
    assert len(pairs) == 18
    total = 0.0
    for i, j, y in pairs:
        z = m.itm_pairs(img[i:i + 1], words[j:j + 1, :lengths[j]], lengths[j:j + 1])[0]
        total = total - (y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))
    ref = total / len(pairs)
    assert out["itm_loss"].item() == pytest.approx(ref.item(), rel=1e-9)
    for g_got, g_ref in zip(got_grads, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g_got, g_ref)


def test_soft_targets_formula():
    p = torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1)
    q = torch.softmax(torch.randn(4, 4, dtype=torch.float64), 1)
    y_i, y_t = soft_negative_targets(p, q, torch.tensor([2, -1, 0, 1]), torch.tensor([1, 3, -1, 0]), 0.5)
    ref_i = [0.5 * min(1.0, p[0, 2] / p[0, 0]), 0.5 * min(1.0, p[2, 0] / p[2, 2]), 0.5 * min(1.0, p[3, 1] / p[3, 3])]
    ref_t = [0.5 * min(1.0, q[0, 1] / q[0, 0]), 0.5 * min(1.0, q[1, 3] / q[1, 1]), 0.5 * min(1.0, q[3, 0] / q[3, 3])]
    assert y_i.tolist() == pytest.approx([float(v) for v in ref_i])
    assert y_t.tolist() == pytest.approx([float(v) for v in ref_t])
    # a negative the teacher ranks above the anchor's own pair: target s, never above (BCE needs y <= 1)
    p = torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]], dtype=torch.float64)
    y_i, _ = soft_negative_targets(p, p, torch.tensor([1, 2, 0]), torch.tensor([-1, -1, -1]), 1.0)
    assert y_i.tolist() == pytest.approx([1.0, 1.0, 0.125])


def test_forward_terms_step_counter_and_teacher_check(tower):
    m = _model(tower, alpha=0.3, beta=0.75, soft_itm=0.3).train()
    bt = _batch(3, teacher=True)
    out = m(bt)
    assert {"contrastive_loss", "itm_loss", "csa_loss", "usa_loss"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    assert int(m.loss.mining_step) == 1 and "mining_step" in m.loss.state_dict()
    # the same step draws the same negatives: identical losses
    assert m(bt, step=0)["itm_loss"].item() == out["itm_loss"].item()
    with pytest.raises(ConfigError, match="teacher features"):
        m(_batch(3))
    plain = _model(tower, tau=0.05)
    assert set(k for k in plain(_batch(3)) if k.endswith("_loss")) == {"contrastive_loss", "itm_loss"}


# --- re-ranking -------------------------------------------------------------------------------
def _brute_ranks(itc: np.ndarray, itm: np.ndarray, t2i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: ITC order (ties: lower index), top k re-sorted by ITM (ties: lower index), rest kept."""

    def order(first: np.ndarray, second: np.ndarray) -> list[int]:
        o = sorted(range(len(first)), key=lambda j: (-first[j], j))
        head = sorted(o[:k], key=lambda j: (-second[j], j))
        return head + o[k:]

    n, m = itc.shape
    i2t = np.array([min(order(itc[i], itm[i]).index(c) for c in range(m) if t2i[c] == i) for i in range(n)])
    t2i_r = np.array([order(itc[:, c], itm[:, c]).index(int(t2i[c])) for c in range(m)])
    return i2t, t2i_r


@pytest.mark.parametrize("k", [1, 3, 7])
def test_make_rerank_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    img, txt = torch.randn(9, 4, generator=g), torch.randn(20, 4, generator=g)
    txt[5] = txt[2]  # exact ties in the first stage
    t2i = np.array([i % 9 for i in range(20)])
    itm = torch.randint(0, 4, (9, 20), generator=g).double()  # many ties in the second stage
    calls = []

    def score_pairs(ii, tt):
        calls.append(len(ii))
        return itm[ii, tt]

    got = evaluate_retrieval(img, txt, t2i, chunk_size=4, rerank=make_rerank(score_pairs, k, batch_size=5,
                                                                             progress=False))
    itc = (F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T).numpy()
    ref = metrics_from_ranks(*_brute_ranks(itc, itm.numpy(), t2i, k))
    assert got == pytest.approx(ref)
    assert sum(calls) == 9 * k + 20 * k and max(calls) <= 5
    # the one-call form of the public evaluator
    assert evaluate_retrieval(img, txt, t2i, chunk_size=4, rerank_k=k, score_pairs=score_pairs) == pytest.approx(ref)
    with pytest.raises(ConfigError, match="score_pairs"):
        evaluate_retrieval(img, txt, t2i, rerank_k=k)


def test_rerank_callback_row_values():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.3]])
    itm = torch.tensor([5.0, 1.0, 7.0, 3.0, 0.0])
    new = make_rerank(lambda ii, tt: itm[tt], 3, progress=False)(scores, torch.tensor([0]), "i2t")
    # ITC top 3: 0, 2, 3 (tie → lower index); ITM 5, 7, 3 → 2, 0, 3; then 4, 1 in ITC order
    assert torch.argsort(-new[0]).tolist() == [2, 0, 3, 4, 1]
    assert make_rerank(lambda ii, tt: tt, 0)(scores, torch.tensor([0]), "i2t") is scores
    with pytest.raises(ConfigError):
        make_rerank(lambda ii, tt: tt, -1)


def test_model_evaluate_k0_and_full_k(tower):
    m = _model(tower, rerank_k=4).float().eval()
    g = torch.Generator().manual_seed(5)
    n = 7
    regions = torch.randn(n, 5, 12, generator=g)
    lengths = torch.randint(1, 9, (2 * n,), generator=g)
    tokens = torch.randint(1000, 3000, (2 * n, 9), generator=g)
    t2i = np.repeat(np.arange(n), 2)
    enc = m.encode_split(regions, tokens, lengths, progress=False)
    plain = evaluate_retrieval(enc["img_emb"], enc["txt_emb"], t2i)
    def ev(**kw):
        return evaluate_reranker(m, regions, tokens, lengths, t2i, progress=False, **kw)

    assert ev(rerank_k=0)["rerank"] == plain
    both = ev()
    assert both["itc"] == plain
    assert both["rerank"] == ev(itc=False)["rerank"]
    full = metrics_from_scores(m.score_all(regions, tokens, lengths, progress=False), t2i)
    assert ev(rerank_k=2 * n)["rerank"] == pytest.approx(full)


# --- learning (through the fusion trainer) ---------------------------------------------------------
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "ring", "cross"]


def _toy_data(folder, seed: int = 0):
    """36 (colour, shape) scenes: two train instances and one val instance of each. Regions: 4 slots
    holding fixed random codes of the colour and the shape (shuffled slots) + noise; two captions."""
    from itrkit.data.records import Caption, Dataset, ImageRecord
    from itrkit.teachers.store import FeatureStore

    rng = np.random.default_rng(seed)
    codes = np.random.default_rng(123).standard_normal((12, 12)).astype(np.float32)
    records, rows = [], []
    for k, split in enumerate(("train", "train", "val")):
        for c in range(6):
            for s in range(6):
                reg = 0.3 * rng.standard_normal((4, 12)).astype(np.float32)
                slots = rng.permutation(4)
                reg[slots[0]] += codes[c]
                reg[slots[1]] += codes[6 + s]
                iid = f"{split}{k}-{c}-{s}"
                caps = [Caption(f"{iid}#0", f"a {COLOURS[c]} {SHAPES[s]}"),
                        Caption(f"{iid}#1", f"the {SHAPES[s]} is {COLOURS[c]}")]
                records.append(ImageRecord(iid, folder / f"{iid}.png", caps, split))
                rows.append(reg.reshape(-1))
    ds = Dataset(records, name="toy")
    ds.save(folder / "data", image_root=folder)
    w = FeatureStore.create(folder / "grid.store", ds.image_ids, 48, {"name": "toy", "class": "grid"}, "image",
                            source="toy", extra={"grid": [4, 12]})
    w.write(0, torch.tensor(np.stack(rows)))
    w.close()
    return folder / "data", folder / "grid.store"


def test_training_through_fusion_trainer_learns(tmp_path):
    from itrkit.data.records import Dataset
    from itrkit.models.io import load_fusion_model
    from itrkit.train.config import load_train_config
    from itrkit.train.trainer import train as train_fusion

    data, grid = _toy_data(tmp_path)
    model = [f"model.text_tower.{k}={v}" for k, v in {**TEXT, "hidden": 32}.items()]
    cfg = load_train_config(None, [f"data.path={data}", f"data.grid_store={grid}", f"out={tmp_path / 'run'}",
                                   "model.name=rerank", *model, "model.embed_dim=32", "model.width=32",
                                   "model.layers=1", "model.heads=2", "model.rerank_k=5", "loss.tau=0.1",
                                   "loss.tau_learnable=false", "data.test_split=", "batch_size=12",
                                   "stages.0.epochs=50", "eval_every=50", "stages.0.lr=0.003", "log_every=1",
                                   "threads=1"])
    threads = torch.get_num_threads()
    try:  # one thread: tiny matrices, and 2 threads fight the other tests' processes for 2 cores
        out = train_fusion(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    import json

    log = [json.loads(line) for line in (tmp_path / "run" / "train.log").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    # chance RSUM with 36 images and 72 captions is about 2·(1 + 5 + 10)/36·100 ≈ 90
    assert out["val"]["rsum"] > 150  # full ITM scoring (the trainer's score_all path)
    trained, _ = load_fusion_model(tmp_path / "run")
    from itrkit.train.checkpoint import load_latest_checkpoint

    assert int(load_latest_checkpoint(tmp_path / "run")[0]["module.loss.mining_step"]) == 50 * 6
    val = Dataset.load(data).split("val")
    from itrkit.teachers.grid import open_grid_store, read_regions

    store = open_grid_store(grid)
    regions = read_regions(store, store.index_for(val.image_ids)).view(-1, 4, 12)
    tokens, lengths = trained.tokenize(val.texts)
    both = evaluate_reranker(trained, regions, tokens, lengths, val.txt2img, progress=False)
    assert both["itc"]["rsum"] > 250 and both["rerank"]["rsum"] > 250, both
