"""GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): the loss of a large batch with the activation memory of a chunk (``chunk_size``).

One step, for a batch of B rows split into chunks of K:

1. each chunk goes through the model **without** a graph (the CPU / CUDA RNG state saved before
   each), the outputs (embeddings) are concatenated;
2. the concatenated outputs become leaf tensors; the loss over the **whole** batch (gathered under
   DDP exactly as the unchunked path) is differentiated: gradients w.r.t. the embeddings are cached,
   the loss modules' parameters (temperatures, the instance classifier) get theirs as usual;
3. each chunk runs again **with** a graph, its RNG state replayed (the same dropout masks), and
   back-propagates its slice of the cached gradients into the model.

The parameter gradients equal those of one backward through the whole batch: the loss depends on
the model only through the per-row embeddings, and each row's embedding depends only on that row's
inputs. That holds for the dual encoder (LayerNorm is per row; frozen tower blocks stay in eval
mode) but not for a BatchNorm in training mode, which would normalise by chunk statistics and
update its running statistics twice — refused (:func:`check_supported`) — nor for the fusion
matchers, whose B×B scores are not a function of per-row embeddings (refused by the config).

Under DDP the model runs outside the DDP wrapper (which wants one forward per backward) and the
gradients are averaged over the ranks afterwards, as DDP's reducer would. fp16 works: the loss is
scaled before step 2, so the cached gradients and every parameter gradient carry the scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from itrkit.errors import ConfigError


def batch_rows(batch: dict[str, Any]) -> int:
    """Rows of a dual-encoder batch (one per caption)."""
    return len(batch["img_ids"])


def slice_rows(x: Any, n: int, start: int, end: int) -> Any:
    """Rows ``start:end`` of every entry of ``x`` with ``n`` rows (tensors, arrays, lists, nested
    dicts); other entries as they are. An ``EmbeddingBag`` input (``ids`` + per-row ``offsets``,
    the tiny text tower's) is cut at the offsets."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return x[start:end] if x.ndim and x.shape[0] == n else x
    if isinstance(x, dict):
        if "ids" in x and "offsets" in x and len(x["offsets"]) == n and len(x) == 2:
            ids, offsets = x["ids"], x["offsets"]
            lo = int(offsets[start])
            hi = int(offsets[end]) if end < n else len(ids)
            return {"ids": ids[lo:hi], "offsets": offsets[start:end] - lo}
        return {k: slice_rows(v, n, start, end) for k, v in x.items()}
    if isinstance(x, list | tuple) and len(x) == n:
        return x[start:end]
    return x


def chunk_batch(batch: dict[str, Any], chunk_size: int) -> list[tuple[int, int, dict[str, Any]]]:
    """``(start, end, rows start:end of batch)`` for consecutive chunks of ``chunk_size`` rows."""
    n = batch_rows(batch)
    return [(s, min(s + chunk_size, n), slice_rows(batch, n, s, min(s + chunk_size, n)))
            for s in range(0, n, chunk_size)]


def check_supported(model: nn.Module) -> None:
    """Refuse a model with a BatchNorm in training mode: chunk statistics are not batch statistics."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            raise ConfigError(f"chunk_size (GradCache): '{name}' is a BatchNorm in training mode, which would "
                              "normalise each chunk by its own statistics; freeze that block or set chunk_size=0")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """DDP's gradient averaging over the default group: mean over ranks, a parameter without a
    gradient on a rank counting as zero there; one that has none on every rank keeps ``None``."""
    if world <= 1 or not params:
        return
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present)
    keep = present.tolist()
    for dtype in sorted({p.dtype for p in params}, key=str):  # the same order on every rank
        group = [(i, p) for i, p in enumerate(params) if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in group])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for i, p in group:
            n = p.numel()
            if keep[i] > 0:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


class GradCache:
    """Chunked forward / backward around a :class:`~itrkit.train.trainer.TrainModule` (its
    ``encode`` = the model under autocast, ``losses`` = gather + loss terms)."""

    def __init__(self, module: Any, chunk_size: int, world: int = 1,
                 params: Callable[[], Sequence[nn.Parameter]] | None = None) -> None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 for GradCache, got {chunk_size}")
        self.module, self.chunk_size, self.world = module, int(chunk_size), int(world)
        self.params = params or (lambda: [p for p in module.parameters() if p.requires_grad])
        self.replay_rng = True  # tests switch it off to show that replay matters

    def forward(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], None]]:
        """Steps 1–2 up to the loss: ``(loss terms, backward)``; ``backward(loss)`` (the summed,
        possibly fp16-scaled loss) fills every parameter's ``.grad``."""
        device = next(self.module.model.parameters()).device
        chunks = chunk_batch(batch, self.chunk_size)
        states, outs = [], []
        with torch.no_grad():
            for _, _, part in chunks:
                states.append(_rng_state(device))
                outs.append(self.module.encode(part))
        full: dict[str, torch.Tensor] = {}
        for k in outs[0]:
            v = torch.cat([o[k] for o in outs])
            full[k] = v.requires_grad_(True) if torch.is_floating_point(v) else v
        leaves = {k: v for k, v in full.items() if v.requires_grad}
        terms = self.module.losses(full, batch)

        def backward(loss: torch.Tensor) -> None:
            loss.backward()  # cached embedding gradients; the loss modules' parameters accumulate here
            grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
            after = _rng_state(device)
            for (start, end, part), state in zip(chunks, states):
                if self.replay_rng:
                    _set_rng_state(state, device)
                out = self.module.encode(part)
                pairs = [(out[k], g[start:end]) for k, g in grads.items() if out[k].requires_grad]
                if pairs:
                    torch.autograd.backward([t for t, _ in pairs], grad_tensors=[g for _, g in pairs])
            _set_rng_state(after, device)  # the RNG stream continues as after the loss
            average_gradients(list(self.params()), self.world)

        return terms, backward
