"""Feature gathering for losses over the global batch under DDP (open_clip semantics).

The trainer gathers embeddings, ids and teacher features *before* the loss; no loss module
gathers internally. With gradient, every rank computes the loss over the global batch and the
gather's backward sums the per-rank gradients of each slice, so a rank's local-input gradient is
``world_size ×`` the global-loss gradient; DDP's gradient averaging then recovers the one-process
gradient exactly. Two ranks of B/2 thus reproduce one process of B.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from itrkit.errors import ItrkitError


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = [0, 0] * (x.ndim - 1) + [0, rows - x.shape[0]]
    # F.pad keeps the autograd graph (non-float tensors have none).
    return F.pad(x, pad) if x.is_floating_point() else torch.cat(
        [x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _gather_one(x: Tensor, sizes: list[int], with_grad: bool) -> Tensor:
    me, top = rank(), max(sizes)
    xp = _pad_rows(x.contiguous(), top)
    if with_grad and x.is_floating_point():
        from torch.distributed.nn.functional import all_gather as all_gather_grad

        with warnings.catch_warnings():
            # Deprecated in favour of functional collectives, whose autograd does not run on gloo.
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(all_gather_grad(xp))
    else:
        parts = [torch.empty_like(xp) for _ in sizes]
        dist.all_gather(parts, xp)
        # Keep the local slice as the local tensor: gradient reaches local features only.
        parts[me] = xp
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def gather_features(*tensors: Tensor, gather_with_grad: bool = True) -> tuple[Tensor, ...]:
    """All-gather each tensor along dim 0 across the default group; concatenation in rank order.

    ``gather_with_grad=True``: differentiable gather (open_clip ``gather_with_grad``).
    ``False``: plain gather with the local slice replaced by the local tensor (open_clip's
    non-grad gather; use it for ids, labels and teacher features). Ranks may hold different
    numbers of rows (a short last batch). Identity when not distributed. Always returns a tuple.
    """
    if not is_dist() or world_size() == 1:
        return tuple(tensors)
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor) or x.ndim == 0:
            raise ItrkitError(f"gather_features: argument {i} has no batch dimension")
    # One small collective for every tensor's row count, so ranks may hold uneven batches.
    n = torch.tensor([x.shape[0] for x in tensors], dtype=torch.long, device=tensors[0].device)
    counts = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    table = torch.stack(counts).tolist()  # [rank][tensor]
    return tuple(_gather_one(x, [row[i] for row in table], gather_with_grad) for i, x in enumerate(tensors))
