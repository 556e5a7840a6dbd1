"""Semantic textual similarity: Spearman ×100 of cosine similarities (docs/method.md §4.6, CUSA Table 3).

Test sets, read in place from a folder laid out as SentEval's ``data/downstream/STS``:

- ``sts12`` … ``sts16``: ``STS1N-en-test/STS.input.<subset>.txt`` (tab-separated sentence pairs;
  extra columns ignored) and ``STS.gs.<subset>.txt`` (one gold score per line; a blank line means
  the pair was not scored and is dropped). Subsets as in SentEval; STS13 without SMT (licensed,
  absent from SentEval too), so three subsets.
- ``stsb``: ``STSBenchmark/sts-test.csv``, tab-separated ``genre file year id score s1 s2 [...]``.
- ``sickr``: ``SICK/SICK_test_annotated.txt``, header line, then ``pair_ID s1 s2 relatedness ...``.

Aggregation for the STS12–16 years follows SentEval, which reports three numbers: "all" =
Spearman over the concatenation of the year's subsets (the main ``sts_sts1N`` key; the number
SimCSE-style tables, and CUSA via SentEval, report), "mean" = the plain mean of per-subset
Spearman (``sts_sts1N_mean``) and "wmean" = their mean weighted by subset size
(``sts_sts1N_wmean``). ``sts_sts12-16`` is the mean of the five years and ``sts_avg`` the mean
of the seven task numbers (CUSA's "Avg."), present when all of them were evaluated.
Sentences are whitespace-normalised (SentEval splits on whitespace and batchers re-join).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from itrkit.errors import DataError
from itrkit.utils.optional import require

STS_YEARS: dict[str, tuple[str, ...]] = {
    "sts12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "sts13": ("FNWN", "headlines", "OnWN"),
    "sts14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "sts15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "sts16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
TASKS = (*STS_YEARS, "stsb", "sickr")


class StsSubset(NamedTuple):
    name: str
    sent1: list[str]
    sent2: list[str]
    scores: np.ndarray


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"STS file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _clean(s: str) -> str:
    return " ".join(s.split())


def _score(text: str, path: Path, no: int) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DataError(f"{path}:{no}: gold score {text.strip()!r} is not a number") from None
    if not np.isfinite(v):
        raise DataError(f"{path}:{no}: gold score {text.strip()!r} is not finite")
    return v


def _load_year(folder: Path, subset: str) -> StsSubset:
    inp, gs = folder / f"STS.input.{subset}.txt", folder / f"STS.gs.{subset}.txt"
    pairs, golds = _lines(inp), _lines(gs)
    if len(pairs) != len(golds):
        raise DataError(f"{gs}: {len(golds)} gold lines for {len(pairs)} sentence pairs in {inp.name}")
    s1, s2, y = [], [], []
    for no, (pair, gold) in enumerate(zip(pairs, golds), 1):
        if not gold.strip():
            continue  # not part of the official scoring
        f = pair.split("\t")
        if len(f) < 2:
            raise DataError(f"{inp}:{no}: expected two tab-separated sentences")
        s1.append(_clean(f[0]))
        s2.append(_clean(f[1]))
        y.append(_score(gold, gs, no))
    if not y:
        raise DataError(f"{gs}: no scored pair")
    return StsSubset(subset, s1, s2, np.array(y))


def _load_table(path: Path, header: bool, cols: tuple[int, int, int], name: str) -> StsSubset:
    """Tab-separated pairs with the score and both sentences at ``cols`` (0-based)."""
    s1, s2, y = [], [], []
    for no, line in enumerate(_lines(path), 1):
        if (header and no == 1) or not line.strip():
            continue
        f = line.split("\t")
        if len(f) <= max(cols):
            raise DataError(f"{path}:{no}: expected at least {max(cols) + 1} tab-separated fields, got {len(f)}")
        y.append(_score(f[cols[0]], path, no))
        s1.append(_clean(f[cols[1]]))
        s2.append(_clean(f[cols[2]]))
    if not y:
        raise DataError(f"{path}: no sentence pair")
    return StsSubset(name, s1, s2, np.array(y))


def load_sts(name: str, root: str | Path) -> list[StsSubset]:
    """The test pairs of one task (one :class:`StsSubset` per input file)."""
    root = Path(root)
    if name in STS_YEARS:
        folder = root / f"STS{name[3:]}-en-test"
        return [_load_year(folder, s) for s in STS_YEARS[name]]
    if name == "stsb":
        return [_load_table(root / "STSBenchmark" / "sts-test.csv", False, (4, 5, 6), "test")]
    if name == "sickr":
        return [_load_table(root / "SICK" / "SICK_test_annotated.txt", True, (3, 1, 2), "test")]
    raise DataError(f"unknown STS task {name!r}; one of {', '.join(TASKS)}")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(1) / (na * nb)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr  # the [eval] extra, checked by evaluate_sts

    return float(100.0 * spearmanr(x, y).statistic)


def evaluate_sts(encode: Callable[[list[str]], Any], root: str | Path, tasks: Sequence[str] = TASKS,
                 batch_size: int = 256) -> dict[str, float]:
    """Spearman ×100 between gold scores and the cosine of ``encode``'s sentence embeddings.

    ``encode(list of sentences) -> (n, d)`` array or tensor; called on batches of unique
    sentences. Keys: ``sts_<task>`` (years: also ``_mean`` / ``_wmean``), ``sts_sts12-16``, ``sts_avg``.
    """
    require("scipy", "eval", "STS evaluation (itrkit eval --sts)")
    from tqdm.auto import tqdm

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown STS task {unknown[0]!r}; one of {', '.join(TASKS)}")
    data = {t: load_sts(t, root) for t in tasks}
    sentences = sorted({s for subs in data.values() for sub in subs for s in (*sub.sent1, *sub.sent2)})
    rows: dict[str, int] = {s: i for i, s in enumerate(sentences)}
    parts = []
    for s in tqdm(range(0, len(sentences), batch_size), desc="STS encode", disable=None):
        batch = sentences[s:s + batch_size]
        e = encode(batch)
        e = np.asarray(e.detach().cpu().float() if hasattr(e, "detach") else e, dtype=np.float32)
        if e.ndim != 2 or len(e) != len(batch):
            raise DataError(f"encode returned shape {e.shape} for {len(batch)} sentences")
        parts.append(e)
    emb = np.concatenate(parts)
    if not np.isfinite(emb).all():
        raise DataError("encode returned non-finite sentence embeddings")
    out: dict[str, float] = {}
    for task, subs in data.items():
        sims = [_cosine(emb[[rows[s] for s in sub.sent1]], emb[[rows[s] for s in sub.sent2]]) for sub in subs]
        out[f"sts_{task}"] = _spearman(np.concatenate(sims), np.concatenate([sub.scores for sub in subs]))
        if task in STS_YEARS:
            per = np.array([_spearman(x, sub.scores) for x, sub in zip(sims, subs)])
            sizes = np.array([len(sub.scores) for sub in subs])
            out[f"sts_{task}_mean"] = float(per.mean())
            out[f"sts_{task}_wmean"] = float(np.average(per, weights=sizes))
    if all(f"sts_{y}" in out for y in STS_YEARS):
        out["sts_sts12-16"] = float(np.mean([out[f"sts_{y}"] for y in STS_YEARS]))
    if all(f"sts_{t}" in out for t in TASKS):
        out["sts_avg"] = float(np.mean([out[f"sts_{t}"] for t in TASKS]))
    return out
