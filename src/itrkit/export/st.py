"""``--format sentence-transformers``: the text side of a run as a sentence-transformers folder.

Modules, in order: the tower's Transformer and Pooling (and its Dense / Normalize modules when it
was itself a sentence-transformers folder), the trunk, the head (LayerNorm + Dense), Normalize.
A run without a trunk (``model.trunk=none``) uses built-in modules only and loads with
``SentenceTransformer(DIR)``; the residual MLP trunk has no built-in equivalent, so such exports
carry ``itrkit_st_modules.py`` (:mod:`itrkit.export.st_modules`, torch only) and load with
``SentenceTransformer(DIR, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itrkit.export.common import ExportError, RunInfo, check_head, head_modules, tower_name
from itrkit.models.dual_encoder import ResidualMLP
from itrkit.models.hf_text import POOLING_MODES, quiet_transformers

ST_TOWERS = ("minilm", "st", "hf")
MODULE_FILE = "itrkit_st_modules.py"
_LEGACY_POOLING = (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                   ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
                   ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))
_ST_POOLING = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len": "mean_sqrt_len_tokens"}


def check(info: RunInfo, head: str) -> None:
    check_head(info.model, head, str(info.path))
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise ExportError("--format sentence-transformers needs sentence-transformers: "
                          "pip install 'itrkit[export]'") from None
    name = tower_name(info.model, "text")
    if name not in ST_TOWERS:
        raise ExportError(f"{info.path}: text tower '{name}' cannot be expressed as a sentence-transformers model "
                          f"(needs a Hugging Face transformer text tower: {', '.join(ST_TOWERS)}); "
                          + ("use --format onnx or hf" if name == "clip" else "use --format hf"))


def _st_version() -> str:
    import sentence_transformers

    return str(getattr(sentence_transformers, "__version__", "?"))


def _st_modules() -> tuple[Any, ...]:
    """Dense, LayerNorm, Normalize, Pooling, Transformer: from their 6.x home, else ``models`` (3.x–5.x)."""
    try:
        from sentence_transformers.sentence_transformer import modules as m
    except ImportError:
        from sentence_transformers import models as m
    return m.Dense, m.LayerNorm, m.Normalize, m.Pooling, m.Transformer


def _dense(layer: nn.Module) -> Any:
    Dense = _st_modules()[0]
    lin: nn.Linear = layer.linear  # type: ignore[assignment]
    d = Dense(lin.in_features, lin.out_features, bias=lin.bias is not None, activation_function=type(layer.activation)())
    d.linear.load_state_dict(lin.state_dict())
    return d


def _long_standing_format(out: Path, tower: Any) -> None:
    """Rewrite the configs sentence-transformers 6 wrote into the format its earlier releases write
    and every release reads (the format all-MiniLM-L6-v2 ships in): ``sentence_transformers.models.*``
    module types, ``pooling_mode_*`` booleans, no 6.x-only keys. The custom trunk module becomes
    ``itrkit_st_modules.ItrkitResidualMLP`` (the file copied beside it)."""
    mj = out / "modules.json"
    entries = json.loads(mj.read_text(encoding="utf-8"))
    for e in entries:
        cls = e["type"].rsplit(".", 1)[-1]
        e["type"] = f"{MODULE_FILE[:-3]}.{cls}" if cls == "ItrkitResidualMLP" else f"sentence_transformers.models.{cls}"
        folder = out / e["path"]
        cfg_path = folder / "config.json"
        if cls == "Pooling" and "pooling_mode" in json.loads(cfg_path.read_text(encoding="utf-8")):
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            modes = cfg.get("pooling_mode")
            modes = (modes,) if isinstance(modes, str) else tuple(modes)
            legacy = {"word_embedding_dimension": int(cfg["embedding_dimension"])}
            for key, mode in _LEGACY_POOLING:
                legacy[key] = mode in modes
            legacy["include_prompt"] = bool(cfg.get("include_prompt", True))
            cfg_path.write_text(json.dumps(legacy, indent=2) + "\n", encoding="utf-8")
        elif cls == "Dense":
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            keep = {k: cfg[k] for k in ("in_features", "out_features", "bias", "activation_function") if k in cfg}
            cfg_path.write_text(json.dumps(keep, indent=2) + "\n", encoding="utf-8")
    mj.write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": int(tower.max_length), "do_lower_case": bool(tower.lowercase)}, indent=2) + "\n",
        encoding="utf-8")


def export(info: RunInfo, out: Path, head: str, name: str) -> dict[str, Any]:
    """Write the export into ``out`` (a temporary folder renamed to ``name`` afterwards); card details."""
    from sentence_transformers import SentenceTransformer

    from itrkit.export.st_modules import ItrkitResidualMLP

    Dense, LayerNorm, Normalize, Pooling, Transformer = _st_modules()

    model = info.model
    tower = model.text_tower
    trunk, head_mod = head_modules(model, "text", head)
    with tempfile.TemporaryDirectory(prefix="itrkit-st-") as src, quiet_transformers():
        # The tower's (possibly fine-tuned) transformer, saved as a plain HF folder for ST to read.
        tower.model.save_pretrained(src)
        tower.tokenizer.save_pretrained(src)
        modules: list[nn.Module] = [
            Transformer(src, max_seq_length=int(tower.max_length), do_lower_case=bool(tower.lowercase)),
            # itrkit concatenates pooling modes in its fixed order, whatever order the spec names them.
            Pooling(int(tower.model.config.hidden_size),
                    pooling_mode=tuple(_ST_POOLING[m] for m in POOLING_MODES if m in tower.pooling)),
        ]
        modules += [_dense(layer) for layer in tower.dense]
        if tower.normalize:
            modules.append(Normalize())
        dim = int(tower.output_dim)
        custom = isinstance(trunk, ResidualMLP)
        if custom:
            mlp = ItrkitResidualMLP(dim, trunk.fc1.out_features)
            mlp.load_state_dict(trunk.state_dict())
            modules.append(mlp)
        elif not isinstance(trunk, nn.Identity):
            raise ExportError(f"{info.path}: trunk {type(trunk).__name__} has no sentence-transformers form")
        ln = LayerNorm(dim)
        ln.norm.load_state_dict(head_mod[0].state_dict())
        lin: nn.Linear = head_mod[1]  # type: ignore[assignment]
        d = Dense(lin.in_features, lin.out_features, bias=True, activation_function=nn.Identity())
        d.linear.load_state_dict(lin.state_dict())
        modules += [ln, d, Normalize()]
        st = SentenceTransformer(modules=[m.float() for m in modules], device="cpu")
        with torch.no_grad():
            st.save(str(out))
    if custom:
        shutil.copyfile(Path(__file__).with_name("st_modules.py"), out / MODULE_FILE)
    _long_standing_format(out, tower)
    trust = ", trust_remote_code=True" if custom else ""
    return {
        "what": f"text encoder ({tower_name(model, 'text')} tower + trunk + {head} head), "
                f"{lin.out_features}-d, L2-normalised",
        "usage": ("```python\nfrom sentence_transformers import SentenceTransformer\n\n"
                  f"model = SentenceTransformer(\"{name}\"{trust})\n"
                  "emb = model.encode([\"a dog runs on the beach\"])  # = itrkit's encode_texts"
                  + ("" if head == "cross" else "_uni") + "\n```"),
        "notes": [f"Folder format: the long-standing one all-MiniLM-L6-v2 ships in (`sentence_transformers.models.*` "
                  f"modules); written and checked with sentence-transformers {_st_version()}."]
                 + ([f"The residual MLP trunk is the module in `{MODULE_FILE}` (torch only): load with "
                   "`trust_remote_code=True`."] if custom else [])
                 + ["Cross-modal search: encode the images with the same run's `--format onnx` "
                    "or `--format hf` export (same embedding space)." if head == "cross" else
                    "USA head: text-to-text search (STS), not cross-modal."],
    }
