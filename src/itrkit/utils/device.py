"""Where tensors live: ``--device auto|cpu|cuda|cuda:N|mps`` and moving nested batches there.

``auto`` (the default) picks CUDA if torch sees a GPU, else Apple's MPS, else the CPU. Under
``torchrun`` (``LOCAL_RANK`` set) ``auto`` and a bare ``cuda`` mean ``cuda:LOCAL_RANK``, so each
process drives its own GPU without extra flags. An unavailable or malformed device is one
:class:`DeviceError` line naming it; commands resolve the device before writing anything, so
``--device cuda`` on a machine without CUDA exits 2 with nothing written.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

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


def add_device_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """Add ``--device`` to a command's parser (validated later by :func:`resolve_device`)."""
    parser.add_argument("--device", default=default, metavar="DEVICE", help=DEVICE_HELP)


def move_to(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples, named tuples, nested) on ``device``.

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
        return x

    return move(obj)
