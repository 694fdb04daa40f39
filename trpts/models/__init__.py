"""Model-family adapters: one file per family, one small interface (:class:`ModelAdapter`).

Adding a family is adding a file with a :class:`ModelAdapter` subclass and calling
:func:`register_adapter` (or listing it in ``ADAPTERS`` below).
"""

from __future__ import annotations

from torch import nn

from .._utils import unwrap_model
from ..errors import UnsupportedModelError
from .base import ModelAdapter
from .hf_vit import HFViTAdapter
from .timm_vit import TimmViTAdapter

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "block_index_from_name",
    "find_adapter",
    "get_adapter",
    "register_adapter",
    "supported_families",
]

ADAPTERS: list[ModelAdapter] = [TimmViTAdapter(), HFViTAdapter()]


def register_adapter(adapter: ModelAdapter) -> None:
    """Make a new model family known to trpts (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def supported_families() -> str:
    """One line per supported family, for error messages."""
    return "\n".join(f"  - {a.family}: {a.description}" for a in ADAPTERS)


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    """The adapter for ``model`` (DDP/compile wrappers removed), or ``None``."""
    base = unwrap_model(model)
    for adapter in ADAPTERS:
        if adapter.matches(base):
            return adapter
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` naming the supported families."""
    adapter = find_adapter(model)
    if adapter is None:
        name = type(unwrap_model(model)).__qualname__
        raise UnsupportedModelError(
            f"trpts has no adapter for {name}. Supported families:\n{supported_families()}\n"
            "For other models pass explicit parameter names (compute_fisher(params=...), "
            "apply_masks(train_head=False, extra_trainable=...))."
        )
    return adapter


def block_index_from_name(name: str) -> int | None:
    """Block index parsed from a canonical parameter name of any known family, else ``None``."""
    for adapter in ADAPTERS:
        match = adapter.block_name_pattern.search(name)
        if match:
            return int(match.group(1))
    return None
