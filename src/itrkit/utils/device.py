"""Where tensors live: ``--device auto|cpu|cuda|cuda:N|mps`` and moving nested batches there.

``auto`` (the default) picks CUDA if torch sees a GPU, else Apple's MPS, else the CPU. Under
``torchrun`` (``LOCAL_RANK`` set) ``auto`` and a bare ``cuda`` mean ``cuda:LOCAL_RANK``, so each
process drives its own GPU without extra flags. An unavailable or malformed device is one
:class:`DeviceError` line naming it; commands resolve the device before writing anything, so
``--device cuda`` on a machine without CUDA exits 2 with nothing written.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from itrkit.errors import ItrkitError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_HELP = ("auto (default: CUDA if available, else MPS, else CPU), cpu, cuda, cuda:N or mps; "
               "under torchrun, auto and cuda mean cuda:LOCAL_RANK")

_CUDA = re.compile(r"cuda(?::(\d+))?")


class DeviceError(ItrkitError):
    """A device that is malformed or not available on this machine."""


def local_rank() -> int | None:
    """``LOCAL_RANK`` as torchrun sets it (the process's GPU on this node), or None outside torchrun."""
    raw = os.environ.get("LOCAL_RANK")
    if raw is None or raw.strip() == "":
        return None
    try:
        rank = int(raw)
    except ValueError:
        rank = -1
    if rank < 0:
        raise DeviceError(f"LOCAL_RANK={raw!r} is not a non-negative integer")
    return rank


def mps_available() -> bool:
    """Apple-GPU (Metal) backend present and usable in this torch build."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU{where}"


def _cuda(spec: str, index: int | None, rank: int | None) -> torch.device:
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} is not available: {_no_cuda_reason()}")
    count = torch.cuda.device_count()
    if index is None:
        # Bare "cuda": under torchrun this process's GPU, else the current one (cuda:0 unless set).
        index = rank if rank is not None else torch.cuda.current_device()
        if index >= count:
            raise DeviceError(f"device {spec!r} under torchrun: LOCAL_RANK={index} but only {count} "
                              f"CUDA GPU(s) are visible")
    elif index >= count:
        raise DeviceError(f"device {spec!r} is not available: {count} CUDA GPU(s) visible "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Always returns an indexed device for CUDA (``cuda:N``), so comparisons and ``.to()`` calls are
    unambiguous; it does not change the current CUDA device (``torch.cuda.set_device`` is the
    caller's, before NCCL starts). An explicit ``cuda:N`` is kept as given, also under torchrun.
    """
    raw = str(spec)
    s = raw.strip().lower()
    rank = local_rank()
    if s == "auto":
        if torch.cuda.is_available():
            return _cuda(raw, None, rank)
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s in ("mps", "mps:0"):
        if not mps_available():
            raise DeviceError(f"device {raw!r} is not available: torch {torch.__version__} has no usable "
                              f"MPS backend (Apple-silicon GPUs only)")
        return torch.device("mps")
    m = _CUDA.fullmatch(s)
    if m is None:
        raise DeviceError(f"unknown device {raw!r}: use auto, cpu, cuda, cuda:N or mps")
    return _cuda(raw, int(m.group(1)) if m.group(1) is not None else None, rank)


def add_device_argument(parser: Any, default: str = "auto") -> None:
    """Add ``--device`` to a command's parser (an ``ArgumentParser``; validated later by
    :func:`resolve_device`, so a bad device is one line from the command, not a usage error)."""
    parser.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP)


def move_to(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples, named tuples, dataclass instances,
    nested) on ``device``.

    Other leaves (strings, numbers, NumPy arrays, None) come back as they are. With
    ``non_blocking`` and a CUDA target, CPU tensors are first pinned (page-locked), without which
    the copy would be synchronous anyway; other targets copy blocking, since a non-blocking copy
    to the CPU could be read before it lands.
    """
    device = torch.device(device)
    async_copy = non_blocking and device.type == "cuda"

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device == device:
                return x
            if async_copy and x.device.type == "cpu" and not x.is_pinned():
                x = x.pin_memory()
            return x.to(device, non_blocking=async_copy)
        if isinstance(x, Mapping):
            out = {k: move(v) for k, v in x.items()}
            try:
                return type(x)(out)  # keep OrderedDict, BatchEncoding and friends
            except TypeError:
                return out
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # named tuple
            return type(x)(*(move(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):  # e.g. FusionBatch: a moved copy
            return dataclasses.replace(x, **{f.name: move(getattr(x, f.name))
                                             for f in dataclasses.fields(x) if f.init})
        return x

    return move(obj)


# --- processes under torchrun ---------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join the process group: NCCL when this rank drives a
    CUDA device (made current first, as NCCL requires), gloo otherwise. Returns ``(rank, world)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info()


_SCOPE = threading.local()


@contextmanager
def every_rank() -> Iterator[None]:
    """Mark code that every rank runs with the same arguments (building a task, ``itrkit teach``):
    inside it, the offline steps shard their work over the ranks (:func:`work_ranks`). Outside it
    (e.g. rank 0's evaluation) they compute alone, so no rank waits on a collective the others skip."""
    depth = getattr(_SCOPE, "depth", 0)
    _SCOPE.depth = depth + 1
    try:
        yield
    finally:
        _SCOPE.depth = depth


def work_ranks() -> tuple[int, int]:
    """``(rank, world)`` to shard work over: the process group's inside :func:`every_rank`, else ``(0, 1)``."""
    return dist_info() if getattr(_SCOPE, "depth", 0) else (0, 1)


def comm_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.bool, torch.int8, torch.int16]
_MAX_DIMS = 6


def all_gather_tensor(t: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every rank's ``t`` (any shape; None where a rank has nothing), in rank order, on the CPU.
    The collective helpers here act over :func:`work_ranks` (identity outside :func:`every_rank`).

    The bytes travel unchanged (padded to the largest, then cut), so a gathered float is bitwise
    the one computed on its rank. Identity (``[t]``) without a process group."""
    rank, world = work_ranks()
    if world == 1:
        return [None if t is None else t.detach().cpu()]
    dev = comm_device()
    head = torch.zeros(2 + _MAX_DIMS, dtype=torch.long)
    if t is not None:
        if t.ndim > _MAX_DIMS or t.dtype not in _DTYPES:
            raise ValueError(f"all_gather_tensor: {t.ndim}-d {t.dtype} tensors are not supported")
        head[0], head[1] = 1 + _DTYPES.index(t.dtype), t.ndim
        head[2:2 + t.ndim] = torch.tensor(t.shape)
    heads = [torch.empty_like(head, device=dev) for _ in range(world)]
    dist.all_gather(heads, head.to(dev))
    table = [h.cpu().tolist() for h in heads]
    present = [h for h in table if h[0]]
    if not present:
        return [None] * world
    dtype = _DTYPES[present[0][0] - 1]
    if any(h[0] - 1 != _DTYPES.index(dtype) for h in present):
        raise ValueError("all_gather_tensor: ranks hold tensors of different dtypes")
    numel = [int(torch.tensor(h[2:2 + h[1]]).prod()) if h[0] else 0 for h in table]
    top = max(max(numel), 1)
    buf = torch.zeros(top, dtype=dtype, device=dev)
    if t is not None and t.numel():
        buf[:t.numel()] = t.detach().reshape(-1).to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return [p[:n].cpu().reshape(h[2:2 + h[1]]) if h[0] else None for p, n, h in zip(parts, numel, table)]


def broadcast_flags(flags: list[bool], src: int = 0) -> list[bool]:
    """Rank ``src``'s booleans on every rank (the same length everywhere; identity without a group)."""
    if work_ranks()[1] == 1:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags] or [0], dtype=torch.long, device=comm_device())
    dist.broadcast(t, src)
    return [bool(v) for v in t.cpu().tolist()[:len(flags)]]


def all_agree(flag: bool) -> bool:
    """True only when ``flag`` is true on every rank (a collective: every rank must call it)."""
    if work_ranks()[1] == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.long, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    if work_ranks()[1] > 1:
        dist.barrier()


def sharded(units: list[Any], compute: Any, mine: Iterable[Any] | None = None) -> Iterator[tuple[Any, Any]]:
    """``(unit, result)`` for every unit, in order, on every rank; rank r computes units
    r, r + world, … and the results are all-gathered round by round (memory: one unit per rank).

    ``compute(units) -> iterator of tensors`` runs over this rank's units (so it may prefetch), or
    pass ``mine`` = that iterator already made. Without a process group it is ``zip(units, compute(units))``.
    """
    rank, world = work_ranks()
    if world == 1:
        yield from zip(units, mine if mine is not None else compute(units))
        return
    it = iter(mine if mine is not None else compute(units[rank::world]))
    for base in range(0, len(units), world):
        own = next(it) if base + rank < len(units) else None
        parts = all_gather_tensor(own)
        for r, part in enumerate(parts):
            if base + r < len(units):
                yield units[base + r], part
