"""Training configuration: dataclasses filled from ``configs/*.yaml`` and ``--set key=value``."""

from __future__ import annotations

from dataclasses import dataclass, field

from itrkit.errors import ConfigError
from itrkit.models.dual_encoder import ModelConfig

LOSS_TERMS = ("contrastive", "triplet", "csa", "usa", "instance")


@dataclass
class DataConfig:
    path: str = ""  # a prepared dataset folder (``itrkit data prepare``)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_images: int = 0  # 0 = all
    max_eval_images: int = 0
    num_workers: int = 0  # processes preparing the next batches (live towers; cached features need none)
    image_cache_mb: int = 1024  # live image towers: decoded + preprocessed images kept in RAM (0 = off)

    def validate(self) -> None:
        if self.max_train_images < 0 or self.max_eval_images < 0:
            raise ConfigError("data.max_train_images / data.max_eval_images must be >= 0")
        if self.num_workers < 0 or self.image_cache_mb < 0:
            raise ConfigError("data.num_workers / data.image_cache_mb must be >= 0")


@dataclass
class LossConfig:
    """Weights of each term and their temperatures (SPEC §1). Stages may override the weights."""

    contrastive: float = 1.0  # InfoNCE
    triplet: float = 0.0  # VSE++ hardest negative
    csa: float = 0.0  # alpha
    usa: float = 0.0  # beta
    instance: float = 0.0  # IConE shared-classifier loss
    tau: float = 0.05
    tau_learnable: bool = True
    tau_min: float = 0.01
    tau_max: float = 0.1
    margin: float = 0.2
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


@dataclass
class StageConfig:
    """One training stage. ``freeze`` names parts (image_tower, text_tower, towers, image_head,
    text_head, heads, trunk, usa); ``loss`` overrides the weights of :class:`LossConfig`."""

    name: str = "main"
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    freeze: list[str] = field(default_factory=list)
    loss: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"stage '{self.name}': epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"stage '{self.name}': lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"stage '{self.name}': weight_decay must be >= 0")
        if self.schedule not in ("cosine", "constant"):
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
    precision: str = "fp32"  # fp32 | bf16 (autocast around the model's forward; losses stay float32)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def validate(self) -> None:
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names must be unique, got {names}")
        if sum(s.epochs for s in self.stages) < 1:
            raise ConfigError("stages: at least one epoch in total is needed")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got '{self.precision}'")

    def weights(self, stage: StageConfig) -> dict[str, float]:
        w = {k: float(getattr(self.loss, k)) for k in LOSS_TERMS}
        w.update(stage.loss)
        return w

    def uses(self, term: str) -> bool:
        return any(self.weights(s)[term] > 0 for s in self.stages)
