"""Flickr8k human-judgment metrics equal a slow explicit reference (scipy Kendall τ on the expanded
judgments; per-query loops for mAP@R and R-Precision) on the real annotation files, and a tiny
hand-computed case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau

from itrkit.errors import DataError
from itrkit.eval.flickr8k_human import (
    CROWDFLOWER_FILE,
    EXPERT_FILE,
    METRIC_KEYS,
    evaluate_flickr8k_human,
    find_annotations_dir,
    judged_pairs,
    kendall_tau_weighted,
)
from tests.conftest import flickr8k_test_embeddings
from tests.eval.human_reference import human_reference


# --------------------------------------------------------------------------------------------
# The slow reference: the docs/method.md §4.5 definitions written out
# --------------------------------------------------------------------------------------------
def _reference(img: np.ndarray, txt: np.ndarray, names: list[str], caps: list[str], ann: Path) -> dict:
    """The slow reference on the cosine of the unit embeddings (both directions, and the τ)."""
    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    return human_reference(cos, cos, lambda i, c: cos[i, c], names, caps, ann)


# --------------------------------------------------------------------------------------------
# A tiny case computed by hand
# --------------------------------------------------------------------------------------------
TINY_EXPERT = """A.jpg\tA.jpg#0\t4\t4\t4
A.jpg\tB.jpg#0\t1\t1\t2
B.jpg\tA.jpg#1\t1\t2\t2
A.jpg\tB.jpg#1\t2\t3\t4
"""
TINY_CF = """A.jpg\tA.jpg#0\t1\t3\t0
A.jpg\tB.jpg#1\t0.666666666666667\t2\t1
B.jpg\tA.jpg#1\t0.333333333333333\t1\t2
A.jpg\tB.jpg#0\t0\t0\t3
A.jpg\tB.jpg#2\t0.333333333333333\t1\t2
Z.jpg\tA.jpg#0\t1\t3\t0
"""


def _tiny(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str], Path]:
    ann = tmp_path / "ann"
    ann.mkdir(parents=True)
    (ann / EXPERT_FILE).write_text(TINY_EXPERT)
    (ann / CROWDFLOWER_FILE).write_text(TINY_CF)
    img = np.array([[1.0, 0.0], [0.0, 1.0]])  # A, B: a caption's scores are its two coordinates
    h = np.sqrt(0.75)
    txt = np.array([[1, 0], [0.5, h], [0, 1], [h, 0.5], [1, 1]])  # A#0 A#1 B#0 B#1 B#2 (B#2: tied)
    return img, txt, ["A.jpg", "B.jpg"], ["A.jpg#0", "A.jpg#1", "B.jpg#0", "B.jpg#1", "B.jpg#2"], ann


def test_tiny_case_equals_hand_computed_values(tmp_path: Path) -> None:
    img, txt, names, caps, ann = _tiny(tmp_path)
    got = evaluate_flickr8k_human(img, txt, names, caps, ann)
    # Expert cross pairs (own A-A#0 left out): (x=0: 1,1,2), (x=h: 1,2,2), (x=h: 2,3,4); 9 entries.
    # C - D = 2·5 + (1·2 - 1·1) = 11; τ_c = 2·11 / (9² · (2-1)/2) with min(2 scores, 4 grades) = 2.
    assert got["f8k_expert_tau_c"] == pytest.approx(100 * 22 / 40.5, abs=1e-9)
    # CF judgments (own pair and the Z.jpg pair out): x=0: 0,0,0; x=√.5: 1,0,0; x=h: 1,1,0,1,0,0.
    # C - D = 3 + 9 + (6 - 3) = 15; 66 pairs, 21 tied in x, 6 + 28 = 34 tied in y.
    assert got["f8k_cf_tau_b"] == pytest.approx(100 * 15 / np.sqrt(45 * 32), abs=1e-9)
    # i2t: A's positives A#0, A#1, B#1 (CF 2/3): ranking A#0 B#1 B#2 | A#1 → AP (1 + 1)/3, RP 2/3.
    #      B's positives B#0, B#1, B#2 (B-A#1 judged no): ranking B#0 A#1 B#2 → AP (1 + 2/3)/3, RP 2/3.
    assert got["f8k_human_i2t_map@r"] == pytest.approx(100 * (2 / 3 + 5 / 9) / 2, abs=1e-9)
    assert got["f8k_human_i2t_rp"] == pytest.approx(100 * 2 / 3, abs=1e-9)
    # t2i: A#0 hit; A#1 (own A only) ranks B first: 0; B#0 hit; B#1 (B, A both positive): 1;
    #      B#2 scores A and B equally: A, the lower index, ranks first → 0.
    assert got["f8k_human_t2i_map@r"] == pytest.approx(100 * 3 / 5, abs=1e-9)
    assert got["f8k_human_t2i_rp"] == pytest.approx(100 * 3 / 5, abs=1e-9)
    assert (got["f8k_expert_pairs"], got["f8k_cf_pairs"], got["f8k_skipped_pairs"]) == (3, 4, 1)
    assert list(got)[:6] == list(METRIC_KEYS)
    ref = _reference(img, txt, names, caps, ann)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    # the page's amber items: people's positives that are another image's caption
    assert judged_pairs(names, caps, ann) == {(0, 3)}


def test_weighted_kendall_equals_scipy_on_expanded_entries() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 40, size=300) / 7.0  # many ties in x
    y = rng.integers(1, 5, size=300)
    w = rng.integers(0, 4, size=300)
    xe, ye = np.repeat(x, w), np.repeat(y, w)
    for v in ("b", "c"):
        assert kendall_tau_weighted(x, y, w, v) == pytest.approx(kendalltau(xe, ye, variant=v).statistic, abs=1e-12)
    assert np.isnan(kendall_tau_weighted(np.ones(5), y[:5], np.ones(5, int), "b"))


# --------------------------------------------------------------------------------------------
# The real annotation files
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def f8k_test(shared_data: Path) -> dict:
    return flickr8k_test_embeddings(shared_data / "flickr8k")


def test_real_files_equal_the_slow_reference(f8k_test: dict) -> None:
    d = f8k_test
    assert len(d["names"]) == 1000 and len(d["caps"]) == 5000
    got = evaluate_flickr8k_human(d["img"], d["txt"], d["names"], d["caps"], d["dir"])
    ref = _reference(d["img"], d["txt"], d["names"], d["caps"], d["dir"])
    # the counts docs/method.md §4.5 states: 5,664 cross-image expert pairs × 3, 47,109 CrowdFlower pairs
    assert ref["expert_entries"] == 16992 and got["f8k_expert_pairs"] == 5664
    assert ref["cf_judgments"] == 142685 and got["f8k_cf_pairs"] == 47109
    assert got["f8k_skipped_pairs"] == ref["skipped"] == 0
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    assert 5 < got["f8k_human_i2t_map@r"] < 95 and 5 < got["f8k_human_t2i_rp"] < 95  # neither trivial nor empty
    assert find_annotations_dir([d["dir"] / "images" / d["names"][0]]) == d["dir"]


def test_real_files_on_a_subset_skip_absent_pairs_and_equal_the_reference(f8k_test: dict) -> None:
    d = f8k_test
    names = d["names"][:300]
    keep = [m for m, c in enumerate(d["caps"]) if m % 5 != 4 and c.split("#")[0] in set(names)]
    caps = [d["caps"][m] for m in keep]
    got = evaluate_flickr8k_human(d["img"][:300], d["txt"][keep], names, caps, d["dir"])
    ref = _reference(d["img"][:300], d["txt"][keep], names, caps, d["dir"])
    assert got["f8k_skipped_pairs"] == ref["skipped"] > 40000
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k


# --------------------------------------------------------------------------------------------
# Bad inputs: one-line errors naming the file and line
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("which", "text", "match"), [
    (EXPERT_FILE, "A.jpg\tB.jpg#0\t1\t1\t2\nA.jpg\tB.jpg#1\t1\t1\n", rf"{EXPERT_FILE}:2: malformed line, 4 tab"),
    (EXPERT_FILE, "A.jpg\tB.jpg#0\t1\t5\t2\n", rf"{EXPERT_FILE}:1: expert scores '1 5 2' are not three integers"),
    (EXPERT_FILE, "A.jpg\tB.jpg\t1\t1\t2\n", rf"{EXPERT_FILE}:1: malformed image / caption id"),
    (EXPERT_FILE, "A.jpg\tB.jpg#0\t1\t1\t2\nA.jpg\tB.jpg#0\t1\t1\t2\n", rf"{EXPERT_FILE}:2: duplicate pair"),
    (CROWDFLOWER_FILE, "A.jpg\tB.jpg#1\t0.5\t2\t1\n", rf"{CROWDFLOWER_FILE}:1: percent-yes 0.5 disagrees"),
    (CROWDFLOWER_FILE, "A.jpg\tB.jpg#1\tx\t2\t1\n", rf"{CROWDFLOWER_FILE}:1: percent-yes / #yes / #no"),
    (CROWDFLOWER_FILE, "A.jpg\tB.jpg#1\t0\t0\t0\n", rf"{CROWDFLOWER_FILE}:1: #yes 0 / #no 0"),
    (CROWDFLOWER_FILE, "", rf"{CROWDFLOWER_FILE}: empty"),
])
def test_malformed_annotation_file_is_a_one_line_error_naming_it(tmp_path: Path, which: str, text: str,
                                                                 match: str) -> None:
    img, txt, names, caps, ann = _tiny(tmp_path)
    (ann / which).write_text(text)
    with pytest.raises(DataError, match=match) as e:
        evaluate_flickr8k_human(img, txt, names, caps, ann)
    assert "\n" not in str(e.value) and str(ann / which) in str(e.value)


def test_missing_file_and_bad_ids(tmp_path: Path) -> None:
    img, txt, names, caps, ann = _tiny(tmp_path)
    (ann / CROWDFLOWER_FILE).unlink()
    with pytest.raises(DataError, match=rf"{CROWDFLOWER_FILE}: Flickr8k CrowdFlower annotation file not found"):
        evaluate_flickr8k_human(img, txt, names, caps, ann)
    img, txt, names, caps, ann = _tiny(tmp_path / "b")
    with pytest.raises(DataError, match="caption id 'A.jpg_0' is not 'name.jpg#k'"):
        evaluate_flickr8k_human(img, txt, names, ["A.jpg_0" if c == "A.jpg#0" else c for c in caps], ann)
    with pytest.raises(DataError, match="duplicate image name 'A.jpg'"):
        evaluate_flickr8k_human(img, txt, ["A.jpg", "A.jpg"], caps, ann)
    with pytest.raises(DataError, match="1 image names for 2 image embeddings"):
        evaluate_flickr8k_human(img, txt, ["A.jpg"], caps, ann)
    with pytest.raises(DataError, match="none of the 4 pairs .* is among the 2 images"):
        evaluate_flickr8k_human(img, txt, ["X.jpg", "Y.jpg"], [c.replace("A", "X").replace("B", "Y") for c in caps],
                                ann)
