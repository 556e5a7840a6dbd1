"""Training and evaluation of fusion matchers (any :class:`~itrkit.models.fusion_base.FusionMatcher`).

``train_fusion(cfg)`` reads a prepared dataset (the dual-encoder trainer's input), looks up each
image's region features in a grid store (``itrkit grid``) by image id, tokenises captions with the
model's text tokenizer, and trains with AdamW (matrices decayed, never biases / norms /
temperatures), a cosine / step / constant learning-rate schedule and gradient-norm clipping at
2.0 (VSE++ / SGRAF practice). Optional teacher stores (image by image id, text by caption id)
feed CUSA terms.

**One caption per image per epoch.** A fusion matcher scores every image of a batch with every
caption (B² pairs through the model), so an epoch over all 5 captions of Flickr8k would cost 5×
as much on CPU. Each epoch therefore visits every training image once, with one of its captions
drawn at random (seeded by ``(seed, epoch)``); batches hold distinct images.

A run folder holds ``config.yaml`` (resolved), ``train.log`` (JSON lines), ``checkpoints/``
(resumable: model, optimizer and RNG state), ``model/`` (the model picked on validation RSUM,
``model.json`` + ``model.safetensors``), ``metrics.json`` (``best``, ``steps``, ``val``, ``test``,
``history`` as the dual-encoder trainer, plus ``timing``) and ``scores_<split>.safetensors`` (the
test score matrix, reused by ensembles). Runs are deterministic on CPU for a given seed, and a
resumed run continues bitwise as if uninterrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from itrkit.config import from_dict, save_config, to_dict
from itrkit.data.records import Dataset
from itrkit.errors import CheckpointError, ConfigError, DataError, ItrkitError, NonFiniteLossError
from itrkit.eval.retrieval import metrics_from_scores
from itrkit.models.fusion_base import FusionBatch, FusionMatcher
from itrkit.train.checkpoint import load_latest_checkpoint, save_checkpoint
from itrkit.utils.io import atomic_dir, atomic_write_json

FUSION_MODEL_FORMAT = "itrkit-fusion-model/1"

# name → "module:callable"; the callable takes the model options (plus ``region_dim``, the grid
# store's channel count) as keyword arguments and returns a FusionMatcher.
FUSION_MODELS: dict[str, str | Callable[..., FusionMatcher]] = {
    "sgr": "itrkit.models.sgraf:SGR",
    "saf": "itrkit.models.sgraf:SAF",
    "rerank": "itrkit.models.rerank:ReRanker",
}


def register_fusion_model(name: str, builder: str | Callable[..., FusionMatcher]) -> None:
    """Make ``model.name: <name>`` available to the fusion trainer."""
    FUSION_MODELS[name] = builder


def build_fusion_model(spec: dict[str, Any]) -> FusionMatcher:
    """``{"name": ..., **options}`` → a FusionMatcher (weights drawn from the global torch RNG)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in FUSION_MODELS:
        raise ConfigError(f"model.name '{name}' is not a fusion model (known: {', '.join(FUSION_MODELS)})")
    builder = FUSION_MODELS[name]
    if isinstance(builder, str):
        mod, attr = builder.split(":")
        builder = getattr(importlib.import_module(mod), attr)
    model = builder(**spec)
    if not isinstance(model, FusionMatcher):
        raise ConfigError(f"fusion model '{name}' built a {type(model).__name__}, not a FusionMatcher")
    return model


# --- configuration ---------------------------------------------------------------------------------
@dataclass
class FusionDataConfig:
    path: str = ""  # prepared dataset folder
    grid_store: str = ""  # folder written by ``itrkit grid`` (keyed by image id)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_images: int = 0  # 0 = all
    # Fusion scoring is O(images × captions) through the model: validating every epoch on a subset
    # of the dev images keeps CPU runs short (0 = all). Test always uses max_test_images.
    max_val_images: int = 0
    max_test_images: int = 0

    def validate(self) -> None:
        if min(self.max_train_images, self.max_val_images, self.max_test_images) < 0:
            raise ConfigError("data.max_*_images must be >= 0")


@dataclass
class FusionTeacherConfig:
    image_store: str = ""  # ``itrkit teach`` stores (CUSA): image features by image id
    text_store: str = ""  # text features by caption id


@dataclass
class FusionTrainConfig:
    seed: int = 0
    out: str = "runs/fusion"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "sgr"})
    batch_size: int = 64
    epochs: int = 10
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | step | constant
    lr_decay_epoch: int = 0  # step schedule: lr × 0.1 from this epoch on (SGRAF practice)
    grad_clip: float = 2.0
    eval_every: int = 1
    select_metric: str = "rsum"
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0 = epoch ends only)
    threads: int = 0  # torch threads (0 = leave as is)
    log_every: int = 20
    data: FusionDataConfig = field(default_factory=FusionDataConfig)
    teacher: FusionTeacherConfig = field(default_factory=FusionTeacherConfig)

    def validate(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay, grad_clip and warmup_steps must be >= 0")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"schedule must be cosine, step or constant, got '{self.schedule}'")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1")
        if not isinstance(self.model.get("name"), str):
            raise ConfigError("model.name is required (e.g. sgr or saf)")


def resolve_fusion_config(name: str) -> Path:
    """A path, or a bundled recipe name (``sgr`` → configs/fusion/sgr.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    stem = name if name.endswith(".yaml") else f"{name}.yaml"
    for base in (Path.cwd() / "configs" / "fusion", Path(__file__).resolve().parents[3] / "configs" / "fusion"):
        if (base / stem).is_file():
            return base / stem
    raise ConfigError(f"fusion config not found: {name} (a YAML path or one of sgr, saf, sgr_cusa, saf_cusa, rerank, rerank_cusa)")


def load_fusion_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FusionTrainConfig:
    """Defaults ← YAML ← ``--set key=value`` (``model.*`` keys go to the model's own options)."""
    from itrkit.config import load_config

    return load_config(FusionTrainConfig, path, overrides=overrides)


# --- data --------------------------------------------------------------------------------------------
class FusionSplit:
    """One split: grid rows per image, tokenised captions, ``txt2img``; teacher rows when attached."""

    def __init__(self, ds: Dataset, grid: Any, prepare_texts: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        from itrkit.teachers.grid import grid_shape, open_grid_store

        self.ds = ds
        self.grid = grid
        open_grid_store(grid.path, ds.image_ids, source=ds.name)  # one-line error naming a missing id
        self.grid_rows = grid.index_for(ds.image_ids)
        self.grid_shape = grid_shape(grid)
        self.txt2img = ds.txt2img
        enc = prepare_texts(ds.texts)
        self.tokens, self.lengths = enc["input_ids"], enc["lengths"].long()
        counts = np.array([len(r.captions) for r in ds.records])
        if (counts == 0).any():
            raise DataError(f"image '{ds.records[int(np.argmin(counts))].id}' of {ds.name} has no caption")
        self.n_captions = counts
        self.first_caption = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.teacher_image: tuple[Any, np.ndarray] | None = None
        self.teacher_text: tuple[Any, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def regions(self, img_idx: np.ndarray) -> torch.Tensor:
        r, c = self.grid_shape
        return self.grid.rows(self.grid_rows[np.asarray(img_idx)]).view(-1, r, c)

    def attach_teachers(self, image_store: Any, text_store: Any) -> None:
        self.teacher_image = (image_store, image_store.index_for(self.ds.image_ids))
        self.teacher_text = (text_store, text_store.index_for(self.ds.caption_ids))

    def epoch_captions(self, seed: int, epoch: int) -> np.ndarray:
        """One random caption per image for this epoch (seeded: resumed runs redraw the same)."""
        draw = np.random.default_rng([seed, epoch, 1]).random(len(self))
        return self.first_caption + np.minimum((draw * self.n_captions).astype(np.int64), self.n_captions - 1)

    def batch(self, img_idx: np.ndarray, cap_idx: np.ndarray) -> FusionBatch:
        b = FusionBatch(regions=self.regions(img_idx), tokens=self.tokens[cap_idx], lengths=self.lengths[cap_idx],
                        img_ids=torch.from_numpy(np.asarray(img_idx, dtype=np.int64)))
        if self.teacher_image is not None and self.teacher_text is not None:
            b.t_img = self.teacher_image[0].rows(self.teacher_image[1][img_idx])
            b.t_txt = self.teacher_text[0].rows(self.teacher_text[1][cap_idx])
        return b


def prepare_texts_of(model: FusionMatcher) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """The model's tokenizer: ``prepare_texts`` or its ``text_tower.prepare`` (RNN tower)."""
    fn = getattr(model, "prepare_texts", None)
    if fn is None and hasattr(model, "text_tower"):
        fn = model.text_tower.prepare
    if fn is None:
        raise ConfigError(f"{type(model).__name__} has no prepare_texts() nor text_tower to tokenise captions")
    return fn


@torch.no_grad()
def split_scores(model: FusionMatcher, split: FusionSplit, progress: bool = True, img_chunk: int = 100,
                 txt_chunk: int = 500) -> torch.Tensor:
    """The (images × captions) score matrix of a split; captions are scored in length order so each
    block is padded only to similar lengths, then put back in caption order."""
    order = torch.argsort(split.lengths, stable=True)
    regions = split.regions(np.arange(len(split)))
    s = model.score_all(regions, split.tokens[order], split.lengths[order], img_chunk=img_chunk,
                        txt_chunk=txt_chunk, progress=progress)
    out = torch.empty_like(s)
    out[:, order] = s
    return out


def split_metrics(model: FusionMatcher, split: FusionSplit, progress: bool = True) -> tuple[dict[str, float],
                                                                                        torch.Tensor | None]:
    """SPEC §4 metrics of a split, and its full score matrix when the model scores every pair.

    A re-ranker (a model with ``evaluate_both``: dual encoder + ITM head) is evaluated by its own
    protocol instead: embeddings rank the whole gallery, the ITM head re-scores each query's top
    ``rerank_k``; the dual encoder's own metrics come along as ``itc_*`` keys.
    """
    both = getattr(model, "evaluate_both", None)
    if callable(both):
        regions = split.regions(np.arange(len(split)))
        r = both(regions, split.tokens, split.lengths, split.txt2img, progress=progress)
        return {**r["rerank"], **{f"itc_{k}": v for k, v in r["itc"].items()}}, None
    scores = split_scores(model, split, progress=progress)
    return metrics_from_scores(scores, split.txt2img), scores


def _param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], dict[int, str]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "tau" not in n]
    other = [p for n, p in named if not (p.ndim >= 2 and "tau" not in n)]
    return ([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
            {id(p): n for n, p in named})


def lr_at(cfg: FusionTrainConfig, step: int, epoch: int, total: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * (0.1 if cfg.lr_decay_epoch and epoch >= cfg.lr_decay_epoch else 1.0)
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _loss_terms(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    terms = {k: v for k, v in out.items() if k.endswith("_loss")}
    if not terms:
        raise ConfigError("the fusion model's forward returned no '*_loss' term")
    return terms


# --- model folders -----------------------------------------------------------------------------------
def save_fusion_model(model: FusionMatcher, spec: dict[str, Any], folder: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "model.json", {"format": FUSION_MODEL_FORMAT, "model": spec, **(extra or {})})
    return folder


def load_fusion_model(path: str | Path) -> tuple[FusionMatcher, dict[str, Any]]:
    """A fusion model from a model folder or a run folder holding ``model/`` → (model in eval mode, model.json)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if (path / "model.json").is_file() else path / "model"
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise CheckpointError(f"no trained fusion model at {path} (expected model.json or model/model.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path}: not valid JSON") from None
    if meta.get("format") != FUSION_MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown model format {meta.get('format')!r} (expected {FUSION_MODEL_FORMAT})")
    model = build_fusion_model(meta["model"])
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e.__class__.__name__})") from None
    own = model.state_dict()
    if set(state) != set(own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise CheckpointError(f"{weights}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


# --- trainer -----------------------------------------------------------------------------------------
class FusionTrainer:
    def __init__(self, cfg: FusionTrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.resume = resume
        self.progress = progress
        torch.use_deterministic_algorithms(True, warn_only=True)
        if resume and not (self.run_dir / "config.yaml").is_file():
            raise ItrkitError(f"--resume: no run to resume at {self.run_dir} (config.yaml missing)")
        if not resume and ((self.run_dir / "config.yaml").exists() or (self.run_dir / "checkpoints").exists()):
            raise ItrkitError(f"{self.run_dir} already holds a run (use --resume to continue it, or another --out)")
        if not cfg.data.path:
            raise ConfigError("data.path is empty: point it at a prepared dataset folder")
        if not cfg.data.grid_store:
            raise ConfigError("data.grid_store is empty: build one with 'itrkit grid DATA --out grid.store'")

    def log(self, **record: Any) -> None:
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def _split(self, name: str, limit: int) -> Dataset:
        return self.dataset.split(name).subset(limit or None)

    def _build(self) -> None:
        from itrkit.teachers.grid import grid_shape, open_grid_store

        cfg = self.cfg
        self.dataset = Dataset.load(cfg.data.path)
        self.grid = open_grid_store(cfg.data.grid_store)
        spec = dict(cfg.model)
        spec.setdefault("region_dim", grid_shape(self.grid)[1])
        self.spec = spec
        torch.manual_seed(cfg.seed)
        self.model = build_fusion_model(spec)
        prep = prepare_texts_of(self.model)
        self.train = FusionSplit(self._split(cfg.data.train_split, cfg.data.max_train_images), self.grid, prep)
        self.val = FusionSplit(self._split(cfg.data.val_split, cfg.data.max_val_images), self.grid, prep)
        if len(self.train) < cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(self.train)} training images")
        tc = cfg.teacher
        if tc.image_store or tc.text_store:
            from itrkit.teachers.store import FeatureStore

            if not (tc.image_store and tc.text_store):
                raise ConfigError("teacher.image_store and teacher.text_store must be given together")
            img = FeatureStore.open(tc.image_store, expect_kind="image", expect_ids=self.train.ds.image_ids,
                                    dataset=None)
            txt = FeatureStore.open(tc.text_store, expect_kind="text", expect_ids=self.train.ds.caption_ids)
            self.train.attach_teachers(img, txt)
        groups, self.opt_names = _param_groups(self.model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.params = [p for g in groups for p in g["params"]]

    def num_batches(self) -> int:
        full, rest = divmod(len(self.train), self.cfg.batch_size)
        return full + (1 if rest >= 2 else 0)  # a last batch of one image has no negatives

    # --- state -----------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        st = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        for p in self.params:
            for k, v in self.optimizer.state.get(p, {}).items():
                st[f"optim.{self.opt_names[id(p)]}.{k}"] = torch.as_tensor(v).detach().clone()
        st["rng.torch"] = torch.get_rng_state()
        return st

    def _load_state(self, st: dict[str, torch.Tensor]) -> None:
        mod = {k[len("model."):]: v for k, v in st.items() if k.startswith("model.")}
        own = self.model.state_dict()
        if set(mod) != set(own):
            missing, unexpected = sorted(set(own) - set(mod)), sorted(set(mod) - set(own))
            raise CheckpointError(f"checkpoint in {self.run_dir} does not fit this config "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model.load_state_dict(mod, strict=True)
        for p in self.params:
            prefix = f"optim.{self.opt_names[id(p)]}."
            keys = {k[len(prefix):]: v.clone() for k, v in st.items()
                    if k.startswith(prefix) and "." not in k[len(prefix):]}
            if keys:
                self.optimizer.state[p] = keys
        if "rng.torch" in st:
            torch.set_rng_state(st["rng.torch"])

    def _checkpoint(self, epoch: int, batch: int, step: int) -> None:
        save_checkpoint(self.run_dir, self._state(), {"step": step, "epoch": epoch, "batch": batch, "best": self.best,
                                                      "history": self.history, "timing": self.timing,
                                                      "config": to_dict(self.cfg)})

    # --- main loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)  # a library call leaves the process as it found it

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._build()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.best: dict[str, Any] = {"metric": None, "epoch": None, "step": None}
        self.history: list[dict[str, Any]] = []
        self.timing: dict[str, Any] = {"epoch_s": [], "val_s": []}
        start = {"epoch": 0, "batch": 0, "step": 0}
        ckpt = load_latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is not None:
            self._load_state(ckpt[0])
            meta = ckpt[1]
            start = {k: int(meta[k]) for k in ("epoch", "batch", "step")}
            self.best, self.history, self.timing = meta["best"], meta["history"], meta.get("timing", self.timing)
        elif self.resume:
            print(f"note: no checkpoint in {self.run_dir}/checkpoints yet: starting from the beginning", file=sys.stderr)
        step = start["step"]
        nb = self.num_batches()
        total = cfg.epochs * nb
        B = cfg.batch_size
        for epoch in range(start["epoch"], cfg.epochs):
            t0 = time.perf_counter()
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(self.train))
            caps = self.train.epoch_captions(cfg.seed, epoch)
            first_b = start["batch"] if epoch == start["epoch"] else 0
            self.model.train()
            set_epoch = getattr(self.model, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            bar = tqdm(range(first_b, nb), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=None if self.progress else True, dynamic_ncols=True)
            for b in bar:
                idx = order[b * B:(b + 1) * B]
                lr = lr_at(cfg, step, epoch, total)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                out = self.model(self.train.batch(idx, caps[idx]))
                terms = _loss_terms(out)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    vals = {k: float(v.detach()) for k, v in terms.items()}
                    raise NonFiniteLossError(f"non-finite loss at step {step + 1} (epoch {epoch + 1}, batch {b}): "
                                             f"terms {vals}; last good checkpoint kept in {self.run_dir / 'checkpoints'}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                clamp = getattr(self.model, "clamp_temperatures_", None)
                if callable(clamp):
                    clamp()
                step += 1
                if step % cfg.log_every == 0 or b == nb - 1:
                    self.log(step=step, epoch=epoch + 1, lr=lr, loss=float(loss.detach()),
                             **{k: round(float(v.detach()), 6) for k, v in out.items()})
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < nb:
                    self._checkpoint(epoch, b + 1, step)
            bar.close()
            self.timing["epoch_s"].append(round(time.perf_counter() - t0, 2))
            self._end_epoch(epoch, step)
            self._checkpoint(epoch + 1, 0, step)
        return self._finish(step)

    def _end_epoch(self, epoch: int, step: int) -> None:
        cfg = self.cfg
        if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
            return
        t0 = time.perf_counter()
        metrics, _ = split_metrics(self.model, self.val, progress=self.progress)
        self.timing["val_s"].append(round(time.perf_counter() - t0, 2))
        if cfg.select_metric not in metrics:
            raise ConfigError(f"select_metric '{cfg.select_metric}' is not a metric (e.g. rsum, i2t_R@1)")
        value = metrics[cfg.select_metric]
        temps = self.model.temperatures() if callable(getattr(self.model, "temperatures", None)) else {}
        rec = {"epoch": epoch + 1, "step": step, "val": metrics, **temps}
        self.history.append(rec)
        self.log(event="val", **rec)
        if self.best["metric"] is None or value > self.best["metric"]:
            self.best = {"metric": value, "epoch": epoch + 1, "step": step}
            save_fusion_model(self.model, self.spec, self.run_dir / "model", extra={"selected": self.best})
        if self.progress:
            print(f"[epoch {epoch + 1}/{cfg.epochs}] val {cfg.select_metric} {value:.2f} "
                  f"(best {self.best['metric']:.2f} @ {self.best['epoch']})", file=sys.stderr)

    def _finish(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        model, _ = load_fusion_model(self.run_dir)
        out: dict[str, Any] = {"best": self.best, "steps": step, "val": None, "test": None}
        sel = [h for h in self.history if h["step"] == self.best["step"]]
        out["val"] = sel[-1]["val"] if sel else None
        if cfg.data.test_split:
            try:
                test_ds = self._split(cfg.data.test_split, cfg.data.max_test_images)
            except DataError:
                test_ds = None
            if test_ds is not None:
                t0 = time.perf_counter()
                test = FusionSplit(test_ds, self.grid, prepare_texts_of(model))
                out["test"], scores = split_metrics(model, test, progress=self.progress)
                self.timing["test_s"] = round(time.perf_counter() - t0, 2)
                if scores is not None:  # kept for ensembles (SGRAF = mean of SGR's and SAF's scores)
                    save_scores(scores, self.run_dir / f"scores_{cfg.data.test_split}.safetensors", test_ds,
                                cfg.data.test_split, cfg.data.grid_store)
        out["history"] = self.history
        out["timing"] = self.timing
        atomic_write_json(self.run_dir / "metrics.json", out)
        return out


def train_fusion(cfg: FusionTrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, select on validation RSUM, evaluate the selected model on test; returns ``metrics.json``."""
    return FusionTrainer(cfg, resume=resume, progress=progress).fit()


# --- score matrices and ensembles ---------------------------------------------------------------------
def _scores_meta(ds: Dataset, split: str, grid_store: str) -> dict[str, str]:
    return {"dataset": ds.fingerprint(), "split": split, "images": str(len(ds)), "grid_store": str(Path(grid_store).resolve())}


def save_scores(scores: torch.Tensor, path: Path, ds: Dataset, split: str, grid_store: str) -> None:
    from itrkit.models.io import save_state_file

    save_state_file({"scores": scores.float()}, path, metadata=_scores_meta(ds, split, grid_store))


def load_scores(path: Path, ds: Dataset, split: str, grid_store: str) -> torch.Tensor | None:
    """A saved score matrix if it was computed for exactly this data, split and grid store."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != _scores_meta(ds, split, grid_store):
                return None
            return f.get_tensor("scores")
    except Exception:  # a damaged cache is recomputed, never trusted
        return None


def _run_inputs(run: Path, data: str | Path | None, split: str, grid_store: str | None,
                max_images: int) -> tuple[Dataset, str]:
    from itrkit.config import load_yaml

    cfg = from_dict(FusionTrainConfig, load_yaml(run / "config.yaml")) if (run / "config.yaml").is_file() else None
    data = data or (cfg.data.path if cfg else None)
    grid_store = grid_store or (cfg.data.grid_store if cfg else None)
    if not data or not grid_store:
        raise ConfigError(f"{run}: give --data and --grid (the run has no config.yaml naming them)")
    return Dataset.load(data).split(split).subset(max_images or None), str(grid_store)


def _open_split(model: FusionMatcher, ds: Dataset, grid_store: str) -> FusionSplit:
    from itrkit.teachers.grid import open_grid_store

    return FusionSplit(ds, open_grid_store(grid_store, ds.image_ids, source=ds.name), prepare_texts_of(model))


def run_scores(run: str | Path, data: str | Path | None = None, split: str = "test", grid_store: str | None = None,
               max_images: int = 0, progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """The (images × captions) scores of a trained run's selected model on a split (cached in the run)."""
    run = Path(run)
    ds, grid_store = _run_inputs(run, data, split, grid_store, max_images)
    path = run / f"scores_{split}.safetensors"
    cached = load_scores(path, ds, split, grid_store)
    if cached is not None:
        return cached, ds.txt2img
    model, _ = load_fusion_model(run)
    if callable(getattr(model, "evaluate_both", None)):
        raise ConfigError(f"{run}: a re-ranker has no full score matrix to ensemble; evaluate it alone")
    s = split_scores(model, _open_split(model, ds, grid_store), progress=progress)
    save_scores(s, path, ds, split, grid_store)
    return s, ds.txt2img


def evaluate_fusion_runs(runs: list[str | Path], data: str | Path | None = None, split: str = "test",
                         grid_store: str | None = None, max_images: int = 0, progress: bool = True,
                         rerank_k: int | None = None) -> dict[str, float]:
    """SPEC §4 metrics of one run, or of the mean score matrix of several (SGRAF = SGR + SAF).

    A re-ranker run is evaluated alone by its protocol (``rerank_k``: candidates re-scored per
    query, default the run's own; 0 = its dual encoder alone), with the ``itc_*`` metrics beside.
    """
    from itrkit.models.sgraf import ensemble_scores

    if not runs:
        raise ConfigError("eval-fusion needs at least one run folder")
    if len(runs) == 1:
        model, _ = load_fusion_model(Path(runs[0]))
        if callable(getattr(model, "evaluate_both", None)):
            ds, grid = _run_inputs(Path(runs[0]), data, split, grid_store, max_images)
            if rerank_k is not None:
                model.rerank_k = int(rerank_k)
            return split_metrics(model, _open_split(model, ds, grid), progress=progress)[0]
    mats, t2i = [], None
    for r in runs:
        s, t2i = run_scores(r, data, split, grid_store, max_images, progress)
        mats.append(s)
    return metrics_from_scores(ensemble_scores(*mats), t2i)


# --- CLI ----------------------------------------------------------------------------------------------
def _cmd_train_fusion(a: argparse.Namespace) -> int:
    from itrkit.config import load_yaml

    overrides = list(a.set or [])
    if a.data:
        overrides.append(f"data.path={a.data}")
    if a.out:
        overrides.append(f"out={a.out}")
    if a.resume and a.out and (Path(a.out) / "config.yaml").is_file():
        from itrkit.config import _deep_update, apply_overrides

        data = to_dict(FusionTrainConfig())
        _deep_update(data, load_yaml(Path(a.out) / "config.yaml"))
        cfg = from_dict(FusionTrainConfig, apply_overrides(data, overrides))
    else:
        cfg = load_fusion_config(resolve_fusion_config(a.config), overrides)
    from itrkit.eval.table import print_run_summary

    print_run_summary(train_fusion(cfg, resume=a.resume, progress=not a.quiet), cfg.out)
    return 0


def _cmd_eval_fusion(a: argparse.Namespace) -> int:
    from itrkit.eval.table import format_table

    metrics = evaluate_fusion_runs(a.runs, data=a.data, split=a.split, grid_store=a.grid, max_images=a.max_images,
                                   progress=not a.quiet, rerank_k=a.rerank_k)
    name = " + ".join(Path(r).name for r in a.runs)
    print(format_table({f"{name} ({a.split})": metrics}))
    out = Path(a.json) if a.json else Path(a.runs[0]) / (f"eval_fusion_{a.split}" + ("_ensemble" if len(a.runs) > 1 else "") + ".json")
    atomic_write_json(out, {"runs": [str(r) for r in a.runs], "split": a.split, **metrics})
    print(f"metrics written to {out}")
    return 0


def add_parsers(sub: Any) -> None:
    t = sub.add_parser("train-fusion", help="train a fusion matcher (SGR, SAF, re-ranker) on grid features")
    t.add_argument("config", help="YAML file or bundled config name (sgr, saf, sgr_cusa, saf_cusa, rerank, rerank_cusa)")
    t.add_argument("--data", help="prepared dataset folder (= --set data.path=...)")
    t.add_argument("--out", help="run folder (= --set out=...)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train_fusion)

    e = sub.add_parser("eval-fusion", help="evaluate fusion runs; several runs = ensemble (SGRAF = SGR + SAF)")
    e.add_argument("runs", nargs="+", help="run folder(s); scores of several runs are averaged")
    e.add_argument("--data", help="dataset folder (default: the run's)")
    e.add_argument("--split", default="test")
    e.add_argument("--grid", default=None, help="grid store (default: the run's)")
    e.add_argument("--max-images", type=int, default=0, help="only the first N images of the split")
    e.add_argument("--json", default=None, help="where to write the metrics JSON")
    e.add_argument("--rerank-k", type=int, default=None,
                   help="re-ranker runs: candidates re-scored per query (default: the run's; 0 = dual encoder only)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval_fusion)
