"""The interface every model-family adapter implements.

An adapter knows where a family keeps its transformer blocks, its patch-embedding
projection and its classification head. Everything else (which weights are scored,
which block a parameter belongs to) is derived here from module *types* and module
*identity*, never from name patterns, so it survives DDP/compile prefixes and renames.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import UnsupportedModelError

#: A block forward ``(block, x, *args, **kwargs) -> x`` that calls
#: ``block._trpts_tokens.reduce(x)`` after the attention residual and before the MLP.
BlockForward = Callable[..., Any]


def has_parameters(module: object) -> bool:
    """Whether ``module`` is an ``nn.Module`` with at least one parameter."""
    return isinstance(module, nn.Module) and any(True for _ in module.parameters())


def pool_linear_weights(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` plus the weights of every ``nn.Linear`` in ``model.attn_pool`` (model order)."""
    pool = getattr(model, "attn_pool", None)
    if not isinstance(pool, nn.Module):
        return names
    extra = {id(m.weight) for m in pool.modules() if isinstance(m, nn.Linear)}
    keep = set(names)
    return [n for n, p in model.named_parameters() if n in keep or id(p) in extra]


class ModelAdapter(ABC):
    """Model-family knowledge behind one small interface (one subclass per family file)."""

    #: Short identifier stored in selections and delta files, e.g. ``"timm-vit"``.
    family: ClassVar[str]
    #: Human-readable description used in error messages.
    description: ClassVar[str]
    #: Matches a canonical parameter name of this family; group 1 is the block index.
    #: Only used when no model is at hand (e.g. ``allocate_connections`` on a plain dict).
    block_name_pattern: ClassVar[re.Pattern[str]]
    #: Whether the token-selection methods below are implemented (``wrap_vit``).
    supports_tokens: ClassVar[bool] = False

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

    # ---- parameter names in files (override where a family renamed its modules) ----
    def canonical_name(self, name: str) -> str:
        """The layout-independent name of a parameter, as stored in delta files."""
        return name

    def local_name(self, canonical: str, model: nn.Module) -> str:
        """The name ``model`` uses for a parameter stored under ``canonical``."""
        return canonical

    # ---- token selection (override to support wrap_vit) ------------------------------
    def check_token_support(self, model: nn.Module) -> None:
        """Raise a clear trpts error if token selection cannot run on this model."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """P: the leading tokens (CLS first, then distillation / register tokens) never merged."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

    def check_block(self, block: nn.Module) -> None:
        """Raise a clear trpts error if this block's type cannot be patched."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
        """Modules whose outputs are the block's queries and keys, and a function turning such an
        output into ``(B, H, N, d)`` (queries/keys exactly as the attention uses them)."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

    def attention_scale(self, block: nn.Module) -> float:
        """The scale the block's attention multiplies ``q k^T`` by."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The block's attention part (runs on all input tokens) and MLP part (runs on the
        tokens left after the reduction), for FLOP counting."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        """The block's forward with the reducing step between attention and MLP."""
        raise UnsupportedModelError(f"token selection is not implemented for the {self.family} family")

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
