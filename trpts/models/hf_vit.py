"""Adapter for Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (transformers >= 5.9:
blocks at ``vit.layers[i]``, attention ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from .._utils import model_type
from ..errors import TrptsValueError
from ._hf_config import HFConfigMixin
from .base import BlockForward, TokenAdapter, has_parameters


def _reducing_layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                            **kwargs: Any) -> Tensor:
    """transformers >= 5.9 ``ViTLayer.forward`` with the token reduction before the MLP."""
    residual = hidden_states
    hidden_states = self.layernorm_before(hidden_states)
    hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
    hidden_states = self.dropout(hidden_states)
    hidden_states = hidden_states + residual
    hidden_states = self._trpts_tokens.reduce(hidden_states)
    residual = hidden_states
    hidden_states = self.layernorm_after(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.dropout(hidden_states)
    return hidden_states + residual


class HFViTAdapter(HFConfigMixin, TokenAdapter):
    family = "hf-vit"
    description = "Hugging Face ViTModel / ViTForImageClassification (transformers >= 5.9)"
    block_name_pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    _CLASSES = ("ViTModel", "ViTForImageClassification")

    def matches(self, model: nn.Module) -> bool:
        return model_type(model).__module__.startswith("transformers.") and model_type(model).__name__ in self._CLASSES

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        return model.vit if hasattr(model, "vit") else model

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        vit = self._backbone(model)
        if not hasattr(vit, "layers"):
            raise TrptsValueError(f"{model_type(model).__name__} has no .layers: trpts needs transformers >= 5.9")
        return list(vit.layers)

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self._backbone(model).embeddings.patch_embeddings.projection

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def check_block(self, block: nn.Module) -> None:
        if type(block).__name__ != "ViTLayer" or not hasattr(block.attention, "q_proj"):
            raise TrptsValueError(f"token selection patches transformers >= 5.9 ViTLayer blocks only; got "
                                  f"{type(block).__name__}")

    @staticmethod
    def _heads(attention: nn.Module, head_dim: int) -> Callable[[Tensor], Tensor]:
        def to_heads(t: Tensor) -> Tensor:  # (B, N, H*d) -> (B, H, N, d)
            return t.view(*t.shape[:-1], -1, head_dim).transpose(1, 2)

        return to_heads

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
        attention = block.attention
        return attention.q_proj, attention.k_proj, self._heads(attention, attention.head_dim)

    def attention_scale(self, block: nn.Module) -> float:
        return float(block.attention.scaling)

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return block.attention, block.mlp

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward


    def heads(self, model: nn.Module) -> list[nn.Module]:
        head = getattr(model, "classifier", None)
        return [head] if has_parameters(head) else []
