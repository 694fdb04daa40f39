"""What the timm adapters share: a timm model class whose ``blocks`` are the transformer blocks
and whose ``patch_embed.proj`` is the patch-embedding projection."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter
from .generic import conventional_heads


class TimmBlocksAdapter(ModelAdapter):
    """Base of the timm adapters; subclasses set ``_timm_class`` (``"module:Class"``) and, without
    token support, ``_tokens_unsupported`` (the reason ``wrap_vit`` gives)."""

    block_name_pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
    _timm_class: ClassVar[str]
    _tokens_unsupported: ClassVar[str] = ""

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

    def check_token_support(self, model: nn.Module) -> None:
        raise UnsupportedModelError(self._tokens_unsupported)
