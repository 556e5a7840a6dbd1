"""Training configuration, one typed family for every model: dataclasses filled from
``configs/*.yaml`` and ``--set key=value`` (:func:`load_train_config`).

``model.name`` picks the family: ``dual_encoder`` (the default; :class:`ModelConfig`) or a
registered fusion matcher (``sgr``, ``saf``, ``rerank``; their options dataclasses). Loss weights
and temperatures live in ``loss`` for every family (``loss.csa`` / ``loss.usa`` are α / β
everywhere); ``stages`` hold epochs, learning rates and schedules. Configs written before the
one-loop refactor (fusion recipes with top-level ``epochs``/``lr`` and loss keys under
``model``) still load: their keys are moved with a one-line note (:func:`upgrade_legacy`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itrkit.config import _deep_update, apply_overrides, from_dict, load_yaml, parse_override, to_dict
from itrkit.errors import ConfigError
from itrkit.models.dual_encoder import ModelConfig
from itrkit.models.registry import fusion_defaults, fusion_options_class, is_fusion_model

PRECISIONS = ("fp32", "bf16", "fp16")
LOSS_TERMS = ("contrastive", "triplet", "csa", "usa", "instance", "itm")


@dataclass
class DataConfig:
    path: str = ""  # a prepared dataset folder (``itrkit data prepare``)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_images: int = 0  # 0 = all
    max_eval_images: int = 0  # val and test (0 = all), unless max_val_images / max_test_images say otherwise
    max_val_images: int = 0  # fusion scoring is O(images × captions): validate on a subset of dev
    max_test_images: int = 0
    grid_store: str = ""  # fusion matchers: region features keyed by image id (``itrkit grid``); empty = built
    # once into the content-keyed feature cache (cache_dir) from the train/val/test images
    grid_model: str = "efficientnet-lite0"  # the CNN whose last feature map gives the grid cells (when built)
    num_workers: int = 0  # processes preparing the next batches (live towers; cached features need none)
    image_cache_mb: int = 1024  # live image towers: decoded + preprocessed images kept in RAM (0 = off)

    def limit(self, split: str) -> int:
        """Images of ``split`` to use (0 = all)."""
        if split == "train":
            return self.max_train_images
        own = self.max_val_images if split == "val" else self.max_test_images
        return own or self.max_eval_images

    def validate(self) -> None:
        if min(self.max_train_images, self.max_eval_images, self.max_val_images, self.max_test_images) < 0:
            raise ConfigError("data.max_*_images must be >= 0")
        if self.num_workers < 0 or self.image_cache_mb < 0:
            raise ConfigError("data.num_workers / data.image_cache_mb must be >= 0")


@dataclass
class LossConfig:
    """Weights of each term and their temperatures (docs/method.md §1). Stages may override the weights."""

    contrastive: float = 1.0  # InfoNCE (the re-ranker's ITC)
    triplet: float = 0.0  # VSE++ hardest negative (fusion matchers: on the B×B score matrix)
    csa: float = 0.0  # alpha
    usa: float = 0.0  # beta
    instance: float = 0.0  # IConE shared-classifier loss
    itm: float = 0.0  # re-ranker: image-text matching BCE on in-batch hard negatives
    tau: float = 0.05
    tau_learnable: bool = True
    tau_min: float = 0.01
    tau_max: float = 0.1
    margin: float = 0.2
    sum_warmup_epochs: int = 1  # fusion triplet: epochs of the sum-over-negatives hinge before the hardest
    soft_itm: float = 0.0  # re-ranker + CUSA: scale of the hard negatives' soft ITM targets (0 = hard zeros)
    soft_itm_tau: float = 0.0  # teacher temperature of those targets (0 = tau_teacher)
    mining_seed: int = 0  # re-ranker: seeds the hard-negative draws (with the step)
    tau_c: float = 0.45
    tau_img: float = 0.45
    tau_txt: float = 0.45
    tau_uni_min: float = 0.1
    tau_uni_max: float = 1.0
    tau_uni_learnable: bool = True
    tau_teacher: float = 1.0
    teacher_mode: str = "each"  # each | add | dot
    center_teacher: bool = False
    gather: str = "global"  # global: losses over the gathered global batch (DDP); local: per rank

    def validate(self) -> None:
        for name in LOSS_TERMS:
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.tau_min <= self.tau <= self.tau_max:
            raise ConfigError(f"loss.tau {self.tau} must lie in [tau_min {self.tau_min}, tau_max {self.tau_max}]")
        if self.teacher_mode not in ("each", "add", "dot"):
            raise ConfigError(f"loss.teacher_mode: unknown mode '{self.teacher_mode}' (each, add or dot)")
        if self.gather not in ("global", "local"):
            raise ConfigError(f"loss.gather must be global or local, got '{self.gather}'")
        if self.tau_teacher <= 0:
            raise ConfigError("loss.tau_teacher must be > 0")


@dataclass
class TeacherConfig:
    image_store: str = ""  # folder written by ``itrkit teach``
    text_store: str = ""
    shuffle: bool = False  # control: permute teacher rows among training items once (seeded)
    # control (cusa-smooth): CSA's targets keep each teacher row's diagonal and spread the rest
    # uniformly over the other entries (label smoothing); USA's stay the teacher's
    smooth: bool = False
    ram_mb: int = 1024  # the training split's teacher rows (float32) are read once into RAM up to this; 0 = per batch from disk

    def validate(self) -> None:
        if self.ram_mb < 0:
            raise ConfigError(f"teacher.ram_mb must be >= 0, got {self.ram_mb}")
        if self.shuffle and self.smooth:
            raise ConfigError("teacher.shuffle and teacher.smooth are two different controls: set one of them")


@dataclass
class StageConfig:
    """One training stage. ``freeze`` names parts (image_tower, text_tower, towers, image_head,
    text_head, heads, trunk, usa); ``loss`` overrides the weights of :class:`LossConfig`."""

    name: str = "main"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | step | constant
    lr_decay_epoch: int = 0  # step schedule: lr × 0.1 from this epoch on (SGRAF practice)
    tower_lr_scale: float = 1.0  # trainable tower blocks (top:N, all) learn at lr × this
    freeze: list[str] = field(default_factory=list)
    loss: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"stage '{self.name}': epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"stage '{self.name}': lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"stage '{self.name}': weight_decay must be >= 0")
        if not self.tower_lr_scale > 0:
            raise ConfigError(f"stage '{self.name}': tower_lr_scale must be > 0, got {self.tower_lr_scale}")
        if self.warmup_steps < 0 or self.lr_decay_epoch < 0:
            raise ConfigError(f"stage '{self.name}': warmup_steps and lr_decay_epoch must be >= 0")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ConfigError(f"stage '{self.name}': unknown schedule '{self.schedule}'")
        for k, v in self.loss.items():
            if k not in LOSS_TERMS:
                import difflib

                close = difflib.get_close_matches(k, LOSS_TERMS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key 'stages.{self.name}.loss.{k}'{hint}")
            if v < 0:
                raise ConfigError(f"stage '{self.name}': loss weight {k} must be >= 0")
        for part in self.freeze:
            if part not in FREEZABLE:
                raise ConfigError(f"stage '{self.name}': cannot freeze unknown part '{part}' "
                                  f"(known: {', '.join(FREEZABLE)})")


FREEZABLE = ("image_tower", "text_tower", "towers", "image_head", "text_head", "heads", "trunk", "usa", "classifier")


@dataclass
class TrainConfig:
    seed: int = 0
    out: str = "runs/run"
    batch_size: int = 128
    eval_every: int = 1  # epochs between validation passes
    select_metric: str = "rsum"  # validation metric that picks the saved model
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0 = at epoch ends only)
    cache_dir: str = ""  # tower-feature cache ('' = $ITRKIT_CACHE or ~/.cache/itrkit)
    threads: int = 0  # torch threads (0 = leave as is)
    log_every: int = 50
    # Besides train.log (jsonl, always): csv (metrics.csv) and/or tensorboard; a list or "csv,tensorboard".
    report_to: Any = field(default_factory=list)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast around the model's forward; losses stay float32;
    # fp16 with a gradient scaler whose state is checkpointed)
    device: str = "auto"  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps; torchrun: cuda:LOCAL_RANK
    tf32: bool = False  # CUDA: TF32 matmuls and convolutions (faster, ~10 mantissa bits); off = exact fp32
    compile: bool = False  # torch.compile the model's forward (CUDA; the first steps compile)
    grad_clip: float = 0.0  # clip the gradient norm to this (0 = off; VSE++ / SGRAF use 2.0)
    # GradCache (the issue's train.chunk_size): embed each rank's batch in chunks of this many rows without
    # a graph, the loss over the whole batch, then each chunk again with gradient (0 = off; dual encoders)
    chunk_size: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    # ModelConfig (dual encoder) or a fusion model's options dataclass, chosen by model.name.
    model: Any = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    @property
    def family(self) -> str:
        """``dual_encoder`` or ``fusion``."""
        return "fusion" if is_fusion_model(getattr(self.model, "name", "dual_encoder")) else "dual_encoder"

    def validate(self) -> None:
        if isinstance(self.model, dict):
            name = self.model.get("name", "dual_encoder")
            cls = fusion_options_class(name) if is_fusion_model(name) else ModelConfig
            self.model = from_dict(cls, self.model, prefix="model.")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.chunk_size < 0:
            raise ConfigError(f"chunk_size must be >= 0 (0 = off), got {self.chunk_size}")
        if self.chunk_size and self.family == "fusion":
            raise ConfigError(f"chunk_size (GradCache) is for dual encoders: a fusion matcher's ({self.model.name}) "
                              "B×B scores are not a function of per-row embeddings; set chunk_size=0")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names must be unique, got {names}")
        if sum(s.epochs for s in self.stages) < 1:
            raise ConfigError("stages: at least one epoch in total is needed")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got '{self.precision}'")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ConfigError("device must be auto, cpu, cuda, cuda:N or mps")
        from itrkit.train.reporters import parse_report_to

        self.report_to = parse_report_to(self.report_to)

    def weights(self, stage: StageConfig) -> dict[str, float]:
        w = {k: float(getattr(self.loss, k)) for k in LOSS_TERMS}
        w.update(stage.loss)
        return w

    def uses(self, term: str) -> bool:
        return any(self.weights(s)[term] > 0 for s in self.stages)


# --- loading, with the fusion recipes' old layout as aliases ----------------------------------------
# The fusion trainer's old defaults (FusionTrainConfig), filled into an old-layout config first.
_LEGACY_TOP = {"batch_size": 64, "log_every": 20, "grad_clip": 2.0, "out": "runs/fusion"}
_LEGACY_STAGE = {"epochs": 10, "lr": 5e-4, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "cosine",
                 "lr_decay_epoch": 0}
# old model.* key → new key, per fusion family (the loss settings left the model)
_LEGACY_SGRAF = {"margin": "loss.margin", "sum_warmup_epochs": "loss.sum_warmup_epochs", "alpha": "loss.csa",
                 "beta": "loss.usa", "tau_c": "loss.tau_c", "tau_img": "loss.tau_img", "tau_txt": "loss.tau_txt",
                 "tau_min": "loss.tau_uni_min", "tau_max": "loss.tau_uni_max",
                 "tau_learnable": "loss.tau_uni_learnable", "tau_teacher": "loss.tau_teacher",
                 "teacher_mode": "loss.teacher_mode", "center_teacher": "loss.center_teacher", "kind": "model.name"}
_LEGACY_RERANK = {"itm": "loss.itm", "tau": "loss.tau", "tau_learnable": "loss.tau_learnable", "tau_min": "loss.tau_min",
                  "tau_max": "loss.tau_max", "alpha": "loss.csa", "beta": "loss.usa", "soft_itm": "loss.soft_itm",
                  "soft_itm_tau": "loss.soft_itm_tau", "tau_uni": "loss.tau_c,loss.tau_img,loss.tau_txt",
                  "tau_uni_min": "loss.tau_uni_min", "tau_uni_max": "loss.tau_uni_max",
                  "tau_uni_learnable": "loss.tau_uni_learnable", "tau_teacher": "loss.tau_teacher",
                  "teacher_mode": "loss.teacher_mode", "center_teacher": "loss.center_teacher",
                  "mining_seed": "loss.mining_seed"}
# the old models' own defaults of those keys, where they differ from LossConfig's
_LEGACY_LOSS = {"sgr": {"contrastive": 0.0, "triplet": 1.0}, "saf": {"contrastive": 0.0, "triplet": 1.0},
                "rerank": {"itm": 1.0, "tau_teacher": 0.1}}


def _is_legacy(data: dict[str, Any]) -> bool:
    model = data.get("model") or {}
    name = model.get("name") if isinstance(model, dict) else None
    if not is_fusion_model(name):
        return False
    return any(k in data for k in _LEGACY_STAGE) or any(k in model for k in {*_LEGACY_SGRAF, *_LEGACY_RERANK}
                                                         if k not in ("name",))


def upgrade_legacy(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """An old-layout fusion config (``FusionTrainConfig``) → the one-loop layout, with a note."""
    if not _is_legacy(data):
        return data
    data = {**_LEGACY_TOP, **data}
    model = dict(data.pop("model"))
    name = model["name"]
    table = _LEGACY_RERANK if name == "rerank" else _LEGACY_SGRAF
    loss = {**_LEGACY_LOSS.get(name, {}), **(data.pop("loss", None) or {})}
    moved = []
    for old, new in table.items():
        if old in model:
            value = model.pop(old)
            for target in new.split(","):
                section, key = target.split(".")
                (loss if section == "loss" else model)[key] = value
            moved.append(f"model.{old} → {new}")
    if loss.get("usa", 0) > 0:
        model.setdefault("usa_heads", True)
    stage = {**_LEGACY_STAGE, **{k: data.pop(k) for k in list(_LEGACY_STAGE) if k in data}}
    stages = data.pop("stages", None) or [{}]
    stages[0] = {**stage, **stages[0]}
    moved += [f"{k} → stages.0.{k}" for k in _LEGACY_STAGE if k in stage]
    print(f"note: {where} uses the old fusion-config layout; read as the new one ({', '.join(moved[:4])}"
          f"{', …' if len(moved) > 4 else ''})", file=sys.stderr)
    return {**data, "model": model, "loss": loss, "stages": stages}


def _model_name(yaml_data: dict[str, Any], overrides: list[str]) -> str:
    name = (yaml_data.get("model") or {}).get("name", "dual_encoder") if isinstance(yaml_data.get("model"), dict) \
        else "dual_encoder"
    for item in overrides:
        keys, value = parse_override(item)
        if keys == ["model", "name"]:
            name = str(value)
    return name


def upgrade_overrides(overrides: list[str], name: str) -> list[str]:
    """Old ``--set`` keys of the fusion trainer (``epochs=``, ``lr=``, ``model.alpha=`` …) → new ones."""
    table = _LEGACY_RERANK if name == "rerank" else _LEGACY_SGRAF
    out, moved = [], []
    for item in overrides:
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        new: list[str] = [key]
        if len(parts) == 1 and parts[0] in _LEGACY_STAGE:
            new = [f"stages.0.{parts[0]}"]
        elif is_fusion_model(name) and len(parts) == 2 and parts[0] == "model" and parts[1] in table \
                and parts[1] != "kind":
            new = table[parts[1]].split(",")
        if new != [key]:
            moved.append(f"{key} → {','.join(new)}")
        out += [f"{k}={value}" for k in new]
        if new == ["loss.usa"] and parse_override(item)[1] not in (0, 0.0, "0"):
            out.append("model.usa_heads=true")  # the old models built their USA heads when beta > 0
    if moved:
        print(f"note: old config keys read as the new ones ({', '.join(moved[:4])}{', …' if len(moved) > 4 else ''})",
              file=sys.stderr)
    return out


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults (of the family ``model.name`` picks) ← YAML ← ``--set`` overrides; every key checked."""
    overrides = list(overrides or [])
    raw = upgrade_legacy(load_yaml(path), str(path)) if path is not None else {}
    name = _model_name(raw, overrides)
    overrides = upgrade_overrides(overrides, name)
    data: dict[str, Any] = to_dict(TrainConfig())
    if is_fusion_model(name):
        data["model"] = {**to_dict(fusion_options_class(name)()), "name": name}
        _deep_update(data, fusion_defaults(name))
    _deep_update(data, raw)
    apply_overrides(data, overrides)
    return from_dict(TrainConfig, data)


def resolve_config(name: str) -> Path:
    """A path, or the name of a bundled config: ``infonce`` → configs/infonce.yaml, ``sgr`` →
    configs/fusion/sgr.yaml."""
    p = Path(name)
    if p.is_file():
        return p
    stem = name if name.endswith(".yaml") else f"{name}.yaml"
    # ./configs, then the package's own (itrkit/configs: the checkout's configs/, shipped in the wheel).
    for root in (Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs",
                 Path(__file__).resolve().parents[3] / "configs"):
        for cand in (root / stem, root / "fusion" / stem):
            if cand.is_file():
                return cand
    raise ConfigError(f"config not found: {name} (a YAML path or a bundled name: infonce, cusa, icone, vsepp, "
                      "sgr, saf, sgr_cusa, saf_cusa, rerank, rerank_cusa, ...)")
