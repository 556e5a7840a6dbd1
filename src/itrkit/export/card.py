"""The model card (``README.md``) of an export: data, method, recipe, metrics, the command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itrkit.export.common import RunInfo
from itrkit.utils.io import atomic_write_text

_METRIC_ORDER = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum",
                 "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")


def method_name(config: dict[str, Any]) -> str:
    """A short name for the objective, from the run's loss weights (docs/method.md §1)."""
    loss = config.get("loss") or {}
    stages = config.get("stages") or []
    weights = dict(loss)
    for st in stages:  # a stage may switch terms on (IConE stage II adds InfoNCE, CUSA terms)
        for k, v in (st.get("loss") or {}).items():
            if isinstance(v, int | float) and v > 0:
                weights[k] = max(float(weights.get(k, 0) or 0), float(v))
    on = {k for k in ("contrastive", "triplet", "csa", "usa", "instance") if float(weights.get(k, 0) or 0) > 0}
    if not on:
        return "unknown (no config.yaml beside the model)"
    base = "IConE (instance loss + InfoNCE)" if "instance" in on else \
        "VSE++ (hardest-negative triplet)" if "triplet" in on and "contrastive" not in on else "InfoNCE"
    if {"csa", "usa"} <= on:
        return f"{base} + CUSA (CSA + USA)"
    if "csa" in on:
        return f"{base} + CSA"
    if "usa" in on:
        return f"{base} + USA"
    return base


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _metrics_table(metrics: dict[str, Any], select: str = "rsum") -> list[str]:
    rows = [(split, metrics.get(split)) for split in ("val", "test") if isinstance(metrics.get(split), dict)]
    if not rows:
        return ["No `metrics.json` beside the model: not evaluated by itrkit."]
    keys = [k for k in _METRIC_ORDER if any(k in r for _, r in rows)]
    lines = ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for split, r in rows:
        lines.append(f"| {split} | " + " | ".join(_fmt(r.get(k, "—")) for k in keys) + " |")
    best = metrics.get("best") or {}
    if best:
        metric = best.get("metric")
        value = f" {metric:.1f}" if isinstance(metric, int | float) else ""
        lines += ["", f"The model was selected on validation {select}{value} (stage {best.get('stage', '?')}, "
                      f"epoch {best.get('epoch', '?')}, step {best.get('step', '?')}). "
                      "Metric keys: itrkit's docs/method.md §4."]
    return lines


def _recipe(info: RunInfo) -> list[str]:
    cfg = info.config
    mc = info.model_meta.get("config", {})
    lines = [
        f"- image tower: `{_spec(info.model_meta.get('image_tower'))}` ({mc.get('image_trainable', '?')}); "
        f"text tower: `{_spec(info.model_meta.get('text_tower'))}` ({mc.get('text_trainable', '?')})",
        f"- trunk: {mc.get('trunk', '?')} (hidden {mc.get('trunk_hidden', '?')}); cross heads {mc.get('embed_dim', '?')}-d"
        + (f"; USA heads {mc.get('usa_dim')}-d" if mc.get("usa_heads") else ""),
    ]
    if cfg:
        loss = cfg.get("loss") or {}
        terms = ", ".join(f"{k} {loss[k]}" for k in ("contrastive", "triplet", "csa", "usa", "instance")
                          if float(loss.get(k, 0) or 0) > 0)
        lines.append(f"- loss weights: {terms or 'none'}; τ {loss.get('tau', '?')}"
                     f" ({'learnable' if loss.get('tau_learnable') else 'fixed'})"
                     + (f"; teacher temperature {loss.get('tau_teacher')}" if float(loss.get("csa", 0) or 0)
                        + float(loss.get("usa", 0) or 0) > 0 else ""))
        for st in cfg.get("stages") or []:
            extra = f", loss overrides {st['loss']}" if st.get("loss") else ""
            freeze = f", frozen {st['freeze']}" if st.get("freeze") else ""
            lines.append(f"- stage `{st.get('name', '?')}`: {st.get('epochs', '?')} epochs, lr {st.get('lr', '?')}, "
                         f"weight decay {st.get('weight_decay', '?')}, {st.get('schedule', '?')} schedule{freeze}{extra}")
        lines.append(f"- batch {cfg.get('batch_size', '?')}, seed {cfg.get('seed', '?')}, precision {cfg.get('precision', '?')}")
        teacher = cfg.get("teacher") or {}
        if teacher.get("image_store") or teacher.get("text_store"):
            lines.append(f"- teachers: `{teacher.get('image_store')}`, `{teacher.get('text_store')}`")
    temps = info.metrics.get("temperatures")
    if temps:
        lines.append("- learned temperatures: " + ", ".join(f"{k} {v:.4g}" for k, v in temps.items()
                                                          if isinstance(v, int | float)))
    return lines


def _spec(spec: Any) -> str:
    if not isinstance(spec, dict):
        return str(spec)
    name = spec.get("name", "?")
    extra = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{name}" + (f" ({extra})" if extra else "")


def _data(info: RunInfo) -> list[str]:
    data = (info.config.get("data") or {}) if info.config else {}
    if not data.get("path"):
        return ["Not recorded (no config.yaml beside the model)."]
    lines = [f"Dataset folder `{data['path']}` (an `itrkit data prepare` folder): trained on split "
             f"`{data.get('train_split', 'train')}`, selected on `{data.get('val_split', 'val')}`, "
             f"reported on `{data.get('test_split', 'test')}`."]
    ds = Path(str(data["path"])) / "dataset.json"
    if ds.is_file():
        try:
            from itrkit.data.records import Dataset

            d = Dataset.load(ds.parent)
            lines.append(f"{len(d)} images, {len(d.captions)} captions; splits {d.splits()}.")
        except Exception:  # noqa: BLE001 - the card only describes; a moved dataset must not stop an export
            pass
    if data.get("max_train_images"):
        lines.append(f"Training limited to the first {data['max_train_images']} images.")
    return lines


def write_model_card(folder: Path, info: RunInfo, fmt: str, head: str, command: str, details: dict[str, Any]) -> Path:
    """Write ``folder/README.md`` for the export of ``info`` as ``fmt``."""
    title = info.run_dir.name if info.run_dir is not None else info.model_dir.name
    lines = [
        "---", "library_name: " + {"sentence-transformers": "sentence-transformers", "hf": "transformers",
                                   "onnx": "onnx"}[fmt], "tags: [itrkit, image-text-retrieval]", "---", "",
        f"# {title} ({fmt} export)", "",
        f"{details.get('what', '')}. Exported by itrkit from `{info.path}`.", "",
        "## Use", "", details.get("usage", ""), "",
    ]
    for note in details.get("notes", []):
        lines.append(f"- {note}")
    if details.get("notes"):
        lines.append("")
    lines += ["## Data", "", *_data(info), "",
              "## Method", "", f"{method_name(info.config)}. The objectives are defined in itrkit's "
              "docs/method.md §1 (InfoNCE, VSE++ triplet, CSA, USA, the IConE instance loss).", "",
              "## Recipe", "", *_recipe(info), "",
              "## Metrics", "", *_metrics_table(info.metrics, str(info.config.get("select_metric", "rsum"))), "",
              "## The command", "", "```bash", command, "```", ""]
    path = folder / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
