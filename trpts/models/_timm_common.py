"""What the timm adapters share: a timm model class whose ``blocks`` are the transformer blocks
and whose ``patch_embed.proj`` is the patch-embedding projection."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from .base import ModelAdapter
from .generic import conventional_heads


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model by name, with random weights (``timm.create_model(name, pretrained=False)``):
    nothing is downloaded."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


class TimmBlocksAdapter(ModelAdapter):
    """Base of the timm adapters; subclasses set ``_timm_class`` (``"module:Class"``) and, without
    token support, ``tokens_unsupported`` (the reason ``wrap_vit`` gives)."""

    block_name_pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
    _timm_class: ClassVar[str]

    def matches(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        import importlib

        module, name = self._timm_class.split(":")
        return isinstance(model, getattr(importlib.import_module(module), name))

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.patch_embed, "proj", None)

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return conventional_heads(model)

    def architecture(self, model: nn.Module) -> str:
        """``Class:timm_name`` from the model's ``pretrained_cfg`` (the class name alone without it)."""
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        return type(model).__name__ + (f":{arch}" if arch else "")
