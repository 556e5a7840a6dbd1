"""Teacher rows served from RAM (``teacher.ram_mb``) give exactly what per-batch disk reads give,
and the byte budget decides which store is read into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.data.records import Dataset
from itrkit.teachers.store import FeatureStore
from itrkit.train.data import PairData, _teacher_rows
from itrkit.train.tasks import DualEncoderTask
from itrkit.train.trainer import TrainModule
from tests.train.conftest import tiny_config


def _losses(cfg, ds: Dataset, steps: int) -> tuple[list[dict[str, float]], dict[str, bool]]:
    torch.manual_seed(0)
    task = DualEncoderTask(cfg, ds)
    # Attach as the config says (independent of how tasks.py passes the budget).
    img = FeatureStore.open(cfg.teacher.image_store)
    txt = FeatureStore.open(cfg.teacher.text_store)
    task.train_data.attach_teachers(img, txt, ram_mb=cfg.teacher.ram_mb)
    task.set_weights(cfg.weights(cfg.stages[0]))
    module = TrainModule(task, gather=False)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.01)
    out_losses = []
    batches = task.epoch_batches(0, 0) + task.epoch_batches(0, 1)
    for idx in batches[:steps]:
        out = module(task.make_batch(idx))
        losses = {k: v for k, v in out.items() if k.endswith("_loss")}
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        task.clamp_temperatures_()
        out_losses.append({k: float(v.detach()) for k, v in losses.items()})
    return out_losses, task.train_data.teachers_in_ram()


def test_in_ram_teachers_give_the_same_losses_as_disk_reads(tmp_path: Path, synth_dir: Path,
                                                             teacher_stores: list[str]) -> None:
    ds = Dataset.load(synth_dir)
    common = ["loss.csa=1.0", "loss.usa=0.5", "loss.tau_teacher=0.1", "model.usa_heads=true", *teacher_stores]
    ram, in_ram = _losses(tiny_config(tmp_path / "a", synth_dir, *common, "teacher.ram_mb=1024"), ds, 6)
    disk, on_disk = _losses(tiny_config(tmp_path / "b", synth_dir, *common, "teacher.ram_mb=0"), ds, 6)
    assert in_ram == {"image": True, "text": True} and on_disk == {"image": False, "text": False}
    assert len(ram) == 6 and {"csa_loss", "usa_loss", "contrastive_loss"} <= set(ram[0])
    assert ram == disk  # exact float equality, step by step
    assert ram[0] != ram[-1]  # the steps trained (not one repeated value)


def _store(path: Path, ids: list[str], dim: int, seed: int) -> FeatureStore:
    w = FeatureStore.create(path, ids, dim, {"name": "random"}, "image")
    w.write(0, np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32))
    return w.close()


def test_a_store_over_the_budget_stays_on_disk(tmp_path: Path, synth_dir: Path) -> None:
    ds = Dataset.load(synth_dir).split("train")
    n = len(ds.image_ids)
    # float32 bytes of the split's rows: `big` is over 1 MB, `small` far under it.
    big_dim = (1 << 20) // (4 * n) + 16
    big = _store(tmp_path / "big.store", ds.image_ids, big_dim, 0)
    small = _store(tmp_path / "small.store", ds.caption_ids, 8, 1)
    assert n * big_dim * 4 > 1 << 20
    data = PairData(ds, model=None, cached=False)  # type: ignore[arg-type]  # teacher rows only
    data.attach_teachers(big, small, ram_mb=1)
    assert data.teachers_in_ram() == {"image": False, "text": True}
    # Budget shared by both stores: with the big one in RAM, nothing is left for the small one.
    need_mb = -(-(n * big_dim * 4) // (1 << 20))
    data.attach_teachers(big, small, ram_mb=need_mb)
    room = (need_mb << 20) - n * big_dim * 4
    assert data.teachers_in_ram() == {"image": True, "text": len(ds.caption_ids) * 8 * 4 <= room}
    data.attach_teachers(big, small, ram_mb=0)
    assert data.teachers_in_ram() == {"image": False, "text": False}


@pytest.mark.parametrize("shuffle_seed", [None, 3])
def test_in_ram_rows_equal_disk_rows_for_any_batch(tmp_path: Path, synth_dir: Path, shuffle_seed: int | None) -> None:
    ds = Dataset.load(synth_dir).split("train")
    img = _store(tmp_path / "i.store", ds.image_ids, 24, 2)
    txt = _store(tmp_path / "t.store", ds.caption_ids, 16, 3)
    a = PairData(ds, model=None, cached=False)  # type: ignore[arg-type]
    b = PairData(ds, model=None, cached=False)  # type: ignore[arg-type]
    a.attach_teachers(img, txt, shuffle_seed=shuffle_seed, ram_mb=64)
    b.attach_teachers(img, txt, shuffle_seed=shuffle_seed, ram_mb=0)
    assert a.teachers_in_ram() == {"image": True, "text": True}
    idx = np.random.default_rng(0).integers(0, a.n_pairs, 40)  # repeats included
    for ta, tb in ((a.teacher_image, b.teacher_image), (a.teacher_text, b.teacher_text)):
        sel = ds.txt2img[idx] if ta is a.teacher_image else idx
        x, y = _teacher_rows(ta, sel), _teacher_rows(tb, sel)
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y)
