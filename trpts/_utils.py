"""Small helpers shared by the modules: model unwrapping and canonical parameter names."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's model under ``DistributedDataParallel``/``DataParallel`` and ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def model_type(model: nn.Module) -> type:
    """The model's own class, looking through the subclass ``FSDP<Name>`` that FSDP2's
    ``fully_shard`` gives a module it shards."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


def forget_autocast_casts(written: Iterable[Tensor]) -> None:
    """Autocast keeps, for its region, the low-precision copy of each weight it has cast; once
    values are written into such a weight in place that copy is stale (the next forward in the
    region would still use the old values), so after in-place writes it is dropped."""
    if any(torch.is_autocast_enabled(t.device.type) for t in written):
        torch.clear_autocast_cache()


def canonical_name(name: str) -> str:
    """Strip DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes from a parameter name."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


def iter_limited(iterable: Iterable[T], limit: int | None) -> Iterator[T]:
    """Iterate over ``iterable``, drawing at most ``limit`` items when given."""
    return iter(iterable) if limit is None else itertools.islice(iterable, limit)


def fmt_count(n: int) -> str:
    """Format an integer with thousands separators."""
    return f"{n:,}"


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``
    (atomic on one file system); the temporary file never survives a failure. The file gets the
    permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask), not
    ``mkstemp``'s owner-only ``0o600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)  # writers may re-create the file (safetensors does, owner-only): set the mode after
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
