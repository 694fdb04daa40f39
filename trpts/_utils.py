"""Small helpers shared by the modules: model unwrapping and canonical parameter names."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

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


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the unwrapped model keyed by canonical name (shared parameters once)."""
    return dict(unwrap_model(model).named_parameters())


def iter_limited(iterable: object, limit: int | None) -> Iterator[object]:
    """Iterate over ``iterable``, stopping after ``limit`` items when given."""
    for i, item in enumerate(iterable):  # type: ignore[call-overload]
        if limit is not None and i >= limit:
            return
        yield item


def fmt_count(n: int) -> str:
    """Format an integer with thousands separators."""
    return f"{n:,}"
