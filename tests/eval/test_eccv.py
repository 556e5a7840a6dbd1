"""ECCV Caption / CxC metrics agree with the eccv_caption package on the real COCO 5K ids."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.errors import DataError
from itrkit.eval.eccv import (
    coco5k_caption_ids,
    coco5k_image_ids,
    eccv_subset_ids,
    evaluate_eccv,
    load_positives,
)
from itrkit.eval.retrieval import evaluate_retrieval, l2_normalize
from tests.eval._vectors import exact_unit_vectors

pytest.importorskip("eccv_caption")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "failed to import ujson"
    from eccv_caption import Metrics
    from eccv_caption._metrics import compute_eccv_metrics

K_LIST = 50  # ≥ the largest ECCV R (48) and the CxC/COCO K (10)


def _reference_lists(q: torch.Tensor, g: torch.Tensor, g_ids: np.ndarray, k: int) -> list[list[int]]:
    """Top-k gallery ids per query by (score desc, index asc), via numpy partition + lexsort."""
    out = []
    for s in range(0, len(q), 1000):
        S = (q[s:s + 1000] @ g.T).numpy()
        kth = -np.partition(-S, k - 1, axis=1)[:, k - 1]
        for row, t in zip(S, kth):
            cand = np.flatnonzero(row >= t)  # every candidate tied at the cut is in here
            order = cand[np.lexsort((cand, -row[cand]))][:k]
            out.append(g_ids[order].tolist())
    return out


@pytest.fixture(scope="module")
def coco5k_random() -> dict:
    img_ids = coco5k_image_ids()
    cap_ids = coco5k_caption_ids()
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(len(img_ids), 64, generator=gen)
    _, cap2img = load_positives("original")
    pos = {int(i): n for n, i in enumerate(img_ids)}
    t2i = np.array([pos[cap2img[int(c)][0]] for c in cap_ids])
    txt = img[t2i] + 2.0 * torch.randn(len(cap_ids), 64, generator=gen)  # some signal: hits at every K
    return {"img": img, "txt": txt, "img_ids": img_ids, "cap_ids": cap_ids, "t2i": t2i}


def test_matches_eccv_caption_package_on_real_5k_ids(coco5k_random: dict) -> None:
    d = coco5k_random
    img_n, txt_n = l2_normalize(d["img"]), l2_normalize(d["txt"])
    i2t_lists = _reference_lists(img_n, txt_n, d["cap_ids"], K_LIST)
    t2i_lists = _reference_lists(txt_n, img_n, d["img_ids"], K_LIST)
    i2t = {int(i): lst for i, lst in zip(d["img_ids"], i2t_lists)}
    t2i = {int(c): lst for c, lst in zip(d["cap_ids"], t2i_lists)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Metrics().compute_all_metrics(
            i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "cxc_recalls", "coco_5k_recalls"),
            Ks=(1, 5, 10))
    ours = evaluate_eccv(d["img"], d["txt"], d["img_ids"].tolist(), [str(c) for c in d["cap_ids"]])
    names = {"eccv_map_at_r": "map@r", "eccv_rprecision": "rp", "eccv_r1": "r1"}
    for pkg_key, our_key in names.items():
        for direction in ("i2t", "t2i"):
            assert ours[f"eccv_{direction}_{our_key}"] / 100 == pytest.approx(ref[pkg_key][direction], abs=1e-6)
    for k in (1, 5, 10):
        for direction in ("i2t", "t2i"):
            assert ours[f"cxc_{direction}_R@{k}"] / 100 == pytest.approx(ref[f"cxc_r{k}"][direction], abs=1e-6)
    assert 0 < ours["eccv_t2i_map@r"] < ours["eccv_t2i_r1"] < 100  # the data carry signal, not a degenerate case
    # the standard COCO 5K recalls (original positives) agree with evaluate_retrieval too
    std = evaluate_retrieval(d["img"], d["txt"], d["t2i"])
    for k in (1, 5, 10):
        assert std[f"i2t_R@{k}"] / 100 == pytest.approx(ref[f"coco_5k_r{k}"]["i2t"], abs=1e-6)
        assert std[f"t2i_R@{k}"] / 100 == pytest.approx(ref[f"coco_5k_r{k}"]["t2i"], abs=1e-6)


def test_strict_refuses_a_partial_5k(coco5k_random: dict) -> None:
    d = coco5k_random
    keep = np.arange(4000)
    caps = np.flatnonzero(d["t2i"] < 4000)
    with pytest.raises(DataError, match="1000 of its 5000 images"):
        evaluate_eccv(d["img"][keep], d["txt"][caps], d["img_ids"][keep], d["cap_ids"][caps])




def test_subset_with_ties_matches_package_formulas() -> None:
    """strict=False on a small gallery with tied scores: the package's per-query formulas agree."""
    rng = np.random.default_rng(0)
    eccv_i2t, eccv_t2i = load_positives("eccv")
    q_img = sorted(eccv_i2t)[:30]
    caps = sorted({c for i in q_img for c in eccv_i2t[i]} & set(coco5k_caption_ids().tolist()))
    _, cap2img = load_positives("original")
    imgs = sorted(set(q_img) | {cap2img[c][0] for c in caps} | {i for c in caps if c in eccv_t2i for i in eccv_t2i[c]})
    img, txt = exact_unit_vectors(rng, len(imgs)), exact_unit_vectors(rng, len(caps))
    ours = evaluate_eccv(img, txt, imgs, caps, chunk_size=7, strict=False)
    S = img.astype(np.float64) @ txt.astype(np.float64).T  # exact
    cap_arr, img_arr = np.array(caps), np.array(imgs)
    i2t = {i: cap_arr[sorted(range(len(caps)), key=lambda j: (-S[n, j], j))].tolist()
           for n, i in enumerate(imgs)}
    t2i = {c: img_arr[sorted(range(len(imgs)), key=lambda j: (-S[j, m], j))].tolist()
           for m, c in enumerate(caps)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_i2t = compute_eccv_metrics(i2t, {i: eccv_i2t[i] for i in imgs if i in eccv_i2t})
        ref_t2i = compute_eccv_metrics(t2i, {c: eccv_t2i[c] for c in caps if c in eccv_t2i})
    for ref, direction in ((ref_i2t, "i2t"), (ref_t2i, "t2i")):
        assert ours[f"eccv_{direction}_map@r"] / 100 == pytest.approx(ref["eccv_map_at_r"], abs=1e-9)
        assert ours[f"eccv_{direction}_rp"] / 100 == pytest.approx(ref["eccv_rprecision"], abs=1e-9)
        assert ours[f"eccv_{direction}_r1"] / 100 == pytest.approx(ref["eccv_r1"], abs=1e-9)


def test_coco_mini_ids_reach_the_package_positives(shared_data: Path) -> None:
    from itrkit.data.formats import load_coco

    ds = load_coco(shared_data / "coco-mini" / "annotations" / "captions_val2017.json")
    sub = eccv_subset_ids(ds.image_ids, ds.caption_ids)
    in5k = [ds.image_ids[i] for i in sub["images_in_5k"]]
    assert len(in5k) == 10 and "519611" in in5k
    orig_i2t, _ = load_positives("original")
    t2i = ds.txt2img
    # every test caption of those 10 images is one of the package's 25,000 and a positive of its image
    for pos in sub["captions_in_5k"]:
        assert int(ds.caption_ids[pos]) in orig_i2t[int(ds.image_ids[t2i[pos]])]
    assert len(sub["captions_in_5k"]) == 50
    assert [ds.image_ids[i] for i in sub["i2t_queries"]] == ["519611"]
    assert [ds.caption_ids[i] for i in sub["t2i_queries"]] == ["257433"]
    # end to end on the subset (random embeddings): numbers in range, strict mode refuses
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(len(ds), 16)), rng.normal(size=(len(ds.captions), 16))
    m = evaluate_eccv(img, txt, ds.image_ids, ds.caption_ids, strict=False)
    assert all(0.0 <= v <= 100.0 for v in m.values()) and len(m) == 12
    with pytest.raises(DataError, match="pass strict=False"):
        evaluate_eccv(img, txt, ds.image_ids, ds.caption_ids)


def test_bad_ids() -> None:
    img = np.eye(2)
    with pytest.raises(DataError, match="numeric COCO image ids"):
        evaluate_eccv(img, img, ["a.jpg", "b.jpg"], [1, 2], strict=False)
    with pytest.raises(DataError, match="duplicate COCO caption id 7"):
        evaluate_eccv(img, img, [1, 2], [7, 7], strict=False)
    with pytest.raises(DataError, match="3 COCO image ids for 2"):
        evaluate_eccv(img, img, [1, 2, 3], [7, 8], strict=False)
    with pytest.raises(DataError, match="ECCV Caption i2t query"):
        evaluate_eccv(img, img, [1, 2], [7, 8], strict=False)
