"""How much memory a teacher takes, measured before it is allocated, and the bound it must
fit (`--max-teacher-bytes`; default: the memory available when the teacher is loaded).

A model is measured by building it on the meta device (shapes, no storage) and summing the
bytes of its parameters and buffers: `sum(numel * itemsize)`. A spec naming a model past the
bound is refused in one line before a byte of it is allocated (a 6 KB checkpoint whose
`model_spec` named a 30000-wide MLP allocated 3.6 GB first)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from softlabels.errors import SpecError

log = logging.getLogger(__name__)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: psutil where installed, else Linux's
    MemAvailable, else free pages (os.sysconf); None where none of these answers."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001  (not installed, or no answer on this platform)
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def resolve_bound(max_bytes: int | None) -> int | None:
    """The bound a teacher must fit: `max_bytes` as given, else the memory available now
    (None: nothing to bound by, on a platform that does not say)."""
    return max_bytes if max_bytes is not None else available_memory()


def module_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (works on the meta device: no storage)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def skeleton_bytes(build: Callable[[], nn.Module]) -> int | None:
    """Bytes of the model `build` makes, measured on the meta device; None where its
    constructor cannot run there (it computes on its tensors: the real build goes ahead)."""
    try:
        with torch.device("meta"):
            return module_bytes(build())
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001  (any constructor error: the real build reports it)
        log.debug("cannot measure on the meta device: %s", exc)
        return None


def human(n: int) -> str:
    """Bytes for a message, in the binary units `--max-teacher-bytes` takes: 3.6 TiB, 12.0 KiB."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def refuse_past_bound(need: int, bound: int | None, what: str) -> None:
    """Refuse `what` (needing `need` bytes) in one line where it does not fit `bound`."""
    if bound is None or need <= bound:
        return
    raise SpecError(f"{what} takes {human(need)} ({need} bytes, measured before allocating), "
                    f"more than the {human(bound)} ({bound} bytes) allowed for it "
                    "(--max-teacher-bytes, by default the memory available, less the "
                    "ensemble's members before it); nothing was allocated. Use a smaller "
                    "model, free memory, or raise --max-teacher-bytes")
