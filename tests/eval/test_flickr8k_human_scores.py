"""Flickr8k human-judgment metrics of models that score pairs (fusion matchers, ensembles, the
re-ranker): the score-matrix entry point gives the embedding one's numbers on a cosine matrix and
an explicit reference otherwise (per-query loops, scipy Kendall τ on the expanded judgments); a
re-ranker's matrices hold its final per-query orders and its pair scores are ``S + w·itm``; and
``itrkit eval --run R [--run R2] --protocol flickr8k-human`` works for fusion runs and ensembles."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.data.records import Dataset
from itrkit.errors import ConfigError, DataError
from itrkit.eval.flickr8k_human import (
    CROWDFLOWER_FILE,
    EXPERT_FILE,
    INFO_KEYS,
    METRIC_KEYS,
    evaluate_flickr8k_human,
    evaluate_flickr8k_human_scores,
)
from tests.conftest import flickr8k_test_embeddings, pixel_grid_store, tiny_rerank_split
from tests.eval.human_reference import human_reference

TEXT = {"embed_dim": 8, "hidden": 8, "max_length": 12, "seed": 1}
TINY_SGR = ["model.embed_dim=16", "model.sim_dim=8", "model.word_dim=16", "model.text_hidden=16", "model.sgr_steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _write_annotations(names: list[str], caps: list[str], folder: Path, seed: int = 0) -> Path:
    """Annotation files in the released format for any (Flickr8k-style named) images and captions:
    per image its own first caption and captions of other images, plus a pair of an absent image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expert, cf = [], []
    for im in names:
        others = [c for c in caps if c.split("#")[0] != im]
        own = next(c for c in caps if c.split("#")[0] == im)
        expert.append(f"{im}\t{own}\t4\t4\t3")
        for c in rng.choice(others, size=min(3, len(others)), replace=False):
            expert.append(f"{im}\t{c}\t" + "\t".join(str(v) for v in rng.integers(1, 5, size=3)))
        for c in rng.choice(others, size=min(5, len(others)), replace=False):
            yes, no = int(rng.integers(0, 4)), int(rng.integers(0, 4))
            no += 3 - min(3, yes + no)
            cf.append(f"{im}\t{c}\t{yes / (yes + no)!r}\t{yes}\t{no}")
    cf.append(f"absent.png\t{caps[0]}\t1\t3\t0")
    (folder / EXPERT_FILE).write_text("\n".join(expert) + "\n")
    (folder / CROWDFLOWER_FILE).write_text("\n".join(cf) + "\n")
    return folder


# --------------------------------------------------------------------------------------------
# (a) + (b) the real annotation files
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f8k_test(shared_data: Path) -> dict:
    return flickr8k_test_embeddings(shared_data / "flickr8k")


def test_a_cosine_matrix_gives_the_embedding_versions_numbers_exactly(f8k_test: dict) -> None:
    d = f8k_test
    emb = evaluate_flickr8k_human(d["img"], d["txt"], d["names"], d["caps"], d["dir"])
    cos = _unit(d["img"]) @ _unit(d["txt"]).T
    assert evaluate_flickr8k_human_scores(cos, d["names"], d["caps"], d["dir"]) == emb
    assert evaluate_flickr8k_human_scores(torch.from_numpy(cos), d["names"], d["caps"], d["dir"]) == emb
    assert list(emb) == [*METRIC_KEYS, *INFO_KEYS] and emb["f8k_cf_pairs"] == 47109
    # a subset: the same skipped pairs and queries without positives
    names = d["names"][:300]
    keep = [m for m, c in enumerate(d["caps"]) if m % 5 != 4 and c.split("#")[0] in set(names)]
    caps = [d["caps"][m] for m in keep]
    emb = evaluate_flickr8k_human(d["img"][:300], d["txt"][keep], names, caps, d["dir"])
    got = evaluate_flickr8k_human_scores(_unit(d["img"][:300]) @ _unit(d["txt"][keep]).T, names, caps, d["dir"])
    assert got == emb and got["f8k_skipped_pairs"] > 40000


def test_b_own_t2i_scores_ties_and_pair_scores_equal_the_explicit_reference(f8k_test: dict) -> None:
    d = f8k_test
    rng = np.random.default_rng(5)
    n, m = len(d["names"]), len(d["caps"])
    own = np.repeat(np.arange(n), 5)
    s = rng.integers(0, 8, size=(n, m)).astype(np.float32)  # float32, many exact ties
    s[own, np.arange(m)] += 3
    t = rng.integers(0, 6, size=(n, m)).astype(np.float64)  # another ranking for t2i, also tied
    t[own, np.arange(m)] += 2

    def pair(i, c):
        return ((np.asarray(i) * 7 + np.asarray(c) * 3) % 5).astype(np.float64)  # ties in the τ too

    got = evaluate_flickr8k_human_scores(s, d["names"], d["caps"], d["dir"], t2i_scores=t, pair_scores=pair)
    ref = human_reference(s, t, pair, d["names"], d["caps"], d["dir"])
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    assert (got["f8k_expert_pairs"], got["f8k_cf_pairs"], got["f8k_skipped_pairs"]) == (5664, 47109, 0)
    # t2i_scores only changes the t2i ranking; pair_scores only the τ
    plain = evaluate_flickr8k_human_scores(s, d["names"], d["caps"], d["dir"])
    assert plain["f8k_human_i2t_map@r"] == got["f8k_human_i2t_map@r"] != plain["f8k_expert_tau_c"]
    assert plain["f8k_human_t2i_map@r"] != got["f8k_human_t2i_map@r"]
    assert plain["f8k_cf_tau_b"] != got["f8k_cf_tau_b"]
    ref_plain = human_reference(s, s, lambda i, c: s[i, c], d["names"], d["caps"], d["dir"])
    for k in METRIC_KEYS:
        assert plain[k] == pytest.approx(ref_plain[k], abs=1e-9), k


def test_bad_score_inputs_are_one_line_errors(tmp_path: Path) -> None:
    names, caps = ["A.jpg", "B.jpg"], ["A.jpg#0", "A.jpg#1", "B.jpg#0"]
    ann = _write_annotations(names, caps, tmp_path / "ann")
    s = np.arange(6, dtype=np.float32).reshape(2, 3)
    cases = [
        (lambda: evaluate_flickr8k_human_scores(s[:, :2], names, caps, ann), "3 caption names for 2 caption columns"),
        (lambda: evaluate_flickr8k_human_scores(s, ["A.jpg"], caps, ann), "1 image names for 2 image rows"),
        (lambda: evaluate_flickr8k_human_scores(np.where(s == 4, np.nan, s), names, caps, ann), "NaN or Inf"),
        (lambda: evaluate_flickr8k_human_scores(s, names, caps, ann, t2i_scores=s.T), "t2i scores have shape"),
        (lambda: evaluate_flickr8k_human_scores(s, names, caps, ann, pair_scores=lambda i, c: np.zeros(1)),
         "pair_scores returned 1 scores"),
        (lambda: evaluate_flickr8k_human_scores(s, names, ["A.jpg#0", "A.jpg_1", "B.jpg#0"], ann),
         "caption id 'A.jpg_1' is not 'name.jpg#k'"),
        (lambda: evaluate_flickr8k_human_scores(s[0], names, caps, ann), "non-empty images × captions matrix"),
    ]
    for call, match in cases:
        with pytest.raises(DataError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# (c) the re-ranker's matrices and pair scores
# --------------------------------------------------------------------------------------------
def _order(first: np.ndarray, second: np.ndarray, k: int, w: float) -> list[int]:
    """First-stage order (ties: lower index); its top k re-sorted by first + w·second (w = inf:
    second alone), ties by the lower index; the rest below in first-stage order."""
    o = sorted(range(len(first)), key=lambda j: (-first[j], j))
    if k == 0:
        return o
    key = (lambda j: (-second[j], j)) if math.isinf(w) else (lambda j: (-(first[j] + w * second[j]), j))
    return sorted(o[:k], key=key) + o[k:]


@pytest.fixture(scope="module")
def rr_split(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from itrkit.eval.fusion import FusionSplit
    from itrkit.eval.protocols import flickr8k_names

    root = tmp_path_factory.mktemp("human_rr")
    t = tiny_rerank_split(root, TEXT)
    ds, grid, model, split, g = t["ds"], t["grid"], t["model"], t["split"], t["generator"]
    own = FusionSplit(ds, grid, model.prepare_texts)  # first stage: the model's own ITC head
    names, caps = flickr8k_names(ds)
    itm = torch.randint(-2, 3, (len(ds), len(ds.texts)), generator=g).double()  # a fake ITM with many ties
    return {"ds": ds, "model": model, "split": split, "own": own, "names": names, "caps": caps, "itm": itm,
            "ann": _write_annotations(names, caps, root / "ann")}


def _fake_itm(monkeypatch: pytest.MonkeyPatch, model, itm: torch.Tensor) -> list[list[int]]:
    calls: list[list[int]] = []

    def pair_scorer(img_state, words, lengths, first_stage=None):
        def score(ii, tt):
            calls.append((ii * itm.shape[1] + tt).tolist())
            return itm[ii, tt]
        return score

    monkeypatch.setattr(model, "pair_scorer", pair_scorer)
    return calls


@pytest.mark.parametrize("k, w, first", [(3, 0.5, "itc_run"), (5, math.inf, "itc_run"), (30, 2.0, "itc_run"),
                                         (4, 0.0, "itc_run"), (0, math.inf, "itc_run"), (4, 1.0, "own")])
def test_c_rerank_matrices_hold_the_final_orders_and_pair_scores_are_the_final_score(
        rr_split: dict, monkeypatch: pytest.MonkeyPatch, k: int, w: float, first: str) -> None:
    from itrkit.eval.fusion import rerank_scores, split_human_metrics, split_metrics
    from itrkit.eval.retrieval import l2_normalize, metrics_from_ranks

    d = rr_split
    model, split, fake = d["model"], d["split" if first == "itc_run" else "own"], d["itm"]
    calls = _fake_itm(monkeypatch, model, fake)
    r = rerank_scores(model, split, progress=False, rerank_k=k, itm_weight=w)
    n, m = fake.shape
    # first stage: the attached dual encoder's cosines, else the model's own ITC embeddings
    if split.itc_embeds is not None:
        zi, zt = l2_normalize(split.itc_embeds[0]), l2_normalize(split.itc_embeds[1])
    else:
        with torch.no_grad():
            enc = model.encode_split(split.regions(np.arange(n)), split.tokens, split.lengths, progress=False)
        zi, zt = l2_normalize(enc["img_emb"]), l2_normalize(enc["txt_emb"])
    s_i2t, s_t2i = (zi @ zt.T).double().numpy(), (zt @ zi.T).T.double().numpy()  # each direction's own cosines
    np.testing.assert_allclose(r.first_stage.numpy(), s_i2t, atol=1e-6)
    itm = fake.numpy()
    for i in range(n):
        assert np.argsort(-r.i2t[i].numpy(), kind="stable").tolist() == _order(s_i2t[i], itm[i], k, w), i
    for c in range(m):
        assert np.argsort(-r.t2i[:, c].numpy(), kind="stable").tolist() == _order(s_t2i[:, c], itm[:, c], k, w), c
    # the orders are the ones behind the retrieval metrics, which are split_metrics' own
    assert r.metrics == split_metrics(model, split, progress=False, rerank_k=k, itm_weight=w)[0]
    t2i = split.txt2img
    order_i = [np.argsort(-r.i2t[i].numpy(), kind="stable").tolist() for i in range(n)]
    ranks_i = np.array([min(order_i[i].index(c) for c in range(m) if t2i[c] == i) for i in range(n)])
    ranks_t = np.array([np.argsort(-r.t2i[:, c].numpy(), kind="stable").tolist().index(int(t2i[c])) for c in range(m)])
    plain = metrics_from_ranks(ranks_i, ranks_t)
    assert plain == {key: r.metrics[key] for key in plain}
    # pair scores: the final score function, for any pair; the re-ranking's ITM calls are reused
    calls.clear()
    r = rerank_scores(model, split, progress=False, rerank_k=k, itm_weight=w)
    scored = [q for b in calls for q in b]
    ranked = n * min(k, m) + m * min(k, n)
    assert len(scored) == (ranked if k else 0)
    ii, cc = (x.reshape(-1) for x in np.meshgrid(np.arange(n), np.arange(m), indexing="ij"))
    got = r.pair_scores(ii, cc)
    s32 = r.first_stage.double().numpy()[ii, cc]
    want = s32 if k == 0 or w == 0 else itm[ii, cc] if math.isinf(w) else s32 + w * itm[ii, cc]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, s_i2t[ii, cc] if k == 0 or w == 0 else want, atol=1e-6)
    new = [q for b in calls for q in b][len(scored):]
    assert len(new) == len(set(new)) and not set(new) & set(scored)  # no pair scored twice
    assert set(new) == (set() if k == 0 or w == 0 else set(range(n * m)) - set(scored))
    before = len(calls)
    np.testing.assert_array_equal(r.pair_scores(ii[::-1], cc[::-1]), want[::-1])
    assert len(calls) == before
    # the human metrics of the re-ranker: those of its matrices and final pair scores
    got_h = split_human_metrics(model, split, d["ann"], progress=False, rerank_k=k, itm_weight=w)
    assert {key: got_h[key] for key in r.metrics} == r.metrics
    ref = human_reference(r.i2t.numpy(), r.t2i.numpy(), lambda i, c: want[i * m + c], d["names"], d["caps"], d["ann"])
    for key in METRIC_KEYS:
        assert got_h[key] == pytest.approx(ref[key], abs=1e-9, nan_ok=True), key
    assert got_h["f8k_skipped_pairs"] == 1 and got_h["f8k_cf_pairs"] == 5 * n


def test_c_a_model_in_training_mode_is_scored_in_eval_mode_and_left_as_it_was(rr_split: dict,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The pair scores are called after rerank_scores returns: they too score in eval mode."""
    from itrkit.eval.fusion import rerank_scores

    d = rr_split
    model, fake, modes = d["model"], d["itm"], []

    def pair_scorer(img_state, words, lengths, first_stage=None):
        def score(ii, tt):
            modes.append(model.training)
            return fake[ii, tt]
        return score

    monkeypatch.setattr(model, "pair_scorer", pair_scorer)
    model.train()
    try:
        r = rerank_scores(model, d["split"], progress=False, rerank_k=3, itm_weight=1.0)
        assert model.training and modes and not any(modes)
        modes.clear()
        n = len(d["ds"])
        r.pair_scores(np.arange(n), np.full(n, len(d["ds"].texts) - 1))
        assert model.training and modes and not any(modes)
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------
# (d) itrkit eval --run R --protocol flickr8k-human
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from itrkit.data.synthetic import make_synthetic
    from itrkit.eval.protocols import flickr8k_names
    from itrkit.train.fusion import load_fusion_config, train_fusion

    root = tmp_path_factory.mktemp("human_fusion")
    make_synthetic(root / "syn", n_images=30, captions_per_image=2, seed=3, size=32)
    ds = Dataset.load(root / "syn")
    grid = pixel_grid_store(ds, root / "grid.store")
    cfg = load_fusion_config(None, [f"data.path={root / 'syn'}", f"data.grid_store={grid}", f"out={root / 'sgr'}",
                                    "batch_size=8", "epochs=1", "lr=0.003", "log_every=1", "threads=1", "device=cpu",
                                    *TINY_SGR])
    threads = torch.get_num_threads()
    try:
        train_fusion(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    test = ds.split("test")
    names, caps = flickr8k_names(test)
    assert len(test) >= 3
    return {"root": root, "data": root / "syn", "grid": grid, "run": root / "sgr", "test": test, "names": names,
            "caps": caps, "ann": _write_annotations(names, caps, root / "ann", seed=1)}


def _eval(*argv: str) -> int:
    from itrkit.cli import main

    return main(["eval", *argv, "--quiet", "--device", "cpu"])


def test_d_cli_fusion_run_and_ensemble_write_the_human_metrics(fusion_run: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from itrkit.eval.fusion import evaluate_fusion_runs, fusion_human_metrics, run_scores

    f = fusion_run
    run, out = str(f["run"]), tmp_path / "e.json"
    capsys.readouterr()
    assert _eval("--run", run, "--protocol", "flickr8k-human", "--annotations", str(f["ann"]), "--json", str(out)) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    scores, _ = run_scores(f["run"], progress=False)  # the run's cached test matrix
    ref = evaluate_flickr8k_human_scores(scores, f["names"], f["caps"], f["ann"])
    plain = evaluate_fusion_runs([f["run"]], progress=False)
    assert {k: got[k] for k in ref} == ref and {k: got[k] for k in plain} == plain
    assert set(got) == {"runs", "split", *plain, *ref} and set(METRIC_KEYS) <= set(got)
    assert "f8k_expert_tau_c" in printed and "(test, flickr8k-human)" in printed
    r = human_reference(scores.numpy(), scores.numpy(), lambda i, c: float(scores[i, c]), f["names"], f["caps"], f["ann"])
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(r[k], abs=1e-9, nan_ok=True), k
    assert fusion_human_metrics([f["run"]], progress=False, annotations_dir=f["ann"]) == ref
    # an ensemble (here of the run with itself: the mean matrix is the run's own)
    assert _eval("--run", run, "--run", run, "--protocol", "flickr8k-human", "--annotations", str(f["ann"])) == 0
    ens = json.loads((f["run"] / "eval_test_flickr8k-human_ensemble.json").read_text())
    assert {k: ens[k] for k in ref} == ref and ens["runs"] == [run, run]
    # the annotation folder is found beside the images when not given
    capsys.readouterr()
    assert _eval("--run", run, "--protocol", "flickr8k-human", "--json", str(out)) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and EXPERT_FILE in err[0] and "--annotations" in err[0], err
    beside = f["data"] / "Flickr8k_text"
    shutil.copytree(f["ann"], beside)
    try:
        assert _eval("--run", run, "--protocol", "flickr8k-human", "--json", str(out)) == 0
        assert {k: json.loads(out.read_text())[k] for k in ref} == ref
    finally:
        shutil.rmtree(beside)


def test_d_other_protocols_stay_refused_for_fusion_runs_in_one_line(fusion_run: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from itrkit.eval.fusion import evaluate_fusion_runs

    run = str(fusion_run["run"])
    for argv in (["--run", run, "--protocol", "coco1k"], ["--run", run, "--run", run, "--protocol", "flickr30k-1k"],
                 ["--run", run, "--protocol", "flickr8k-human", "--eccv"]):
        capsys.readouterr()
        assert _eval(*argv, "--json", str(tmp_path / "x.json")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "full or flickr8k-human protocol only" in err[0], err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ConfigError, match="not 'coco5k'"):
        evaluate_fusion_runs([run], protocol="coco5k", progress=False)
    with pytest.raises(ConfigError, match="annotations folder .* does not exist"):
        evaluate_fusion_runs([run], protocol="flickr8k-human", annotations_dir=tmp_path / "nope", progress=False)


def test_d_cli_reranker_run_writes_its_final_rankings_human_metrics(fusion_run: dict, tmp_path: Path) -> None:
    from itrkit.eval.fusion import evaluate_fusion_runs, fusion_human_metrics, open_split, rerank_scores
    from itrkit.models.io import load_fusion_model, save_fusion_model
    from itrkit.models.rerank import ReRanker

    f = fusion_run
    torch.manual_seed(0)
    rr = tmp_path / "rr"
    save_fusion_model(ReRanker(region_dim=12, text_tower=TEXT, embed_dim=8, width=8, heads=2, pair_batch=16,
                               rerank_k=4, itm_weight=0.5), rr / "model")
    out = tmp_path / "e.json"
    where = ["--data", str(f["data"]), "--grid", str(f["grid"])]
    assert _eval("--run", str(rr), *where, "--protocol", "flickr8k-human", "--annotations", str(f["ann"]),
                 "--json", str(out)) == 0
    got = json.loads(out.read_text())
    plain = evaluate_fusion_runs([rr], data=f["data"], grid_store=str(f["grid"]), progress=False)
    human = fusion_human_metrics([rr], data=f["data"], grid_store=str(f["grid"]), annotations_dir=f["ann"],
                                 progress=False)
    assert set(got) == {"runs", "split", *plain, *human} and "itc_rsum" in got and "itm_only_rsum" in got
    assert {k: got[k] for k in plain} == plain and {k: got[k] for k in human} == human
    model, _ = load_fusion_model(rr)
    r = rerank_scores(model, open_split(model, f["test"], str(f["grid"])), progress=False)
    assert (r.rerank_k, r.itm_weight) == (4, 0.5)  # the saved choice
    # its pair scores: S + w·itm with the real ITM head, from an explicit call
    split = open_split(model, f["test"], str(f["grid"]))
    with torch.no_grad():
        enc = model.encode_split(split.regions(np.arange(len(split))), split.tokens, split.lengths, progress=False)
        n, m = len(split), len(split.lengths)
        ii, cc = (x.reshape(-1) for x in np.meshgrid(np.arange(n), np.arange(m), indexing="ij"))
        itm = model.pair_scorer(enc["img_state"], enc["words"], enc["lengths"])(torch.from_numpy(ii), torch.from_numpy(cc))
    np.testing.assert_allclose(r.pair_scores(ii, cc), r.first_stage.double().numpy()[ii, cc] + 0.5 * itm.double().numpy(),
                               rtol=1e-5, atol=1e-5)
    assert human == evaluate_flickr8k_human_scores(r.i2t, f["names"], f["caps"], f["ann"], t2i_scores=r.t2i,
                                                   pair_scores=r.pair_scores)
    k0 = fusion_human_metrics([rr], data=f["data"], grid_store=str(f["grid"]), annotations_dir=f["ann"],
                              progress=False, rerank_k=0)
    r0 = rerank_scores(model, open_split(model, f["test"], str(f["grid"])), progress=False, rerank_k=0)
    assert torch.equal(r0.i2t, r0.first_stage) and torch.equal(r0.first_stage, r.first_stage)
    # k = 0: the first stage alone (each direction its own cosines, as the retrieval metrics rank)
    assert k0 == evaluate_flickr8k_human_scores(r0.first_stage, f["names"], f["caps"], f["ann"], t2i_scores=r0.t2i)
    assert k0 != human
