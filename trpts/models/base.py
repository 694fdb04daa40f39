"""The interface every model-family adapter implements.

An adapter knows where a family keeps its transformer blocks, its patch-embedding
projection and its classification head. Everything else (which weights are scored,
which block a parameter belongs to) is derived here from module *types* and module
*identity*, never from name patterns, so it survives DDP/compile prefixes and renames.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import nn


class ModelAdapter(ABC):
    """Model-family knowledge behind one small interface (one subclass per family file)."""

    #: Short identifier stored in selections and delta files, e.g. ``"timm-vit"``.
    family: ClassVar[str]
    #: Human-readable description used in error messages.
    description: ClassVar[str]
    #: Matches a canonical parameter name of this family; group 1 is the block index.
    #: Only used when no model is at hand (e.g. ``allocate_connections`` on a plain dict).
    block_name_pattern: ClassVar[re.Pattern[str]]

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` (already unwrapped) belongs to this family."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in forward order."""

    @abstractmethod
    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        """The patch-embedding projection (usually an ``nn.Conv2d``), if any."""

    @abstractmethod
    def heads(self, model: nn.Module) -> list[nn.Module]:
        """The classification head module(s); empty for a bare backbone."""

    # ---- derived helpers (shared by all families) ---------------------------------
    def scored_parameters(self, model: nn.Module) -> list[str]:
        """Default Fisher/selection targets: weights of every ``nn.Linear`` inside the
        blocks and the patch-embedding projection's weight (canonical names, model order)."""
        wanted: set[int] = set()
        for block in self.blocks(model):
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    wanted.add(id(module.weight))
        patch = self.patch_embedding(model)
        if patch is not None and isinstance(getattr(patch, "weight", None), nn.Parameter):
            wanted.add(id(patch.weight))
        return [name for name, p in model.named_parameters() if id(p) in wanted]

    def head_parameters(self, model: nn.Module) -> list[str]:
        """Canonical names of the classification head's parameters."""
        wanted = {id(p) for head in self.heads(model) for p in head.parameters()}
        return [name for name, p in model.named_parameters() if id(p) in wanted]

    def block_index(self, model: nn.Module) -> dict[str, int]:
        """Map each parameter name inside a block to that block's index."""
        owner: dict[int, int] = {}
        for i, block in enumerate(self.blocks(model)):
            for p in block.parameters():
                owner.setdefault(id(p), i)
        return {name: owner[id(p)] for name, p in model.named_parameters() if id(p) in owner}
