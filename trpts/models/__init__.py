"""Model-family adapters: one file per family, one small interface (:class:`ModelAdapter`).

Adding a family is adding a file here with a :class:`ModelAdapter` subclass (a
:class:`TokenAdapter` subclass for a family with token selection) that sets ``family``: it is
found at import. Code outside trpts calls :func:`register_adapter` instead. A model no family matches gets
:class:`GenericAdapter` (parameter selection, storages and deltas; no token selection).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

from .._utils import model_type, unwrap_model
from ..errors import UnsupportedModelError
from .base import ModelAdapter, TokenAdapter
from .generic import GenericAdapter

__all__ = [
    "ADAPTERS",
    "GENERIC",
    "GenericAdapter",
    "ModelAdapter",
    "TokenAdapter",
    "block_index_from_name",
    "find_adapter",
    "get_adapter",
    "get_token_adapter",
    "register_adapter",
    "supported_families",
]


def _discover() -> list[ModelAdapter]:
    """One instance of every concrete adapter class defined in this package's family files
    (modules not starting with ``_``, besides ``base`` and ``generic``), in file-name order."""
    found: list[ModelAdapter] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("base", "generic"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in vars(module).values():
            if (isinstance(cls, type) and issubclass(cls, ModelAdapter) and cls.__module__ == module.__name__
                    and not inspect.isabstract(cls) and "family" in vars(cls)):
                found.append(cls())
    return found


#: Every built-in family's adapter: one file each in ``trpts/models/``, found at import.
ADAPTERS: list[ModelAdapter] = _discover()
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


def get_token_adapter(model: nn.Module) -> TokenAdapter:
    """The adapter for token selection on ``model``; raises :class:`UnsupportedModelError`
    naming the families that support it (the model's own family's reason first)."""
    adapter = get_adapter(model)
    if not isinstance(adapter, TokenAdapter):
        base = unwrap_model(model)
        raise UnsupportedModelError(
            f"token selection (wrap_vit) needs a family adapter with token support; "
            f"{model_type(base).__qualname__} is {adapter.family} ({adapter.tokens_unsupported}). Families with "
            f"token selection:\n{supported_families(tokens=True)}\n"
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
