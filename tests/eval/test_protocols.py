"""COCO 5K / 1K, Flickr 1K and Flickr8k human-judgment protocols; COCO 1K folds agree with eccv_caption's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import ConfigError, DataError
from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE, evaluate_flickr8k_human
from itrkit.eval.protocols import (
    coco1k_fold_order,
    evaluate_dataset_protocol,
    evaluate_protocol,
    flickr8k_human_metrics,
    flickr8k_names,
)
from itrkit.eval.retrieval import evaluate_retrieval, l2_normalize, topk


def _data(n: int, caps: int = 5, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d)).astype(np.float32)
    t2i = np.repeat(np.arange(n), caps)
    txt = (img[t2i] + 1.5 * rng.normal(size=(len(t2i), d))).astype(np.float32)
    return img, txt, t2i


def test_full_and_size_checked_protocols_equal_evaluate_retrieval() -> None:
    img, txt, t2i = _data(1000, caps=3)
    ref = evaluate_retrieval(img, txt, t2i)
    assert evaluate_protocol(img, txt, t2i, "full") == ref
    assert evaluate_protocol(img, txt, t2i, "flickr30k-1k") == ref
    with pytest.raises(DataError, match="coco5k needs 5000 test images, got 1000"):
        evaluate_protocol(img, txt, t2i, "coco5k")
    with pytest.raises(ConfigError, match="unknown protocol"):
        evaluate_protocol(img, txt, t2i, "coco2k")


def test_coco1k_is_the_mean_over_five_consecutive_folds() -> None:
    img, txt, t2i = _data(5000, caps=5)
    t2i = t2i.copy()
    extra = np.array([4321, 17])  # two images with a sixth caption, listed at the end
    img_all, t2i_all = img, np.concatenate([t2i, extra])
    txt_all = np.concatenate([txt, img[extra] + 0.1])
    got = evaluate_protocol(img_all, txt_all, t2i_all, "coco1k", image_ids=[f"x{i}" for i in range(5000)])
    folds = []
    for f in range(5):
        sel = np.flatnonzero((t2i_all >= 1000 * f) & (t2i_all < 1000 * (f + 1)))
        folds.append(evaluate_retrieval(img_all[1000 * f:1000 * (f + 1)], txt_all[sel], t2i_all[sel] - 1000 * f))
    assert got["folds"] == 5
    for k in folds[0]:
        assert got[k] == pytest.approx(np.mean([m[k] for m in folds]), abs=1e-9)


def test_coco1k_folds_match_eccv_caption_on_real_ids() -> None:
    pytest.importorskip("eccv_caption")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics
    from itrkit.eval.eccv import coco5k_caption_ids, coco5k_image_ids, load_positives

    canon = coco5k_image_ids()
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(canon)  # dataset order differs from the package's: folds must not
    _, cap2img = load_positives("original")
    pos = {int(i): n for n, i in enumerate(shuffled)}
    cap_ids = coco5k_caption_ids()
    t2i = np.array([pos[cap2img[int(c)][0]] for c in cap_ids])
    img = rng.normal(size=(5000, 32)).astype(np.float32)
    txt = (img[t2i] + 1.2 * rng.normal(size=(len(t2i), 32))).astype(np.float32)
    got = evaluate_protocol(img, txt, t2i, "coco1k", image_ids=[str(i) for i in shuffled])
    # the package filters each ranked list to the fold's items; give it each query's top 10 within its fold
    img_n, txt_n = l2_normalize(img), l2_normalize(txt)
    order = np.array([pos[int(i)] for i in canon])
    i2t, t2i_lists = {}, {}
    for f in range(5):
        imgs = order[f * 1000:(f + 1) * 1000]
        caps = np.flatnonzero(np.isin(t2i, imgs))
        _, ci = topk(img_n[imgs], txt_n[caps], 10)
        _, ii = topk(txt_n[caps], img_n[imgs], 10)
        for q, row in zip(imgs, ci):
            i2t[int(shuffled[q])] = cap_ids[caps[row]].tolist()
        for q, row in zip(caps, ii):
            t2i_lists[int(cap_ids[q])] = shuffled[imgs[row]].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = Metrics()
        for k in (1, 5, 10):
            ref = metrics.coco_1k_recalls({"i2t": i2t, "t2i": t2i_lists}, "all", K=k)
            assert got[f"i2t_R@{k}"] / 100 == pytest.approx(ref["i2t"], abs=1e-9)
            assert got[f"t2i_R@{k}"] / 100 == pytest.approx(ref["t2i"], abs=1e-9)
    assert 0 < got["t2i_R@1"] < 100


def test_fold_order_choices() -> None:
    assert coco1k_fold_order(None) is None
    assert coco1k_fold_order(["a", "b"]) is None  # not COCO ids: dataset order
    assert coco1k_fold_order([1, 2], "dataset") is None
    with pytest.raises(DataError, match="not the COCO 5K test images"):
        coco1k_fold_order([1, 2], "coco5k")
    with pytest.raises(ConfigError):
        coco1k_fold_order([1, 2], "random")


def _f8k_tiny(tmp_path: Path) -> tuple[Dataset, Path]:
    """Three Flickr8k-style images (ids = file stems, as load_flickr8k makes them), 2 captions each,
    and annotation files judging a few cross-image pairs."""
    img_dir = tmp_path / "f8k" / "images"
    img_dir.mkdir(parents=True)
    recs = [ImageRecord(s, img_dir / f"{s}.jpg", [Caption(f"{s}.jpg#{k}", f"{s} {k}") for k in range(2)], "test")
            for s in ("a", "b", "c")]
    ann = tmp_path / "f8k"
    (ann / EXPERT_FILE).write_text("a.jpg\tb.jpg#0\t3\t3\t4\nb.jpg\tc.jpg#1\t1\t2\t1\nc.jpg\ta.jpg#0\t2\t2\t3\n")
    (ann / CROWDFLOWER_FILE).write_text("a.jpg\tc.jpg#0\t0.666666666666667\t2\t1\nb.jpg\ta.jpg#1\t0\t0\t3\n"
                                        "c.jpg\tb.jpg#1\t0.333333333333333\t1\t2\n")
    return Dataset(recs, name="f8k", validate=False), ann


def test_flickr8k_human_protocol_is_full_plus_the_human_metrics(tmp_path: Path) -> None:
    ds, ann = _f8k_tiny(tmp_path)
    rng = np.random.default_rng(4)
    img = rng.normal(size=(3, 6))
    txt = img[ds.txt2img] + rng.normal(size=(6, 6))
    names = ["a.jpg", "b.jpg", "c.jpg"]
    want = {**evaluate_retrieval(img, txt, ds.txt2img),
            **evaluate_flickr8k_human(img, txt, names, ds.caption_ids, ann)}
    got = evaluate_protocol(img, txt, ds.txt2img, "flickr8k-human", image_ids=ds.image_ids,
                            caption_ids=ds.caption_ids, annotations_dir=ann)
    assert got == want and got["f8k_expert_pairs"] == 3 and got["f8k_cf_pairs"] == 3
    # from a Dataset: names, caption ids and the annotation folder (beside images/) are derived
    assert evaluate_dataset_protocol(img, txt, ds, "flickr8k-human") == want
    assert flickr8k_human_metrics(img, txt, ds) == evaluate_flickr8k_human(img, txt, names, ds.caption_ids, ann)
    assert evaluate_dataset_protocol(img, txt, ds, "full") == evaluate_retrieval(img, txt, ds.txt2img)
    with pytest.raises(ConfigError, match="flickr8k-human needs the folder of ExpertAnnotations.txt"):
        evaluate_protocol(img, txt, ds.txt2img, "flickr8k-human", image_ids=ds.image_ids, caption_ids=ds.caption_ids)
    with pytest.raises(DataError, match="needs the caption ids"):
        evaluate_protocol(img, txt, ds.txt2img, "flickr8k-human", image_ids=ds.image_ids, annotations_dir=ann)
    (ann / EXPERT_FILE).unlink()
    with pytest.raises(DataError, match=f"no {EXPERT_FILE} and {CROWDFLOWER_FILE} found in .*images"):
        evaluate_dataset_protocol(img, txt, ds, "flickr8k-human")


def test_flickr8k_names_accept_the_csv_variant_ids_and_refuse_others(tmp_path: Path) -> None:
    ds, _ = _f8k_tiny(tmp_path)
    for r in ds.records:  # captions.txt variant: caption id = stem#k
        r.captions = [Caption(c.id.replace(".jpg#", "#"), c.text) for c in r.captions]
    names, caps = flickr8k_names(ds)
    assert names == ["a.jpg", "b.jpg", "c.jpg"] and caps[:3] == ["a.jpg#0", "a.jpg#1", "b.jpg#0"]
    ds.records[1].captions[0] = Caption("123456", "karpathy sentid")
    with pytest.raises(DataError, match="caption id '123456' of image 'b' is not 'b.jpg#k'"):
        flickr8k_names(ds)


def test_flickr8k_human_protocol_on_the_real_test_split(shared_data: Path) -> None:
    from itrkit.data.formats import load_flickr8k

    root = shared_data / "flickr8k"
    ds = load_flickr8k(root).split("test")
    rng = np.random.default_rng(5)
    img = rng.normal(size=(len(ds), 16)).astype(np.float32)
    txt = (img[ds.txt2img] + 1.5 * rng.normal(size=(len(ds.captions), 16))).astype(np.float32)
    got = evaluate_dataset_protocol(img, txt, ds, "flickr8k-human")
    official = [n.strip() for n in (root / "Flickr_8k.testImages.txt").read_text().splitlines() if n.strip()]
    assert sorted(Path(p).name for p in ds.image_paths) == sorted(official)
    names = [Path(p).name for p in ds.image_paths]
    want = {**evaluate_retrieval(img, txt, ds.txt2img),
            **evaluate_flickr8k_human(img, txt, names, ds.caption_ids, root)}
    assert got == want
    assert (got["f8k_expert_pairs"], got["f8k_cf_pairs"], got["f8k_skipped_pairs"]) == (5664, 47109, 0)
