"""Uni-modal R@K against explicit loops; benchmark list loaders on small fixtures in their formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itrkit.errors import DataError
from itrkit.eval.unimodal import (
    LabelledImage,
    coco_object_labels,
    evaluate_labelled,
    load_cub,
    load_inat,
    load_inshop,
    load_sop,
    recall_at_k_loo,
    recall_at_k_query_gallery,
)
from tests.eval._vectors import exact_unit_vectors


def _ranked(S_row: np.ndarray, exclude: int | None = None) -> list[int]:
    return [j for j in sorted(range(len(S_row)), key=lambda j: (-S_row[j], j)) if j != exclude]


def _share(a, b) -> bool:
    return bool(set(a) & set(b)) if isinstance(a, (set, frozenset)) else a == b


@pytest.mark.parametrize("seed", range(4))
def test_loo_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb = exact_unit_vectors(rng, 30)  # exact scores, many ties
    emb[4] = emb[3]  # a duplicate: its twin ties with the query itself
    labels = rng.integers(0, 5, size=30).tolist()
    S = emb.astype(np.float64) @ emb.astype(np.float64).T
    got = recall_at_k_loo(emb, labels, ks=(1, 2, 4), chunk_size=7)
    for k in (1, 2, 4):
        hits = [any(labels[j] == labels[i] for j in _ranked(S[i], exclude=i)[:k]) for i in range(30)]
        assert got[f"R@{k}"] == pytest.approx(100 * np.mean(hits))


def test_query_gallery_and_multilabel_match_loops() -> None:
    rng = np.random.default_rng(7)
    q, g = exact_unit_vectors(rng, 12), exact_unit_vectors(rng, 25)
    ql, gl = [f"item{x}" for x in rng.integers(0, 4, 12)], [f"item{x}" for x in rng.integers(0, 4, 25)]
    S = q.astype(np.float64) @ g.astype(np.float64).T
    got = recall_at_k_query_gallery(q, ql, g, gl, ks=(1, 5))
    for k in (1, 5):
        assert got[f"R@{k}"] == pytest.approx(100 * np.mean([any(gl[j] == ql[i] for j in _ranked(S[i])[:k])
                                                             for i in range(12)]))
    # multi-label: sets, a hit shares ≥ 1 label; the query without labels is left out
    names = ["cat", "dog", "car", "tv"]
    sets = [set(rng.choice(names, int(rng.integers(1, 3)), replace=False)) for _ in range(25)]
    sets[0] = set()
    got = recall_at_k_loo(g, sets, ks=(1, 3))
    S = g.astype(np.float64) @ g.astype(np.float64).T
    for k in (1, 3):
        hits = [any(_share(sets[j], sets[i]) for j in _ranked(S[i], exclude=i)[:k]) for i in range(1, 25)]
        assert got[f"R@{k}"] == pytest.approx(100 * np.mean(hits))


def test_hand_made_case_and_errors() -> None:
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert recall_at_k_loo(emb, ["a", "a", "b", "b"]) == {"R@1": 100.0}
    assert recall_at_k_loo(emb, ["a", "b", "a", "b"], ks=(1, 2)) == {"R@1": 0.0, "R@2": 50.0}
    with pytest.raises(DataError, match="3 labels for 4"):
        recall_at_k_loo(emb, ["a", "b", "c"])
    with pytest.raises(DataError, match="R@4 needs at least 4"):
        recall_at_k_loo(emb, list("abab"), ks=(4,))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_cub_loader(tmp_path: Path) -> None:
    _write(tmp_path / "images.txt", "1 001.Albatross/a_1.jpg\n2 001.Albatross/a_2.jpg\n"
                                    "3 101.Sparrow/s_1.jpg\n4 150.Wren/w_1.jpg\n")
    _write(tmp_path / "image_class_labels.txt", "1 1\n2 1\n3 101\n4 150\n")
    _write(tmp_path / "train_test_split.txt", "1 1\n2 0\n3 1\n4 0\n")
    test = load_cub(tmp_path)
    assert test == [LabelledImage(tmp_path / "images/101.Sparrow/s_1.jpg", "101", "test"),
                    LabelledImage(tmp_path / "images/150.Wren/w_1.jpg", "150", "test")]
    assert [x.label for x in load_cub(tmp_path, "train")] == ["1", "1"]
    official = load_cub(tmp_path, None, split_mode="official")
    assert [x.split for x in official] == ["train", "test", "train", "test"]
    _write(tmp_path / "image_class_labels.txt", "1 1\n2 1 extra\n3 101\n4 150\n")
    with pytest.raises(DataError, match=r"image_class_labels.txt:2: expected"):
        load_cub(tmp_path)


def test_sop_loader(tmp_path: Path) -> None:
    _write(tmp_path / "Ebay_test.txt", "image_id class_id super_class_id path\n"
                                       "1 11319 1 bicycle_final/111085122871_0.JPG\n"
                                       "2 11319 1 bicycle_final/111085122871_1.JPG\n\n"
                                       "3 11320 2 chair_final/1_0.JPG\n")
    items = load_sop(tmp_path)
    assert [(x.path.name, x.label, x.split) for x in items] == [
        ("111085122871_0.JPG", "11319", "test"), ("111085122871_1.JPG", "11319", "test"), ("1_0.JPG", "11320", "test")]
    assert items[0].path == tmp_path / "bicycle_final/111085122871_0.JPG"
    _write(tmp_path / "Ebay_test.txt", "image_id class_id super_class_id path\n1 x 1 a.jpg\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt:2:"):
        load_sop(tmp_path)
    _write(tmp_path / "Ebay_test.txt", "1 11319 1 a.jpg\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt:1: expected the header"):
        load_sop(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_sop(tmp_path, "train")


def test_inshop_loader(tmp_path: Path) -> None:
    _write(tmp_path / "list_eval_partition.txt",
           "4\nimage_name item_id evaluation_status\n"
           "img/WOMEN/Dresses/id_00000002/02_1_front.jpg          id_00000002 train\n"
           "img/WOMEN/Skirts/id_00000008/01_1_front.jpg   id_00000008  query\n"
           "img/WOMEN/Skirts/id_00000008/01_2_side.jpg    id_00000008  gallery\n"
           "img/MEN/Pants/id_00000010/01_1_front.jpg      id_00000010  gallery\n")
    items = load_inshop(tmp_path)
    assert [x.split for x in items] == ["train", "query", "gallery", "gallery"]
    assert [x.label for x in load_inshop(tmp_path, "gallery")] == ["id_00000008", "id_00000010"]
    # dispatch: query/gallery protocol for In-Shop items
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.1]])
    assert evaluate_labelled(items, emb) == {"R@1": 100.0}
    _write(tmp_path / "list_eval_partition.txt",
           "2\nimage_name item_id evaluation_status\na.jpg id_1 train\nb.jpg id_1 validation\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt:4: expected"):
        load_inshop(tmp_path)
    _write(tmp_path / "list_eval_partition.txt", "3\nimage_name item_id evaluation_status\na.jpg id_1 train\n")
    with pytest.raises(DataError, match="announces 3 images but lists 1"):
        load_inshop(tmp_path)


def test_inat_loader(tmp_path: Path) -> None:
    lst = _write(tmp_path / "Inaturalist_test_set1.txt",
                 "train_val2018/Aves/2761/3b60c9486db1d2ee875f11a669fbde4b.jpg\n"
                 "train_val2018/Aves/2761/4c7f.jpg\n"
                 "other/x.jpg 77\n")
    items = load_inat(lst, root=tmp_path / "images")
    assert [(x.label, x.split) for x in items] == [("2761", "test"), ("2761", "test"), ("77", "test")]
    assert items[2].path == tmp_path / "images/other/x.jpg"
    assert evaluate_labelled(items, np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]))["R@1"] == pytest.approx(200 / 3)
    _write(lst, "a.jpg 1\nb.jpg 1 2\n")
    with pytest.raises(DataError, match=r"Inaturalist_test_set1.txt:2: expected"):
        load_inat(lst)
    _write(lst, "a.jpg\n")
    with pytest.raises(DataError, match=r":1: 'a.jpg' has no parent folder"):
        load_inat(lst)


def test_coco_object_labels_on_coco_mini(shared_data: Path) -> None:
    labels = coco_object_labels(shared_data / "coco-mini" / "annotations" / "instances_val2017.json")
    assert len(labels) == 79 and all(labels.values())
    assert labels["139"] == {"book", "chair", "clock", "dining table", "microwave", "person", "potted plant",
                             "refrigerator", "tv", "vase"}
    ids = sorted(labels)
    rng = np.random.default_rng(0)
    m = recall_at_k_loo(rng.normal(size=(len(ids), 8)), [labels[i] for i in ids], ks=(1, 5))
    assert 0 < m["R@1"] <= m["R@5"] <= 100  # "person" alone makes random neighbours hit often


def test_coco_object_labels_errors(tmp_path: Path) -> None:
    p = _write(tmp_path / "instances.json", '{"images": [{"id": 1}], "categories": [{"id": 3, "name": "cat"}], '
                                            '"annotations": [{"image_id": 1, "category_id": 4}]}')
    with pytest.raises(DataError, match=r"annotations\[0\] has unknown category_id 4"):
        coco_object_labels(p)
    _write(p, '{"images": []}')
    with pytest.raises(DataError, match="not a COCO instances file"):
        coco_object_labels(p)
