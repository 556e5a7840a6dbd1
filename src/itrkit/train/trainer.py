"""The one training loop (open_clip's ``train_one_epoch`` over ``TrainingTask``s): stages of AdamW
+ warm-up and cosine / step / constant schedules, gradient clipping, validation-only model
selection in the evaluator's direction, exact resume, NaN guard, clean Ctrl-C, bf16 / fp16 (with a
checkpointed gradient scaler), data workers and DDP under ``torchrun`` — for every model family
(:mod:`itrkit.train.tasks`); ``chunk_size`` trains a dual encoder's large batches in chunks with
GradCache (:mod:`itrkit.train.gradcache`).

``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) is resolved before anything is
written; the model and the loss modules (their temperatures, the instance classifier) live there,
and each batch (inputs, ids, labels, teacher rows) is moved there before the forward: pinned host
memory and non-blocking copies on CUDA. Under ``torchrun`` each rank takes ``cuda:LOCAL_RANK`` and
NCCL, or gloo on the CPU. Evaluation embeds on the device and returns the embeddings to the CPU.

A run folder holds ``config.yaml`` (resolved), ``train.log`` (JSON lines), ``checkpoints/``
(resumable state), ``model/`` (the model picked on validation), ``metrics.json`` (deterministic),
``timing.json`` (seconds per epoch, validation, test) and the test split's embeddings (dual
encoders) or score matrix (fusion matchers).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from itrkit.config import save_config, to_dict
from itrkit.data.records import Dataset
from itrkit.errors import ConfigError, ItrkitError, NonFiniteLossError
from itrkit.eval.evaluators import is_improvement
from itrkit.train.checkpoint import load_latest_checkpoint, save_checkpoint
from itrkit.train.config import StageConfig, TrainConfig
from itrkit.train.gradcache import GradCache, check_supported
from itrkit.train.reporters import Reporters, check_available
from itrkit.train.tasks import TrainingTask, build_task
from itrkit.utils.device import every_rank, init_distributed, move_to, resolve_device
from itrkit.utils.io import atomic_write_json
from itrkit.utils.lock import RunLock
from itrkit.utils.progress import progress as progress_bar

# fp16's dynamic loss scale (torch.amp.GradScaler's defaults; module constants so tests can make the
# scale move within a few steps)
FP16_INIT_SCALE = 2.0 ** 16
FP16_GROWTH_INTERVAL = 2000


class Interrupted(ItrkitError):
    """Ctrl-C: the run saved a checkpoint and stopped; ``--resume`` continues it."""


class TrainModule(nn.Module):
    """Model + loss in one module so DDP sees every trainable parameter; the task turns the
    model's outputs into ``*_loss`` terms."""

    def __init__(self, task: TrainingTask, gather: bool, precision: str = "fp32", compile: bool = False) -> None:
        super().__init__()
        self.model = task.model
        self.loss = task.loss
        self.task = task
        self.gather = gather
        self.bf16 = precision == "bf16"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # The compiled forward is kept outside the module tree: parameter names and checkpoints stay those
        # of the plain model.
        self._forward_model: list[Any] = [torch.compile(self.model) if compile else self.model]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.losses(self.encode(batch), batch)

    def encode(self, batch: Any) -> dict[str, torch.Tensor]:
        """The model's outputs (under autocast), half precision raised to float32."""
        device = next(self.model.parameters()).device.type
        dtype = self.autocast_dtype or torch.bfloat16
        with torch.autocast(device_type=device, dtype=dtype, enabled=self.autocast_dtype is not None):
            out = self._forward_model[0](batch)
        # Losses in float32: bf16 keeps 8 mantissa bits (fp16 10, with a 65504 ceiling), too few for
        # log-softmax over a batch and for soft labels that differ in the third decimal.
        return {k: _at_least_float32(v) for k, v in out.items()}

    def losses(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """Outputs → ``*_loss`` terms over the (gathered) batch."""
        device = next(self.model.parameters()).device.type
        dtype = self.autocast_dtype or torch.bfloat16
        if self.gather:
            # Losses over the global batch: features gathered with gradient (open_clip semantics).
            out, batch = self.task.gather(out, batch)
        # What needs the whole (gathered) batch, e.g. a fusion matcher's B×B scores.
        with torch.autocast(device_type=device, dtype=dtype, enabled=self.autocast_dtype is not None):
            out = self.task.after_gather(out)
        out = {k: _at_least_float32(v) for k, v in out.items()}
        return self.task.compute(out, batch)


def _at_least_float32(v: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 (the gradient-equivalence tests run the whole step in float64).
    return v.float() if torch.is_floating_point(v) and v.dtype != torch.float64 else v


def _param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float,
                  tower_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: decay only matrices (Linear weights, classifier), never biases, norms or
    temperatures. With ``tower_lr_scale`` ≠ 1 the pretrained tower blocks (top:N / all) get groups
    of their own that learn at ``lr × scale``; at 1 the two groups (and parameter order) are as always."""
    def split(part: list[tuple[str, nn.Parameter]], scale: float) -> list[dict[str, Any]]:
        decay = [p for n, p in part if p.ndim >= 2 and "tau" not in n]
        other = [p for n, p in part if not (p.ndim >= 2 and "tau" not in n)]
        return [{"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
                {"params": other, "weight_decay": 0.0, "lr_scale": scale}]

    if tower_lr_scale == 1.0:
        return split(named, 1.0)
    is_tower = [".image_tower." in f".{n}" or ".text_tower." in f".{n}" for n, _ in named]
    towers = [x for x, t in zip(named, is_tower) if t]
    return split([x for x, t in zip(named, is_tower) if not t], 1.0) + (split(towers, tower_lr_scale) if towers else [])


def make_adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel where this torch has one for the parameters' device (CPU from
    torch 2.4, CUDA, MPS), else the multi-tensor ``foreach`` kernel.

    The same update rule either way; the per-parameter Python loop torch defaults to on CPU was
    ~45 % of a cached-feature step (benchmarks/bench_loss_step.py: trunk recipe 70 → 39 ms).
    """
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch or a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def lr_at(stage: StageConfig, step: int, epoch: int, total: int) -> float:
    """Learning rate at ``step`` (0-based, within the stage) of ``total``: linear warm-up, then
    cosine to 0, constant, or step (× 0.1 from ``lr_decay_epoch``, SGRAF practice)."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if stage.schedule == "constant" or total <= stage.warmup_steps:
        return stage.lr
    if stage.schedule == "step":
        return stage.lr * (0.1 if stage.lr_decay_epoch and epoch >= stage.lr_decay_epoch else 1.0)
    t = (step - stage.warmup_steps) / max(1, total - stage.warmup_steps)
    return stage.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Trainer:
    def __init__(self, cfg: TrainConfig, dataset: Dataset | None = None, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.resume = resume
        self.progress = progress
        self._stop = 0
        self._lock: RunLock | None = None
        # The device first (a bad one is one line, nothing written), then the process group: NCCL
        # needs this rank's GPU made current before it starts.
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            # Deterministic cuBLAS (set before its first handle), so a resumed CUDA run stays exact.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.rank, self.world = init_distributed(self.device)
        check_available(cfg.report_to)  # a missing tensorboard is one line, before anything is written
        self.reporters = Reporters(cfg.report_to if self.rank == 0 else [], self.run_dir)
        self.step = 0
        torch.use_deterministic_algorithms(True, warn_only=True)
        if dataset is None:
            if not cfg.data.path:
                raise ConfigError("data.path is empty: point it at a prepared dataset folder")
            dataset = Dataset.load(cfg.data.path)
        self.dataset = dataset
        cfg_path = self.run_dir / "config.yaml"
        problem = ""
        if self.resume:
            if not cfg_path.is_file():
                problem = f"--resume: no run to resume at {self.run_dir} (config.yaml missing)"
        elif cfg_path.exists() or (self.run_dir / "checkpoints").exists():
            problem = f"{self.run_dir} already holds a run (use --resume to continue it, or another --out)"
        if self.world > 1:
            # Every rank must look before rank 0 writes config.yaml, or a late rank sees the new run
            # as an old one; the all-reduce is that barrier and makes all ranks agree.
            flag = torch.tensor([1 if problem else 0], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not problem:
                problem = f"{self.run_dir}: refused on another rank"
        if problem:
            raise ItrkitError(problem)

    # --- setup -------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        # Only once the config, data, teachers and model are known to be good: a refused run
        # leaves no folder behind.
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # One process per run folder: a second `train`, or `--resume` while the first still runs, is
            # refused here naming the holder's pid; a SIGKILLed holder's lock is taken over with a note.
            self._lock = RunLock(self.run_dir).acquire()
            if not self.resume and (self.run_dir / "config.yaml").exists():  # a twin started at the same moment
                raise ItrkitError(f"{self.run_dir} already holds a run (use --resume to continue it, or another --out)")
            save_config(self.cfg, self.run_dir / "config.yaml")

    def log(self, **record: Any) -> None:
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.reporters.write(record)  # report_to: metrics.csv, TensorBoard

    def _build(self) -> None:
        cfg = self.cfg
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {self.world} ranks")
        with every_rank():  # every rank builds the task: tower-feature caches shard over the ranks
            self.task = build_task(cfg, self.dataset, self.world, self.device)
        self.model = self.task.model
        self.module = TrainModule(self.task, gather=self.world > 1 and cfg.loss.gather == "global",
                                  precision=cfg.precision, compile=cfg.compile)
        # Model and loss modules (temperatures, the instance classifier) on the device; a no-op on the CPU.
        self.module.to(self.device)
        # GradCache: the batch's embeddings in chunks of chunk_size rows, the loss over the whole batch.
        self.gradcache: GradCache | None = None
        if cfg.chunk_size:
            check_supported(self.model)
            self.gradcache = GradCache(self.module, cfg.chunk_size, self.world, params=lambda: self.params)
        self.scaler: torch.amp.GradScaler | None = None
        if cfg.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=FP16_INIT_SCALE,
                                               growth_interval=FP16_GROWTH_INTERVAL)
        # What each stage starts from: tower trainability from the model config, learnable temperatures.
        self.base_trainable = {n: p.requires_grad for n, p in self.module.named_parameters()}

    def _apply_stage(self, stage: StageConfig) -> None:
        for n, p in self.module.named_parameters():
            p.requires_grad_(self.base_trainable[n])
        parts = self.task.freeze_parts()
        for part in stage.freeze:
            if part not in parts:
                raise ConfigError(f"stage '{stage.name}': a {self.task.family} has no part '{part}' to freeze "
                                  f"(known: {', '.join(parts)})")
            for mod in parts[part]:
                for p in mod.parameters():
                    p.requires_grad_(False)
        self.task.set_weights(self.cfg.weights(stage))
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(f"stage '{stage.name}' has nothing to train (every part is frozen)")
        self.optimizer = make_adamw(_param_groups(named, stage.weight_decay, stage.tower_lr_scale), lr=stage.lr)
        self.opt_names = {id(p): n for n, p in named}
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=ids, find_unused_parameters=True)
        else:
            self.ddp = self.module

    # --- state ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        st = {f"module.{k}": v for k, v in self.task.model_state().items()}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for k, v in self.optimizer.state.get(p, {}).items():
                    st[f"optim.{self.opt_names[id(p)]}.{k}"] = torch.as_tensor(v).detach().clone()
        st["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            st["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            # The dynamic loss scale and its growth counter: a resumed fp16 run skips and grows its
            # steps exactly where the uninterrupted one does.
            sd = self.scaler.state_dict()
            st["scaler.scale"] = torch.tensor(float(sd["scale"]), dtype=torch.float64)
            st["scaler.growth_tracker"] = torch.tensor(int(sd["_growth_tracker"]), dtype=torch.int64)
        return st

    def _load_state(self, st: dict[str, torch.Tensor], with_optimizer: bool = True) -> None:
        self.task.load_model_state({k[len("module."):]: v for k, v in st.items() if k.startswith("module.")})
        for group in self.optimizer.param_groups if with_optimizer else []:
            for p in group["params"]:
                prefix = f"optim.{self.opt_names[id(p)]}."
                keys = {k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
                if keys:
                    # Adam's moments live with their parameter; its step counter stays where torch keeps it.
                    self.optimizer.state[p] = {k: v.clone() if k == "step" else v.to(p.device, copy=True)
                                             for k, v in keys.items()}
        if "rng.torch" in st:
            torch.set_rng_state(st["rng.torch"])
        if "rng.cuda" in st and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["rng.cuda"], self.device)
        if self.scaler is not None:
            if "scaler.scale" not in st:
                raise ItrkitError("checkpoint has no fp16 gradient-scaler state (it was written by a run with "
                                  "another precision); resume with the run's own precision")
            sd = self.scaler.state_dict()
            sd["scale"] = float(st["scaler.scale"])
            sd["_growth_tracker"] = int(st["scaler.growth_tracker"])
            self.scaler.load_state_dict(sd)

    def _checkpoint(self, stage_i: int, epoch: int, batch_i: int, step: int) -> None:
        if self.rank == 0:
            save_checkpoint(self.run_dir, self._state(), {
                "step": step, "stage": stage_i, "epoch": epoch, "batch": batch_i, "best": self.best,
                "history": self.history, "timing": self.timing, "config": to_dict(self.cfg)})
        if self.world > 1:
            dist.barrier()

    # --- main loop -------------------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._stop += 1
        if self._stop >= 2:
            raise KeyboardInterrupt
        print("\ninterrupt: finishing this step, saving a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    def fit(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if self.device.type == "cuda":
            # TF32 only when asked: off, CUDA matmuls and convolutions are exact float32 as on the CPU.
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(self.cfg.tf32)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(threads)  # a library call leaves the process as it found it
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            self.reporters.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _fit(self) -> dict[str, Any]:
        self._build()
        self._prepare_run_dir()
        self.best: dict[str, Any] = {"metric": None, "stage": None, "epoch": None, "step": None}
        self.history: list[dict[str, Any]] = []
        self.timing: dict[str, Any] = {"epoch_s": [], "val_s": []}
        start = {"stage": 0, "epoch": 0, "batch": 0, "step": 0}
        ckpt = load_latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and ckpt is None:
            print(f"note: no checkpoint in {self.run_dir}/checkpoints yet: starting from the beginning", file=sys.stderr)
        old_handler = signal.signal(signal.SIGINT, self._on_sigint) if self.rank == 0 else None
        try:
            step = self._run_stages(ckpt, start)
        except BaseException as e:
            self._log_stop(e)
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        return self._finish(step)

    def _log_stop(self, e: BaseException) -> None:
        """The last ``train.log`` record says why the run stopped (``itrkit runs`` shows it)."""
        if self.rank != 0:
            return
        event = "interrupted" if isinstance(e, Interrupted | KeyboardInterrupt) else "failed"
        try:
            self.log(event=event, step=self.step, error=(str(e).splitlines() or [type(e).__name__])[0])
        except Exception:  # a full disk must not hide the original error
            pass

    def _run_stages(self, ckpt: tuple[dict, dict] | None, start: dict[str, int]) -> int:
        cfg = self.cfg
        if ckpt is not None:
            meta = ckpt[1]
            start = {k: int(meta[k]) for k in ("stage", "epoch", "batch", "step")}
            self.best, self.history = meta["best"], meta["history"]
            self.timing = meta.get("timing", self.timing)
        step = self.step = start["step"]
        per_rank = cfg.batch_size // self.world
        nb = self.task.num_batches()
        for si, stage in enumerate(cfg.stages):
            if si < start["stage"]:
                continue
            self._apply_stage(stage)
            if ckpt is not None and si == start["stage"]:
                # At a stage boundary the next stage starts with a fresh optimizer, as uninterrupted.
                self._load_state(ckpt[0], with_optimizer=not (start["epoch"] == 0 and start["batch"] == 0))
                ckpt = None
            total = stage.epochs * nb
            first_epoch = start["epoch"] if si == start["stage"] else 0
            for epoch in range(first_epoch, stage.epochs):
                t0 = time.perf_counter()
                all_idxs = self.task.epoch_batches(si, epoch)
                self.task.start_epoch(si, epoch)
                first_b = start["batch"] if (si == start["stage"] and epoch == start["epoch"]) else 0
                # A bar on a terminal; in a log a line every ITRKIT_PROGRESS_SECONDS, no carriage-return frames.
                what = f"training stage '{stage.name}' of the {self.task.family}, {stage.epochs} epochs" \
                    if epoch == first_epoch else None
                bar = progress_bar(range(first_b, nb), desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
                                   unit="batch", what=what, cached_at=self.run_dir, where_label="run folder",
                                   enabled=self.progress and self.rank == 0)
                idxs = all_idxs[first_b:]
                if self.world > 1:
                    idxs = [idx[self.rank * per_rank:(self.rank + 1) * per_rank] for idx in idxs]
                batches = self.task.iterate(idxs, cfg.data.num_workers)
                for b, idx, batch in zip(bar, idxs, batches):
                    lr = lr_at(stage, epoch * nb + b, epoch, total)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr * g.get("lr_scale", 1.0)
                    batch = move_to(batch, self.device, non_blocking=True)
                    backward = None
                    if self.gradcache is not None:
                        out, backward = self.gradcache.forward(batch)
                    else:
                        out = self.ddp(batch)
                    losses = {k: v for k, v in out.items() if k.endswith("_loss")}
                    if not losses:
                        raise ConfigError("the training task's forward returned no '*_loss' term")
                    loss = sum(losses.values())
                    if not torch.isfinite(loss):
                        terms = {k: float(v.detach()) for k, v in losses.items()}
                        raise NonFiniteLossError(
                            f"non-finite loss at step {step + 1} (stage {stage.name}, epoch {epoch + 1}, batch {b}): "
                            f"terms {terms}; {self.task.describe_batch(idx)}; last good checkpoint kept in {self.run_dir / 'checkpoints'}")
                    self._backward_step(loss) if backward is None else self._backward_step(loss, backward)
                    self.task.clamp_temperatures_()
                    step += 1
                    self.step = step
                    if step % cfg.log_every == 0 or b == nb - 1:
                        self.log(step=step, stage=stage.name, epoch=epoch + 1, lr=lr, loss=float(loss.detach()),
                                 **{k: round(float(v.detach()), 6) for k, v in out.items() if v.numel() == 1},
                                 **self.task.temperatures())
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                    if self._stop:
                        self._checkpoint(si, epoch, b + 1, step)
                        raise Interrupted(f"interrupted at step {step}: checkpoint saved; continue with --resume --out {self.run_dir}")
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and b + 1 < nb:
                        self._checkpoint(si, epoch, b + 1, step)
                bar.close()
                self.timing["epoch_s"].append(round(time.perf_counter() - t0, 2))
                self._end_epoch(si, stage, epoch, step)
                self._checkpoint(si, epoch + 1, 0, step) if epoch + 1 < stage.epochs else \
                    self._checkpoint(si + 1, 0, 0, step)
        return step

    def _backward_step(self, loss: torch.Tensor, backward: Callable[[torch.Tensor], None] | None = None) -> None:
        """Backward (``backward``: GradCache's chunked one), clip and optimizer step; with fp16
        through the gradient scaler (a step whose scaled gradients overflowed is skipped and the
        scale halves)."""
        self.optimizer.zero_grad(set_to_none=True)
        backward = backward or torch.Tensor.backward
        if self.scaler is None:
            backward(loss)
            if self.cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.optimizer.step()
            return
        backward(self.scaler.scale(loss))
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _end_epoch(self, si: int, stage: StageConfig, epoch: int, step: int) -> None:
        last = epoch + 1 == stage.epochs
        if (epoch + 1) % self.cfg.eval_every and not last:
            return
        if self.rank == 0:
            t0 = time.perf_counter()
            ev = self.task.evaluator
            metrics = ev(self.model)
            self.timing["val_s"].append(round(time.perf_counter() - t0, 2))
            metric = ev.primary_metric
            if metric not in metrics:
                raise ConfigError(f"select_metric '{metric}' is not a metric (e.g. rsum, i2t_R@1, t2i_medr)")
            value = metrics[metric]
            rec = {"stage": stage.name, "epoch": epoch + 1, "step": step, "val": metrics, **self.task.temperatures()}
            self.history.append(rec)
            self.log(event="val", **rec)
            if is_improvement(value, self.best["metric"], metric):
                self.best = {"metric": value, "stage": stage.name, "epoch": epoch + 1, "step": step}
                self.task.save_model(self.run_dir / "model", extra={"selected": self.best})
            if self.progress:
                print(f"[{stage.name} {epoch + 1}/{stage.epochs}] val {metric} {value:.2f} "
                      f"(best {self.best['metric']:.2f} @ {self.best['stage']}:{self.best['epoch']})", file=sys.stderr)
        if self.world > 1:
            dist.barrier()

    def _finish(self, step: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if self.rank == 0:
            out: dict[str, Any] = {"best": self.best, "steps": step, "val": None, "test": None,
                                   "temperatures": self.task.temperatures()}
            sel = [h for h in self.history if h["step"] == self.best["step"]]
            out["val"] = sel[-1]["val"] if sel else None
            tested = self.task.test(self.run_dir, self.progress)
            out["test"] = tested.get("test")
            if "rerank_choice" in tested:  # a re-ranker's (rerank_k, itm_weight), chosen on dev
                out["rerank_choice"] = tested["rerank_choice"]
            if "test_s" in tested:
                self.timing["test_s"] = tested["test_s"]
            out["history"] = self.history
            atomic_write_json(self.run_dir / "metrics.json", out)
            # Wall-clock seconds apart from the metrics, so that metrics.json is deterministic.
            atomic_write_json(self.run_dir / "timing.json", self.timing)
            result = out
        if self.world > 1:
            dist.barrier()
        return result


def train(cfg: TrainConfig, dataset: Dataset | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train any model family, select on validation (in the evaluator's direction), evaluate the
    selected model on test; returns ``metrics.json``."""
    return Trainer(cfg, dataset=dataset, resume=resume, progress=progress).fit()
