"""SGRAF blocks against explicit per-pair / per-word loops written here from the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch

from itrkit.eval.fusion import ensemble_scores
from itrkit.losses.functional import triplet_from_scores
from itrkit.losses.matching import MatchingLoss
from itrkit.losses.soft_labels import SoftLabelLoss
from itrkit.models.fusion_base import FusionBatch
from itrkit.models.sgraf import SAF, SGR, SGRAFModel, attend, l2norm, sim_vector

TINY = dict(region_dim=6, embed_dim=8, sim_dim=4, word_dim=8, text_hidden=8, max_words=12, sgr_steps=2)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


def _leaky(x: float) -> float:
    return x if x > 0 else 0.1 * x


# --- independent references ------------------------------------------------------------------------
def ref_context(regions: torch.Tensor, words: torch.Tensor, n_words: int, lam: float) -> torch.Tensor:
    """One pair: a_j for the first n_words words (paper Eq. 2), scalar loops."""
    R = regions.shape[0]
    c = [[_leaky(float(regions[i] @ words[j])) for j in range(n_words)] for i in range(R)]
    for i in range(R):  # l2-normalise over the caption's words, per region
        n = math.sqrt(sum(v * v for v in c[i])) + 1e-8
        c[i] = [v / n for v in c[i]]
    out = []
    for j in range(n_words):
        e = [math.exp(lam * c[i][j]) for i in range(R)]
        z = sum(e)
        a = sum((e[i] / z) * regions[i] for i in range(R))
        out.append(_unit(a))
    return torch.stack(out)


def ref_sim(x: torch.Tensor, y: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    d = torch.tensor([(float(x[k]) - float(y[k])) ** 2 for k in range(len(x))], dtype=x.dtype)
    v = lin.weight @ d + lin.bias
    return v / (v.norm() + 1e-8)


def ref_sgr_step(step: torch.nn.Module, nodes: torch.Tensor) -> torch.Tensor:
    P = nodes.shape[0]
    q = [step.query.weight @ nodes[p] + step.query.bias for p in range(P)]
    k = [step.key.weight @ nodes[p] + step.key.bias for p in range(P)]
    new = []
    for p in range(P):
        e = [math.exp(float(q[p] @ k[r])) for r in range(P)]
        z = sum(e)
        agg = sum((e[r] / z) * nodes[r] for r in range(P))
        new.append(torch.relu(step.update.weight @ agg + step.update.bias))
    return torch.stack(new)


def ref_pair_score(m: SGRAFModel, img_state: torch.Tensor, words: torch.Tensor, n_words: int) -> float:
    """Score of one (image, caption) pair from its own words only (no padding, eval-mode BN)."""
    vbar, regions = img_state[0], img_state[1:]
    w = words[:n_words]
    ctx = ref_context(regions, w, n_words, m.options.lam)
    tbar = _unit(w.sum(0) / n_words)
    nodes = [ref_sim(vbar, tbar, m.sim_global)] + [ref_sim(ctx[j], w[j], m.sim_local) for j in range(n_words)]
    nodes = torch.stack(nodes)
    if m.options.kind == "sgr":
        for step in m.sgr:
            nodes = ref_sgr_step(step, nodes)
        feat = nodes[0]
    else:
        bn = m.saf.bn
        betas = []
        for p in range(nodes.shape[0]):
            z = float(m.saf.gate.weight[0] @ nodes[p] + m.saf.gate.bias[0])
            z = (z - float(bn.running_mean)) / math.sqrt(float(bn.running_var) + bn.eps) * float(bn.weight) + float(bn.bias)
            betas.append(1 / (1 + math.exp(-z)))
        feat = sum(b * nodes[p] for p, b in enumerate(betas)) / sum(betas)
    return 1 / (1 + math.exp(-float(m.out.weight[0] @ feat + m.out.bias[0])))


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models() -> dict[str, SGRAFModel]:
    torch.manual_seed(0)
    out = {"sgr": SGR(**TINY).double(), "saf": SAF(**TINY).double()}
    with torch.no_grad():  # non-trivial BN statistics, so evaluation-mode normalisation is exercised
        out["saf"].saf.bn.running_mean.fill_(0.3)
        out["saf"].saf.bn.running_var.fill_(2.0)
        out["saf"].saf.bn.weight.fill_(1.5)
        out["saf"].saf.bn.bias.fill_(-0.2)
        for m in out.values():
            m.region_bn.running_mean.normal_()
            m.region_bn.running_var.uniform_(0.5, 2.0)
    return {k: m.eval() for k, m in out.items()}


def _inputs(n_img: int = 3, n_txt: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    regions = torch.rand(n_img, 5, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 5, 1, 3, 5][:n_txt])
    tokens = torch.randint(1000, 3000, (n_txt, int(lengths.max()) + 2), generator=g)  # extra padding columns
    return regions, tokens, lengths


# --- blocks -------------------------------------------------------------------------------------------------
def test_attention_context_matches_loops() -> None:
    g = torch.Generator().manual_seed(3)
    regions = _unit(torch.randn(2, 5, 4, generator=g, dtype=torch.float64))
    words = _unit(torch.randn(3, 4, 4, generator=g, dtype=torch.float64))
    lengths = torch.tensor([4, 2, 3])
    mask = torch.arange(4)[None, :] < lengths[:, None]
    words = words * mask[..., None]
    got = attend(regions, words, mask, 9.0)
    for i in range(2):
        for t in range(3):
            n = int(lengths[t])
            torch.testing.assert_close(got[i, t, :n], ref_context(regions[i], words[t], n, 9.0))


def test_similarity_vectors_match_loops() -> None:
    torch.manual_seed(4)
    lin = torch.nn.Linear(5, 3).double()
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    got = sim_vector(x, y, lin)
    for r in range(2):
        torch.testing.assert_close(got[r], ref_sim(x[r], y[r], lin))


def test_sgr_step_matches_loops_and_ignores_padding(models: dict[str, SGRAFModel]) -> None:
    step = models["sgr"].sgr[0]
    g = torch.Generator().manual_seed(5)
    nodes = l2norm(torch.randn(6, 4, generator=g, dtype=torch.float64))
    mask = torch.tensor([True, True, True, True, False, False])
    got = step(nodes[None], mask[None])[0]
    torch.testing.assert_close(got[:4], ref_sgr_step(step, nodes[:4]))
    # Changing the padded nodes changes nothing at the real ones.
    other = nodes.clone()
    other[4:] = 5.0
    torch.testing.assert_close(step(other[None], mask[None])[0][:4], got[:4])


def test_saf_weights_match_loops_in_both_modes(models: dict[str, SGRAFModel]) -> None:
    saf = models["saf"].saf
    bn = saf.bn
    g = torch.Generator().manual_seed(6)
    blocks = [l2norm(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)),
              l2norm(torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64))]
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool),
             torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)]

    def gate(x: torch.Tensor) -> float:
        return float(saf.gate.weight[0] @ x + saf.gate.bias[0])

    try:
        for training in (False, True):
            saf.train(training)
            before = (float(bn.running_mean), float(bn.running_var))
            got = saf.weights(blocks, masks)
            if training:  # statistics of every real node of every pair of every block
                valid = [gate(n[i, t, p]) for n, m in zip(blocks, masks) for i in range(2)
                         for t in range(n.shape[1]) for p in range(n.shape[2]) if m[t, p]]
                mean = sum(valid) / len(valid)
                var = sum((v - mean) ** 2 for v in valid) / len(valid)
                assert float(bn.running_mean) == pytest.approx(0.9 * before[0] + 0.1 * mean)
                unbiased = var * len(valid) / (len(valid) - 1)
                assert float(bn.running_var) == pytest.approx(0.9 * before[1] + 0.1 * unbiased)
            else:
                mean, var = before
            for n, m, w in zip(blocks, masks, got):
                for i in range(2):
                    for t in range(n.shape[1]):
                        betas = []
                        for p in range(n.shape[2]):
                            z = (gate(n[i, t, p]) - mean) / math.sqrt(var + bn.eps) * float(bn.weight) + float(bn.bias)
                            betas.append(1 / (1 + math.exp(-z)) if m[t, p] else 0.0)
                        torch.testing.assert_close(w[i, t], torch.tensor(betas, dtype=torch.float64) / sum(betas))
    finally:
        saf.eval()
        with torch.no_grad():
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(2.0)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_score_matches_per_pair_reference(models: dict[str, SGRAFModel], kind: str) -> None:
    m = models[kind]
    regions, tokens, lengths = _inputs()
    with torch.no_grad():
        img = m.encode_images(regions)
        words, lens = m.encode_texts(tokens, lengths)
        got = m.score(img, words, lens)
    assert got.shape == (3, 4)
    for i in range(3):
        for t in range(4):
            assert float(got[i, t]) == pytest.approx(ref_pair_score(m, img[i], words[t], int(lengths[t])), abs=1e-10)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_score_all_blocks_equal_one_shot(models: dict[str, SGRAFModel], kind: str) -> None:
    m = models[kind]
    regions, tokens, lengths = _inputs(5, 6, seed=2)
    with torch.no_grad():
        one = m.score(m.encode_images(regions), *m.encode_texts(tokens, lengths))
    blocks = m.score_all(regions, tokens, lengths, img_chunk=2, txt_chunk=4, progress=False)
    torch.testing.assert_close(blocks, one.float(), rtol=0, atol=1e-6)
    # A tiny pair budget forces one image per block inside score(): same numbers.
    old = m.options.pair_budget
    m.options.pair_budget = 1
    try:
        with torch.no_grad():
            tiny = m.score(m.encode_images(regions), *m.encode_texts(tokens, lengths))
    finally:
        m.options.pair_budget = old
    torch.testing.assert_close(tiny, one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["sgr", "saf"])
def test_length_groups_do_not_change_training_scores(kind: str) -> None:
    torch.manual_seed(7)
    m = SGRAFModel(name=kind, **TINY).double().train()
    regions, tokens, lengths = _inputs(4, 6, seed=8)
    img = m.encode_images(regions)
    words, lens = m.encode_texts(tokens, lengths)
    m.options.len_groups = 1
    one = m.score(img, words, lens)
    m.options.len_groups = 3
    grouped = m.score(img, words, lens)
    torch.testing.assert_close(grouped, one, rtol=0, atol=1e-12)


def test_forward_losses_and_cusa_terms() -> None:
    torch.manual_seed(9)
    m = SAF(**TINY, usa_heads=True).train()
    loss = MatchingLoss(soft=SoftLabelLoss(alpha=1.0, beta=0.75))
    regions, tokens, lengths = _inputs(4, 4, seed=10)
    g = torch.Generator().manual_seed(11)
    batch = FusionBatch(regions.float(), tokens, lengths, torch.arange(4), torch.randn(4, 7, generator=g),
                        torch.randn(4, 5, generator=g))
    states = m(batch)
    assert set(states) == {"img_state", "words", "lengths"}
    out = m.batch_outputs(states)
    assert set(out) == {"scores", "image_global", "text_global", "image_uni", "text_uni"}
    terms = loss(out["scores"], batch.img_ids, batch.t_img, batch.t_txt, out["image_uni"], out["text_uni"])
    assert set(terms) == {"triplet_loss", "csa_loss", "usa_loss", "pos_score"}
    assert all(torch.isfinite(v) for v in terms.values())
    sum(v for k, v in terms.items() if k.endswith("_loss")).backward()
    assert m.usa_img[0].weight.grad is not None and loss.soft.tau_c.grad is not None
    with pytest.raises(Exception, match="teacher"):
        loss(out["scores"].detach(), batch.img_ids, None, None, out["image_uni"], out["text_uni"])


# --- losses and ensembles -----------------------------------------------------------------------------------
def _ref_triplet(s: torch.Tensor, ids: list[int], margin: float, hardest: bool) -> float:
    b = len(ids)
    total = 0.0
    for i in range(b):
        c1 = [max(0.0, margin - float(s[i, i]) + float(s[i, j])) for j in range(b) if ids[j] != ids[i]]
        c2 = [max(0.0, margin - float(s[i, i]) + float(s[j, i])) for j in range(b) if ids[j] != ids[i]]
        agg = max if hardest else sum
        total += (agg(c1) if c1 else 0.0) + (agg(c2) if c2 else 0.0)
    return total / b


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_from_scores_matches_loop(hardest: bool) -> None:
    g = torch.Generator().manual_seed(12)
    s = torch.rand(6, 6, generator=g, dtype=torch.float64)
    ids = [0, 1, 1, 2, 3, 3]
    got = triplet_from_scores(s, torch.tensor(ids), 0.2, hardest=hardest)
    assert float(got) == pytest.approx(_ref_triplet(s, ids, 0.2, hardest), abs=1e-12)


def test_ensemble_is_mean_of_scores() -> None:
    a, b = torch.rand(3, 5), torch.rand(3, 5)
    torch.testing.assert_close(ensemble_scores(a, b), (a + b) / 2)
    with pytest.raises(Exception, match="one shape"):
        ensemble_scores(a, torch.rand(3, 4))


def test_minilm_word_init_copies_the_pretrained_vectors() -> None:
    from safetensors import safe_open

    from itrkit.models.hf_text import minilm_path

    m = SGR(**{**TINY, "word_dim": 384, "word_init": "minilm"})
    with safe_open(str(minilm_path() / "model.safetensors"), framework="pt") as f:
        emb = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(m.text_tower.embedding.weight.detach(), emb)
    with pytest.raises(Exception, match="word_dim=384"):
        SGR(**{**TINY, "word_init": "minilm"})
