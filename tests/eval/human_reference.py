"""The slow reference of the Flickr8k human-judgment metrics (docs/method.md §4.5), written out
with loops over the annotation files, for every test of ``itrkit.eval.flickr8k_human``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE


def _read(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def human_reference(i2t: np.ndarray, t2i: np.ndarray, pair, names: list[str], caps: list[str], ann: Path) -> dict:
    """Image n ranks captions by ``i2t[n]``, caption m ranks images by ``t2i[:, m]`` (descending,
    ties: lower index first); ``pair(i, c)`` is the model score of one pair for the two τ. Also
    counts: ``expert_entries`` / ``cf_judgments`` (individual judgments used), ``skipped`` (pairs absent)."""
    i2t, t2i = np.asarray(i2t, dtype=np.float64), np.asarray(t2i, dtype=np.float64)
    row = {n: i for i, n in enumerate(names)}
    col = {c: m for m, c in enumerate(caps)}
    expert, cf = _read(ann / EXPERT_FILE), _read(ann / CROWDFLOWER_FILE)
    out: dict = {"skipped": 0}
    xs, ys = [], []
    for im, cap, *scores in expert:
        if im in row and cap in col and cap.split("#")[0] != im:
            s = float(pair(row[im], col[cap]))
            for v in scores:
                xs.append(s)
                ys.append(int(v))
    out["expert_entries"] = len(xs)
    out["f8k_expert_tau_c"] = 100 * kendalltau(xs, ys, variant="c").statistic
    xs, ys = [], []
    for im, cap, _pct, yes, no in cf:
        if im in row and cap in col and cap.split("#")[0] != im:
            s = float(pair(row[im], col[cap]))
            xs += [s] * (int(yes) + int(no))
            ys += [1] * int(yes) + [0] * int(no)
    out["cf_judgments"] = len(xs)
    out["f8k_cf_tau_b"] = 100 * kendalltau(xs, ys, variant="b").statistic
    pos_i2t: dict[int, set[int]] = {i: set() for i in range(len(names))}
    pos_t2i: dict[int, set[int]] = {m: set() for m in range(len(caps))}
    for m, c in enumerate(caps):
        if c.split("#")[0] in row:
            pos_i2t[row[c.split("#")[0]]].add(m)
            pos_t2i[m].add(row[c.split("#")[0]])
    for lines, positive in ((expert, lambda f: np.mean([int(v) for v in f[2:]]) >= 3),
                            (cf, lambda f: float(f[2]) >= 0.5)):
        for f in lines:
            if f[0] not in row or f[1] not in col:
                out["skipped"] += 1
            elif positive(f):
                pos_i2t[row[f[0]]].add(col[f[1]])
                pos_t2i[col[f[1]]].add(row[f[0]])
    for d, n_q, scores_of, pos in (("i2t", len(names), lambda q: i2t[q], pos_i2t),
                                   ("t2i", len(caps), lambda q: t2i[:, q], pos_t2i)):
        aps, rps = [], []
        for q in range(n_q):
            p = sorted(pos[q])
            if not p:
                continue
            R, s = len(p), scores_of(q)
            # 1-based rank of each positive: higher scores first, then equal scores at lower indices
            rank = {g: 1 + int(np.sum(s > s[g])) + int(np.sum(s[:g] == s[g])) for g in p}
            ap = sum(sum(1 for h in p if rank[h] <= rank[g]) / rank[g] for g in p if rank[g] <= R)
            aps.append(ap / R)
            rps.append(sum(1 for g in p if rank[g] <= R) / R)
        out[f"f8k_human_{d}_map@r"] = 100 * float(np.mean(aps))
        out[f"f8k_human_{d}_rp"] = 100 * float(np.mean(rps))
    return out
