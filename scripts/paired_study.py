"""One table of a reproduce study: retrieval, human judgments and uni-modal metrics per method,
with paired differences (same seed) between methods.

Reads ``<study>/results.json`` (written by ``itrkit reproduce``) and, where present, each run's
``unimodal.json`` (written by ``scripts/unimodal_study.py``). Prints a Markdown table (mean ± std
over seeds, paired Δ RSUM vs ``--baseline`` with wins/losses) and the paired differences of the
``--pairs`` on every metric; ``--json`` writes both.

    .venv/bin/python scripts/paired_study.py --study repro --pairs cusa-cusa-shuffled,cusa-cusa-smooth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.experiments.runner import paired_difference
from itrkit.utils.io import atomic_write_json

# (key, header): test-set figures of every seed run
METRICS = (("rsum", "RSUM"), ("f8k_human_t2i_map@r", "human t2i mAP@R"), ("f8k_expert_tau_c", "expert τ_c"),
           ("f8k_cf_tau_b", "CrowdFlower τ_b"), ("sts_stsb", "STS-B"), ("image_r1", "COCO-MINI image R@1"))


def per_seed(study: Path) -> dict[str, dict[int, dict[str, float]]]:
    """method → seed → metric, from results.json and the runs' unimodal.json."""
    results = json.loads((study / "results.json").read_text())
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, res in results.items():
        out[name] = {}
        for run in res["runs"]:
            row = {k: float(run[k]) for k, _ in METRICS if k in run}
            uni = study / "runs" / name / f"seed{run['seed']}" / "unimodal.json"
            if uni.is_file():
                row.update({k: float(v) for k, v in json.loads(uni.read_text()).items() if k in dict(METRICS)})
            out[name][int(run["seed"])] = row
    return out


def paired(table: dict[str, dict[int, dict[str, float]]], a: str, b: str, key: str) -> dict[str, Any] | None:
    """``a − b`` on the seeds both have (:func:`itrkit.experiments.runner.paired_difference`)."""
    def runs(name: str) -> list[dict[str, Any]]:
        return [{"seed": s, **row} for s, row in table[name].items()]

    return paired_difference(runs(a), runs(b), key)


def _ms(vals: list[float]) -> str:
    return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.2f}"


def markdown(table: dict[str, dict[int, dict[str, float]]], baseline: str) -> str:
    keys = [(k, h) for k, h in METRICS if any(k in r for runs in table.values() for r in runs.values())]
    head = ["method", *[h for _, h in keys[:1]], f"Δ RSUM vs {baseline} (w/l)", *[h for _, h in keys[1:]], "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in table.items():
        cells = [name]
        for i, (k, _) in enumerate(keys):
            vals = [r[k] for r in runs.values() if k in r]
            cells.append(_ms(vals) if vals else "")
            if i == 0:
                p = paired(table, name, baseline, "rsum") if name != baseline and baseline in table else None
                cells.append(f"{p['mean']:+.2f} ± {p['std']:.2f} ({p['wins']}/{p['losses']})" if p else "")
        lines.append("| " + " | ".join([*cells, str(len(runs))]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="the --out folder of itrkit reproduce")
    ap.add_argument("--baseline", default="infonce")
    ap.add_argument("--pairs", default="", help="comma-separated A-B (method names joined by '-' at a known name)")
    ap.add_argument("--json", default="", help="write the table's numbers and the pairs here")
    a = ap.parse_args(argv)
    table = per_seed(Path(a.study))
    print(markdown(table, a.baseline))
    pairs: dict[str, dict[str, Any]] = {}
    for item in filter(None, (p.strip() for p in a.pairs.split(","))):
        split = [(item[:i], item[i + 1:]) for i in range(len(item)) if item[i] == "-"
                 and item[:i] in table and item[i + 1:] in table]
        if not split:
            raise SystemExit(f"error: --pairs '{item}': not two methods of {a.study}/results.json joined by '-'")
        x, y = split[0]
        pairs[f"{x} − {y}"] = {k: p for k, _ in METRICS if (p := paired(table, x, y, k)) is not None}
        print(f"{x} − {y}: " + "; ".join(f"{k} {p['mean']:+.2f} ± {p['std']:.2f} ({p['wins']}/{p['losses']})"
                                        for k, p in pairs[f"{x} − {y}"].items()))
    if a.json:
        atomic_write_json(a.json, {"per_seed": table, "pairs": pairs, "baseline": a.baseline})


if __name__ == "__main__":
    main()
