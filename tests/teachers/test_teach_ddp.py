"""`teach`, the grid store and the tower-feature cache under torchrun: 2 gloo ranks shard the
batches and write one store / cache entry, the same as one process writes (rows bitwise, same ids,
same shard files), and every rank gets every cached feature row back.

Both runs use one thread per process (torchrun's default), so the float arithmetic is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from itrkit.teachers.store import FeatureStore

from ..train.test_ddp import TORCHRUN

SCRIPT = r"""
import json, sys
from safetensors.numpy import save_file
from itrkit.data.records import Dataset
from itrkit.models import features, tiny
from itrkit.models.towers import build_tower
from itrkit.teachers import grid
from itrkit.teachers.extract import teach
from itrkit.utils.device import dist_info, every_rank

data, out, cache = sys.argv[1:4]
features.SHARD_ITEMS = 40  # several resumable shards, dealt over the ranks
calls = {"image": 0, "text": 0, "grid": 0}  # batches this rank encoded
for cls, kind in ((tiny.TinyImageTower, "image"), (tiny.TinyTextTower, "text")):
    def counted(self, inputs, _orig=cls.forward, _kind=kind):
        calls[_kind] += 1
        return _orig(self, inputs)
    cls.forward = counted
orig_grid = grid._GridEncoder.__call__
def grid_call(self, x):
    calls["grid"] += 1
    return orig_grid(self, x)
grid._GridEncoder.__call__ = grid_call
ds = Dataset.load(data)
# PCA on the image side: its fitting sample is a write unit of its own, also encoded on both ranks.
teach(ds, "tiny-image", "tiny-text", out, reduction={"image": "pca:8", "text": None}, batch_size=8,
      pca_sample=24, device="cpu")
grid.build_grid_store(ds.subset(10), f"{out}/grid.store", batch_size=2, progress=False, device="cpu")
rank, world = dist_info()
tower = build_tower("tiny-text", "text")
with every_rank():  # as a task built on every rank (training) caches its features
    feats = features.cached_features(tower, ds.texts, ds.caption_ids, cache_dir=cache, kind="text", batch_size=8)
save_file({"features": feats}, f"{out}/returned-rank{rank}.safetensors")
with open(f"{out}/calls-rank{rank}.json", "w") as f:  # one file per rank: stdout lines of ranks interleave
    json.dump({"rank": rank, "world": world, "calls": calls}, f)
import torch.distributed as dist
if dist.is_initialized():  # as the CLI does: no gloo threads left to race the interpreter's exit
    dist.barrier()
    dist.destroy_process_group()
"""


def _run(script: Path, data: Path, out: Path, nproc: int) -> list[dict[str, int]]:
    """Run the job; each rank's count of encoded batches per kind."""
    args = [str(script), str(data), str(out), str(out / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args] if nproc > 1 else [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("calls-rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == list(range(nproc)) and {r["world"] for r in ranks} == {nproc}
    return [r["calls"] for r in sorted(ranks, key=lambda r: r["rank"])]


def _files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under a folder (relative names), minus timing-bearing headers."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".json"}


def test_two_rank_teach_and_feature_cache_write_what_one_process_writes(tmp_path: Path, synth_dir: Path) -> None:
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found")
    script = tmp_path / "teach_job.py"
    script.write_text(SCRIPT)
    [one] = _run(script, synth_dir, tmp_path / "one", 1)
    r0, r1 = _run(script, synth_dir, tmp_path / "two", 2)
    for kind in ("image", "text", "grid"):  # the batches were dealt out: each rank encoded its share
        assert r0[kind] + r1[kind] == one[kind] and min(r0[kind], r1[kind]) >= one[kind] // 3 > 0
    for kind in ("image", "text"):
        a = FeatureStore.open(tmp_path / "one" / f"{kind}.store")
        b = FeatureStore.open(tmp_path / "two" / f"{kind}.store")
        assert a.ids == b.ids and a.count == b.count >= 60 and a.dim == b.dim
        assert a.dtype == b.dtype and a.reduction == b.reduction
        ra, rb = np.asarray(a.features), np.asarray(b.features)
        assert ra.tobytes() == rb.tobytes()  # rows bitwise
        assert np.abs(ra.astype(np.float32)).sum() > 0
        assert _files(a.path) == _files(b.path)  # the same payload, PCA and shard files
    assert a.header.get("teacher") == b.header.get("teacher")
    ga, gb = FeatureStore.open(tmp_path / "one" / "grid.store"), FeatureStore.open(tmp_path / "two" / "grid.store")
    assert ga.ids == gb.ids and ga.count == 10 and ga.header["grid"] == gb.header["grid"]
    assert np.asarray(ga.features).tobytes() == np.asarray(gb.features).tobytes()
    assert _files(ga.path) == _files(gb.path)
    # The feature cache: one entry, the same bytes, and every rank holds every row.
    ea, eb = _files(tmp_path / "one" / "cache"), _files(tmp_path / "two" / "cache")
    assert len(ea) == 1 and ea == eb
    mine = load_file(str(tmp_path / "one" / "returned-rank0.safetensors"))["features"]
    for r in (0, 1):
        got = load_file(str(tmp_path / "two" / f"returned-rank{r}.safetensors"))["features"]
        assert got.tobytes() == mine.tobytes()
