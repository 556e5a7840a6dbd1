"""Every method an experiment can run, in one registry (:data:`METHODS`).

Kinds:
- ``tuned``: a dual encoder whose ``grid`` of alternatives is tried on dev (the same number of
  dev runs for every tuned method, the baseline's temperature and learning rate included);
  ablations and controls reuse another method's choice (``copy_choice_of``);
- ``recipe``: a bundled config as it is (``configs/fusion/<recipe>.yaml``), not tuned;
- ``ensemble``: the mean of the score matrices of other methods' same-seed runs.

Fairness rules built in: seeds are paired (run ``s`` of every method starts from the same
initialisation and sees the same batch order); the controls keep CUSA's chosen settings and take
the teacher's knowledge away two ways: ``cusa-shuffled`` permutes the teacher rows among training
items (the soft labels keep their shape), ``cusa-smooth`` gives CSA label-smoothed rows with the
teacher's diagonal mass (FINDINGS F3: the diagonal staying the largest entry may be all CSA uses).

Regimes: heads on frozen tower features (the default), or partial fine-tuning
(:func:`finetune_overrides`: the top N blocks of each tower train over cached frozen prefixes;
two-stage methods keep the towers frozen in stage I and train them in stage II, IConE's recipe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from itrkit.errors import ConfigError

# Architecture shared by every method: a trainable residual trunk per modality feeds both the
# cross head and the USA head (docs/method.md §5.1, F1: otherwise USA cannot touch retrieval).
BASE = [
    "model.image_tower=efficientnet-lite0", "model.text_tower=minilm", "model.cached_features=true",
    "model.trunk=mlp", "model.trunk_hidden=1024", "model.usa_heads=true", "model.embed_dim=256",
    "batch_size=128", "stages.0.lr=0.001", "stages.0.weight_decay=0.01", "log_every=100",
]


@dataclass
class Method:
    name: str
    overrides: list[str] = field(default_factory=list)
    grid: list[list[str]] = field(default_factory=list)  # dev-tuned alternatives (same count for all)
    inherits: str = ""  # take the chosen base settings of this method first
    copy_choice_of: str = ""  # a control or ablation: reuse another method's chosen grid point, no tuning
    after: list[str] = field(default_factory=list)  # applied after the chosen grid point (ablations)
    teachers: bool = False
    description: str = ""
    kind: str = "tuned"  # tuned | recipe | ensemble
    recipe: str = ""  # recipe: the bundled config's name
    members: tuple[str, ...] = ()  # ensemble: the methods whose score matrices are averaged
    first_stage: str = ""  # recipe: a re-ranker over this tuned method's same-seed run (model.itc_run)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("infonce", ["loss.contrastive=1"], [
        ["loss.tau=0.05", "loss.tau_learnable=true"], ["loss.tau=0.05", "loss.tau_learnable=false"],
        ["loss.tau=0.1", "loss.tau_learnable=false"], ["loss.tau=0.1", "loss.tau_learnable=false", "stages.0.lr=0.0003"],
    ], description="InfoNCE, temperature and lr tuned on dev"),
    # Ablations: CUSA's chosen setting with one term switched off (the paper's Table 5 rows).
    Method("csa", ["loss.contrastive=1"], copy_choice_of="cusa", after=["loss.usa=0"], inherits="infonce",
           teachers=True, description="ablation: CUSA's setting, USA off (InfoNCE + α·CSA)"),
    Method("usa", ["loss.contrastive=1"], copy_choice_of="cusa", after=["loss.csa=0"], inherits="infonce",
           teachers=True, description="ablation: CUSA's setting, CSA off (InfoNCE + β·USA)"),
    # Grids are ordered by priority: a smaller dev budget (``--dev-budget K``) tries the first K points.
    Method("cusa", ["loss.contrastive=1"], [
        ["loss.csa=1", "loss.usa=1", "loss.tau_teacher=0.1"],
        # the paper's own point (CUSA §4.1: α=0.1, β=0.5, teacher T=1, learnable τ)
        ["loss.csa=0.1", "loss.usa=0.5", "loss.tau_teacher=1.0", "loss.tau_learnable=true"],
        ["loss.csa=3", "loss.usa=3", "loss.tau_teacher=0.1"], ["loss.csa=1", "loss.usa=3", "loss.tau_teacher=0.05"],
    ], inherits="infonce", teachers=True, description="InfoNCE + α·CSA + β·USA"),
    Method("cusa-shuffled", ["loss.contrastive=1", "teacher.shuffle=true"], copy_choice_of="cusa", inherits="infonce",
           teachers=True, description="control: CUSA with teacher rows permuted"),
    Method("cusa-smooth", ["loss.contrastive=1", "teacher.smooth=true"], copy_choice_of="cusa", inherits="infonce",
           teachers=True, description="control: CUSA with CSA's soft labels label-smoothed (teacher's diagonal, "
                                      "the rest uniform)"),
    Method("vse++", ["loss.contrastive=0", "loss.triplet=1"], [
        ["loss.margin=0.2"], ["loss.margin=0.1"], ["loss.margin=0.2", "stages.0.lr=0.0003"], ["loss.margin=0.05"],
    ], description="VSE++ hardest-negative triplet"),
    Method("icone-stage1", ["loss.contrastive=0", "loss.instance=1"], [
        ["stages.0.lr=0.001"], ["stages.0.lr=0.003"], ["stages.0.lr=0.0003"], ["stages.0.lr=0.001", "stages.0.weight_decay=0.1"],
    ], description="IConE stage I: instance loss only (towers frozen)"),
    Method("icone", ["loss.contrastive=0", "loss.instance=1", "stages.0.name=stage1",
                     "stages.1.name=stage2", "stages.1.loss={contrastive: 1.0, instance: 1.0}",
                     "stages.1.lr=0.0003", "loss.tau=0.05", "loss.tau_learnable=false"], [
        ["stages.1.lr=0.0003"], ["stages.1.lr=0.001"], ["stages.1.loss={contrastive: 1.0, instance: 0.1}"],
        ["stages.1.lr=0.001", "loss.tau=0.1"],
    ], description="IConE: stage I instance, stage II instance + InfoNCE"),
    # IConE + CUSA is not tuned again: IConE's dev choice plus CUSA's chosen weights (α=β=1,
    # τ_teacher=0.1 on this data) added to stage II, so the row isolates what CUSA adds to IConE.
    Method("icone+cusa", ["loss.contrastive=0", "loss.instance=1", "stages.0.name=stage1",
                          "stages.1.name=stage2", "stages.1.loss={contrastive: 1.0, instance: 1.0}",
                          "stages.1.lr=0.0003", "loss.tau=0.05", "loss.tau_learnable=false"],
           copy_choice_of="icone", after=["stages.1.loss.csa=1.0", "stages.1.loss.usa=1.0", "loss.tau_teacher=0.1"],
           teachers=True, description="IConE's chosen setting + CUSA terms (α=β=1, τ_t=0.1) in stage II"),
]}
# Fusion matchers: bundled recipes (CUSA weights from the paper's appendix for SGRAF / X2VLM).
# ``*-minilm``: the same matchers on frozen all-MiniLM-L6-v2 contextual token states, not a GRU.
for _name, _recipe in (("sgr", "sgr"), ("saf", "saf"), ("sgr+cusa", "sgr_cusa"), ("saf+cusa", "saf_cusa"),
                       ("rerank", "rerank"), ("rerank+cusa", "rerank_cusa"),
                       ("sgr-minilm", "minilm/sgr"), ("saf-minilm", "minilm/saf"),
                       ("sgr-minilm+cusa", "minilm/sgr_cusa"), ("saf-minilm+cusa", "minilm/saf_cusa")):
    METHODS[_name] = Method(_name, kind="recipe", recipe=_recipe, teachers=_name.endswith("+cusa"),
                            description=f"fusion matcher, bundled recipe {_recipe}")
# Re-rankers on a trained dual encoder: the same seed's run of the study's InfoNCE is the frozen
# first stage (its ranking, its hard negatives); only the cross-attention ITM head trains.
for _name, _recipe in (("rerank-de", "minilm/rerank_de"), ("rerank-de+cusa", "minilm/rerank_de_cusa")):
    METHODS[_name] = Method(_name, kind="recipe", recipe=_recipe, teachers=_name.endswith("+cusa"), first_stage="infonce",
                            description=f"ITM re-ranker over the same seed's InfoNCE run, bundled recipe {_recipe}")
METHODS["sgraf"] = Method("sgraf", kind="ensemble", members=("sgr", "saf"), description="SGRAF = mean of SGR and SAF scores")
METHODS["sgraf+cusa"] = Method("sgraf+cusa", kind="ensemble", members=("sgr+cusa", "saf+cusa"),
                               description="SGRAF + CUSA = mean of SGR+CUSA and SAF+CUSA scores")
METHODS["sgraf-minilm"] = Method("sgraf-minilm", kind="ensemble", members=("sgr-minilm", "saf-minilm"),
                                 description="SGRAF on MiniLM token states = mean of their SGR and SAF scores")
METHODS["sgraf-minilm+cusa"] = Method("sgraf-minilm+cusa", kind="ensemble", members=("sgr-minilm+cusa", "saf-minilm+cusa"),
                                      description="SGRAF + CUSA on MiniLM token states")
DEFAULT_METHODS = ["infonce", "csa", "usa", "cusa", "cusa-shuffled"]
FUSION_METHODS = tuple(n for n, m in METHODS.items() if m.kind != "tuned")


def epochs_overrides(method: Method, epochs: int) -> list[str]:
    """``epochs`` split over a two-stage method's stages (half each), else the one stage's."""
    if two_stage(method):
        return [f"stages.0.epochs={max(1, epochs // 2)}", f"stages.1.epochs={max(1, epochs - epochs // 2)}"]
    return [f"stages.0.epochs={epochs}"]




FINETUNE_MODE = re.compile(r"^(frozen|top:[1-9][0-9]*)$")


def parse_finetune(spec: str) -> dict[str, str]:
    """``--finetune`` → ``{"image": mode, "text": mode}``: ``top:N`` for both towers, or
    ``image=top:N,text=top:M`` (a side left out, or ``frozen``, stays frozen)."""
    bad = ConfigError(f"--finetune '{spec}': use top:N (both towers) or image=MODE,text=MODE with MODE frozen or "
                      "top:N (N >= 1)")
    spec = spec.strip()
    if FINETUNE_MODE.match(spec):
        return {"image": spec, "text": spec}
    out = {"image": "frozen", "text": "frozen"}
    seen: set[str] = set()
    for part in spec.split(","):
        side, sep, mode = (x.strip() for x in part.partition("="))
        if not sep or side not in out or side in seen or not FINETUNE_MODE.match(mode):
            raise bad
        seen.add(side)
        out[side] = mode
    return out


def two_stage(method: Method) -> bool:
    return any(o.startswith("stages.1.") for o in method.overrides)


def expand_stages(method: Method, overrides: list[str]) -> list[str]:
    """``stages.*.KEY=V`` → one item per stage of ``method`` (``stages.0.KEY=V``, and ``stages.1.KEY=V``
    for a two-stage method), so one ``--set`` reaches every stage without adding stages to the others."""
    out = []
    for o in overrides:
        if o.startswith("stages.*."):
            out += [f"stages.{k}.{o[len('stages.*.'):]}" for k in range(2 if two_stage(method) else 1)]
        else:
            out.append(o)
    return out


def finetune_overrides(method: Method, finetune: dict[str, str] | None) -> list[str]:
    """The config overrides of partial fine-tuning for ``method`` (empty without ``finetune``).

    Both towers' ``model.*_trainable`` (with the cached frozen prefixes of ``BASE``'s
    ``model.cached_features=true``); a two-stage method (IConE) also freezes the towers in stage I
    (``stages.0.freeze=[towers]``), so only its stage II fine-tunes them: the paper's recipe."""
    if not finetune:
        return []
    over = [f"model.image_trainable={finetune['image']}", f"model.text_trainable={finetune['text']}"]
    if two_stage(method) and any(m != "frozen" for m in finetune.values()):
        over.append("stages.0.freeze=[towers]")
    return over
