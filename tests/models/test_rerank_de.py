"""The re-ranker on a frozen first-stage dual encoder (``model.itc_run``), against explicit loops:
hardest-negative mining from the dual encoder's similarities, the final score ``itc + w · itm``
on each query's top k (and the ITM-only / first-stage keys beside), and the dev choice of (k, w)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itrkit.eval.fusion import choose_rerank, evaluate_reranker
from itrkit.eval.retrieval import evaluate_retrieval, metrics_from_ranks
from itrkit.losses import ContrastiveLoss
from itrkit.losses.itm import hardest_negatives
from itrkit.losses.matching import ReRankLoss
from itrkit.models.fusion_base import FusionBatch
from itrkit.models.rerank import ReRanker

TEXT = {"embed_dim": 8, "hidden": 8, "max_length": 12, "seed": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def _model(**kw) -> ReRanker:
    torch.manual_seed(0)
    args = {"embed_dim": 8, "width": 8, "layers": 1, "heads": 2, "pair_batch": 5, **kw}
    return ReRanker(region_dim=12, text_tower=TEXT, **args).double()


# --- mining -------------------------------------------------------------------------------------
def _hardest_loop(sim: np.ndarray, ids: list[int]) -> tuple[list[int], list[int]]:
    """Per row / column: the largest entry of another image (first index on ties), -1 if none."""
    b = len(ids)
    neg_txt, neg_img = [], []
    for i in range(b):
        best = -1
        for j in range(b):
            if ids[j] != ids[i] and (best < 0 or sim[i, j] > sim[i, best]):
                best = j
        neg_txt.append(best)
    for j in range(b):
        best = -1
        for i in range(b):
            if ids[i] != ids[j] and (best < 0 or sim[i, j] > sim[best, j]):
                best = i
        neg_img.append(best)
    return neg_txt, neg_img


def test_hardest_negatives_equal_an_explicit_argmax_loop_and_never_a_caption_of_the_same_image():
    ids = [0, 0, 1, 2, 2, 2, 3, 4]  # several captions of one image: never negatives of each other
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        sim = torch.randint(-3, 4, (8, 8), generator=g).double()  # many exact ties
        sim[0, 1] = sim[1, 0] = 99.0  # the most similar pair is a positive: must be skipped
        neg_txt, neg_img = hardest_negatives(sim, torch.tensor(ids))
        ref_txt, ref_img = _hardest_loop(sim.numpy(), ids)
        assert neg_txt.tolist() == ref_txt and neg_img.tolist() == ref_img
        assert all(ids[neg_txt[i]] != ids[i] and ids[neg_img[i]] != ids[i] for i in range(8))
    none = hardest_negatives(torch.zeros(3, 3), torch.tensor([7, 7, 7]))
    assert none[0].tolist() == [-1, -1, -1] and none[1].tolist() == [-1, -1, -1]


def test_itm_loss_with_dual_encoder_mining_is_bce_over_positives_and_its_hardest_negatives():
    """ReRankLoss(mining_sim=…): B positives, then each image's and each caption's hardest
    negative under the given similarities (not the model's own ITC), one BCE mean."""
    m = _model()
    loss = ReRankLoss(ContrastiveLoss(tau=0.05, weight=0.0)).double().train()
    g = torch.Generator().manual_seed(3)
    b, ids = 6, [0, 1, 1, 2, 3, 4]
    lengths = torch.randint(1, 6, (b,), generator=g)
    batch = FusionBatch(torch.randn(b, 4, 12, generator=g, dtype=torch.float64),
                        torch.randint(1000, 3000, (b, 7), generator=g), lengths, torch.tensor(ids))
    de_sim = torch.randn(b, b, generator=g, dtype=torch.float64)
    out = m(batch)
    got = loss(out, batch.img_ids, None, None, lambda i, t: m.itm_batch_pairs(out, i, t), mining_sim=de_sim)
    neg_txt, neg_img = _hardest_loop(de_sim.numpy(), ids)
    pairs = [(i, i, 1.0) for i in range(b)] + [(i, neg_txt[i], 0.0) for i in range(b)] \
        + [(neg_img[j], j, 0.0) for j in range(b)]
    total = 0.0
    for i, j, y in pairs:
        z = m.itm_pairs(out["img_state"][i:i + 1], out["words"][j:j + 1, :lengths[j]], lengths[j:j + 1])[0]
        total = total - (y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))
    assert got["itm_loss"].item() == pytest.approx(total.item() / len(pairs), rel=1e-9)
    assert got["contrastive_loss"].item() == 0.0


# --- the final score ------------------------------------------------------------------------------
def _ranks_loop(itc: np.ndarray, itm: np.ndarray, t2i: np.ndarray, k: int, w: float) -> tuple[np.ndarray, np.ndarray]:
    """Per query: first-stage order (ties: lower index); its top k re-sorted by itc + w·itm
    (w = inf: itm alone), ties by the lower index; the rest kept below in first-stage order."""

    def order(first: np.ndarray, second: np.ndarray) -> list[int]:
        o = sorted(range(len(first)), key=lambda j: (-first[j], j))
        key = (lambda j: (-second[j], j)) if math.isinf(w) else (lambda j: (-(first[j] + w * second[j]), j))
        return sorted(o[:k], key=key) + o[k:]

    n, m = itc.shape
    i2t = np.array([min(order(itc[i], itm[i]).index(c) for c in range(m) if t2i[c] == i) for i in range(n)])
    t2i_r = np.array([order(itc[:, c], itm[:, c]).index(int(t2i[c])) for c in range(m)])
    return i2t, t2i_r


@pytest.fixture(scope="module")
def split_inputs():
    g = torch.Generator().manual_seed(11)
    n, per = 7, 3
    regions = torch.randn(n, 4, 12, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 7, (n * per,), generator=g)
    tokens = torch.randint(1000, 3000, (n * per, 7), generator=g)
    t2i = np.repeat(np.arange(n), per)
    img = F.normalize(torch.randn(n, 6, generator=g), dim=1)  # the "dual encoder's" embeddings
    txt = F.normalize(torch.randn(n * per, 6, generator=g) + 0.8 * img[t2i], dim=1)
    itm = torch.randint(-2, 3, (n, n * per), generator=g).double()  # a fake ITM with many ties
    return {"regions": regions, "tokens": tokens, "lengths": lengths, "t2i": t2i, "de": (img, txt), "itm": itm}


def test_itm_weight_zero_is_the_dual_encoders_own_ranking_exactly(split_inputs):
    d = split_inputs
    m = _model(rerank_k=5, itm_weight=0.0).eval()
    got = evaluate_reranker(m, d["regions"], d["tokens"], d["lengths"], d["t2i"], progress=False, first_stage=d["de"])
    own = evaluate_retrieval(*d["de"], d["t2i"])
    assert got["rerank"] == own and got["itc"] == own
    assert got["itm_only"] != own  # the real ITM head re-orders: the key is not a copy


@pytest.mark.parametrize("k, w", [(3, 0.3), (5, 2.0), (4, math.inf), (21, 0.5)])
def test_final_score_top_k_order_equals_a_per_query_loop_both_directions(split_inputs, monkeypatch, k, w):
    d = split_inputs
    m = _model(rerank_k=k, itm_weight=w).eval()
    fake = d["itm"]
    calls = []

    def pair_scorer(img_state, words, lengths, first_stage=None):
        def score(ii, tt):
            calls.append(len(ii))
            return fake[ii, tt]
        return score

    monkeypatch.setattr(m, "pair_scorer", pair_scorer)
    got = evaluate_reranker(m, d["regions"], d["tokens"], d["lengths"], d["t2i"], progress=False, first_stage=d["de"])
    img, txt = d["de"]
    itc = (img.double() @ txt.double().T).numpy()
    assert got["rerank"] == pytest.approx(metrics_from_ranks(*_ranks_loop(itc, fake.numpy(), d["t2i"], k, w)))
    assert got["itc"] == evaluate_retrieval(img, txt, d["t2i"])
    if math.isinf(w):
        assert "itm_only" not in got
    else:  # the ITM order of the same top k, from the same ITM calls (each pair scored once per direction)
        assert got["itm_only"] == pytest.approx(metrics_from_ranks(*_ranks_loop(itc, fake.numpy(), d["t2i"], k, math.inf)))
    n, n_cap = len(img), len(txt)
    assert sum(calls) == n * min(k, n_cap) + n_cap * min(k, n)


def test_residual_over_the_first_stage_is_the_plain_head_plus_scale_times_its_cosine(split_inputs):
    """``itm_residual`` with ``itc_run``: match logit = the fusion head's output + s · the frozen dual
    encoder's cosine of the pair (the same weights without the residual give the first term), in the
    pair scorer that re-ranks; without the first stage's cosines it refuses."""
    from itrkit.errors import ConfigError

    d = split_inputs
    plain = _model(itc_run="de-run").eval()
    res = _model(itc_run="de-run", itm_residual=True, itm_residual_init=7.5).eval()
    assert res.itm_sim_scale.item() == 7.5
    assert res.itm_head.weight.abs().sum() == 0  # the head starts constant: the first ranking is the cosine's
    res.load_state_dict({**plain.state_dict(), "itm_sim_scale": torch.tensor(7.5, dtype=torch.float64),
                         "residual_offset_ready": torch.tensor(True)})
    img, txt = (x.double() for x in d["de"])
    with torch.no_grad():
        enc_p = plain.encode_split(d["regions"], d["tokens"], d["lengths"], progress=False)
        enc_r = res.encode_split(d["regions"], d["tokens"], d["lengths"], progress=False)
    ii = torch.tensor([0, 3, 3, 6, 1, 0, 2])
    tt = torch.tensor([0, 1, 9, 20, 4, 4, 13])
    f = plain.pair_scorer(enc_p["img_state"], enc_p["words"], enc_p["lengths"])(ii, tt)
    got = res.pair_scorer(enc_r["img_state"], enc_r["words"], enc_r["lengths"], (img, txt))(ii, tt)
    for p in range(len(ii)):
        cos = float(sum(img[ii[p], j] * txt[tt[p], j] for j in range(img.shape[1])))
        assert got[p].item() == pytest.approx(f[p].item() + 7.5 * cos, abs=1e-9)
    with pytest.raises(ConfigError, match="itm_residual"):
        res.pair_scorer(enc_r["img_state"], enc_r["words"], enc_r["lengths"])(ii, tt)
    # evaluate_reranker feeds the split's first-stage rows to the residual: w = inf orders the top k
    # by f + s·cos, i.e. a per-query loop over those scores
    m = _model(itc_run="de-run", itm_residual=True, rerank_k=4, itm_weight=math.inf).eval()
    got = evaluate_reranker(m, d["regions"], d["tokens"], d["lengths"], d["t2i"], progress=False, first_stage=d["de"])
    with torch.no_grad():
        enc = m.encode_split(d["regions"], d["tokens"], d["lengths"], progress=False)
        n, n_cap = len(img), len(txt)
        gi, gt = torch.meshgrid(torch.arange(n), torch.arange(n_cap), indexing="ij")
        full = m.pair_scorer(enc["img_state"], enc["words"], enc["lengths"], d["de"])(gi.reshape(-1), gt.reshape(-1))
    itc = (img @ txt.T).numpy()
    ref = metrics_from_ranks(*_ranks_loop(itc, full.reshape(n, n_cap).numpy(), d["t2i"], 4, math.inf))
    assert got["rerank"] == pytest.approx(ref)


# --- the dev choice -----------------------------------------------------------------------------------
def test_choose_rerank_picks_the_best_dev_rsum_of_an_explicit_grid_loop(tmp_path):
    from tests.conftest import tiny_rerank_split

    t = tiny_rerank_split(tmp_path, TEXT)
    m, split = t["model"], t["split"]
    ks, weights = (1, 3, 8), (0.0, 0.5, 4.0, math.inf)
    got = choose_rerank(m, split, ks=ks, weights=weights, progress=False)
    best, grid_ref = None, []
    for k in ks:
        for w in weights:
            r = evaluate_reranker(m, split.regions(np.arange(len(split))), split.tokens, split.lengths,
                                  split.txt2img, progress=False, rerank_k=k, itm_weight=w,
                                  first_stage=split.itc_embeds)["rerank"]["rsum"]
            grid_ref.append((k, w, r))
            if best is None or r > best[2]:
                best = (k, w, r)
    assert [(g["rerank_k"], g["itm_weight"]) for g in got["grid"]] == [(k, w) for k, w, _ in grid_ref]
    assert [g["rsum"] for g in got["grid"]] == pytest.approx([r for _, _, r in grid_ref])
    assert (got["rerank_k"], got["itm_weight"], got["rsum"]) == pytest.approx(best)
    assert len({r for _, _, r in grid_ref}) > 1  # the grid is not flat: the choice means something
