"""Model-family adapters: one file per family, one small interface (:class:`ModelAdapter`).

Adding a family is adding a file with a :class:`ModelAdapter` subclass and calling
:func:`register_adapter` (or listing it in ``ADAPTERS`` below). A model no family matches gets
:class:`GenericAdapter` (parameter selection, storages and deltas; no token selection).
"""

from __future__ import annotations

from torch import nn

from .._utils import unwrap_model
from ..errors import TrptsError, UnsupportedModelError
from .base import ModelAdapter
from .generic import GenericAdapter
from .hf_beit import HFBeitAdapter
from .hf_clip import HFCLIPVisionAdapter
from .hf_deit import HFDeiTAdapter
from .hf_dinov2 import HFDinov2Adapter
from .hf_siglip import HFSiglipVisionAdapter
from .hf_vit import HFViTAdapter
from .timm_beit import TimmBeitAdapter
from .timm_eva import TimmEvaAdapter
from .timm_vit import TimmViTAdapter

__all__ = [
    "ADAPTERS",
    "GENERIC",
    "GenericAdapter",
    "ModelAdapter",
    "block_index_from_name",
    "find_adapter",
    "get_adapter",
    "get_token_adapter",
    "register_adapter",
    "supported_families",
]

ADAPTERS: list[ModelAdapter] = [TimmViTAdapter(), HFViTAdapter(), TimmEvaAdapter(), TimmBeitAdapter(),
                                HFDeiTAdapter(), HFDinov2Adapter(), HFCLIPVisionAdapter(),
                                HFSiglipVisionAdapter(), HFBeitAdapter()]
#: The fallback for models no family adapter matches.
GENERIC = GenericAdapter()


def register_adapter(adapter: ModelAdapter) -> None:
    """Make a new model family known to trpts (checked before the built-in ones)."""
    ADAPTERS.insert(0, adapter)


def supported_families(tokens: bool = False) -> str:
    """One line per family with an adapter (``tokens``: only those with token selection)."""
    return "\n".join(f"  - {a.family}: {a.description}" for a in ADAPTERS
                     if not tokens or a.supports_tokens)


def find_adapter(model: nn.Module) -> ModelAdapter | None:
    """The family adapter for ``model`` (DDP/compile wrappers removed), or ``None``."""
    base = unwrap_model(model)
    for adapter in ADAPTERS:
        if adapter.matches(base):
            return adapter
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The family adapter for ``model``, else :data:`GENERIC` (any ``nn.Module``)."""
    adapter = find_adapter(model)
    return GENERIC if adapter is None else adapter


def get_token_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for token selection on ``model``; raises :class:`UnsupportedModelError`
    naming the families that support it."""
    adapter = get_adapter(model)
    if not adapter.supports_tokens:
        base = unwrap_model(model)
        try:
            adapter.check_token_support(base)
            reason = ""
        except TrptsError as err:  # the family's own reason
            reason = f" ({err})"
        raise UnsupportedModelError(
            f"token selection (wrap_vit) needs a family adapter with token support; "
            f"{type(base).__qualname__} is {adapter.family}{reason}. Families with token selection:\n"
            f"{supported_families(tokens=True)}\n"
            "Parameter selection (compute_fisher, allocate_connections, apply_masks, deltas) works "
            "on any model."
        )
    return adapter


def block_index_from_name(name: str) -> int | None:
    """Block index parsed from a canonical parameter name of any known family, else ``None``."""
    for adapter in (*ADAPTERS, GENERIC):
        match = adapter.block_name_pattern.search(name)
        if match:
            return int(match.group(1))
    return None
