"""Adapter for Hugging Face ``ViTModel`` / ``ViTForImageClassification``.

Handles both module layouts: transformers 4.x-5.8 (``vit.encoder.layer[i]``) and
5.9+ (``vit.layers[i]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import TrptsValueError
from .base import BlockForward, ModelAdapter


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


def _reducing_layer_forward_v4(self: nn.Module, hidden_states: Tensor, head_mask: Tensor | None = None,
                               output_attentions: bool = False, *args: Any, **kwargs: Any) -> Any:
    """transformers 4.x - 5.8 ``ViTLayer.forward`` (``attention.attention`` / ``intermediate`` /
    ``output`` layout) with the token reduction before the MLP."""
    outputs = self.attention(self.layernorm_before(hidden_states), head_mask, output_attentions)
    attention_output = outputs[0] if isinstance(outputs, tuple) else outputs
    hidden_states = attention_output + hidden_states
    hidden_states = self._trpts_tokens.reduce(hidden_states)
    layer_output = self.layernorm_after(hidden_states)
    layer_output = self.intermediate(layer_output)
    layer_output = self.output(layer_output, hidden_states)
    return (layer_output, *outputs[1:]) if isinstance(outputs, tuple) else layer_output


# (transformers 4.x - 5.8 name, 5.9+ name): the renames transformers applies when it loads old
# checkpoints, in this order. Delta files store 5.9+ names; loaders map them to the model's layout.
_RENAMES = (
    (".encoder.layer.", ".layers."),
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


def _rename(name: str, to_new: bool) -> str:
    """Map a parameter name between the two layouts (a no-op for names they share)."""
    dotted = "." + name  # so that a leading "encoder.layer." (ViTModel) matches too
    for old, new in _RENAMES:
        dotted = dotted.replace(old, new) if to_new else dotted.replace(new, old)
    return dotted[1:]


class HFViTAdapter(ModelAdapter):
    family = "hf-vit"
    description = "Hugging Face ViTModel / ViTForImageClassification (transformers 4.x and 5.x layouts)"
    supports_tokens = True
    block_name_pattern = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")

    _CLASSES = ("ViTModel", "ViTForImageClassification")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and type(model).__name__ in self._CLASSES

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        return model.vit if hasattr(model, "vit") else model

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        vit = self._backbone(model)
        if hasattr(vit, "layers"):  # transformers >= 5.9
            return list(vit.layers)
        return list(vit.encoder.layer)  # transformers 4.x - 5.8

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self._backbone(model).embeddings.patch_embeddings.projection

    def canonical_name(self, name: str) -> str:
        return _rename(name, to_new=True)

    def local_name(self, canonical: str, model: nn.Module) -> str:
        blocks = self.blocks(model)
        old_layout = bool(blocks) and not hasattr(blocks[0].attention, "q_proj")
        return _rename(canonical, to_new=False) if old_layout else canonical

    def check_token_support(self, model: nn.Module) -> None:
        return None  # the encoder starts with the [CLS] token; heads and pooler read token 0

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def check_block(self, block: nn.Module) -> None:
        if type(block).__name__ != "ViTLayer":
            raise TrptsValueError(f"token selection patches ViTLayer blocks only; got {type(block).__name__}")

    @staticmethod
    def _heads(attention: nn.Module, head_dim: int) -> Callable[[Tensor], Tensor]:
        def to_heads(t: Tensor) -> Tensor:  # (B, N, H*d) -> (B, H, N, d)
            return t.view(*t.shape[:-1], -1, head_dim).transpose(1, 2)

        return to_heads

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
        attention = block.attention
        if hasattr(attention, "q_proj"):  # transformers >= 5.9
            return attention.q_proj, attention.k_proj, self._heads(attention, attention.head_dim)
        inner = attention.attention  # transformers 4.x - 5.8
        return inner.query, inner.key, self._heads(inner, inner.attention_head_size)

    def attention_scale(self, block: nn.Module) -> float:
        attention = block.attention
        if hasattr(attention, "q_proj"):
            return float(attention.scaling)
        inner = attention.attention
        return float(getattr(inner, "scaling", inner.attention_head_size ** -0.5))

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        if hasattr(block, "mlp"):  # transformers >= 5.9
            return block.attention, block.mlp
        return block.attention, nn.ModuleList([block.intermediate, block.output])

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward if hasattr(block.attention, "q_proj") else _reducing_layer_forward_v4

    def heads(self, model: nn.Module) -> list[nn.Module]:
        head = getattr(model, "classifier", None)
        return [head] if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else []
