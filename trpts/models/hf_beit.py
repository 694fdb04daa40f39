"""Adapter for Hugging Face BEiT: ``BeitModel`` and ``BeitForImageClassification`` (LayerScale
``lambda_1`` / ``lambda_2``, optional relative position bias per layer or shared, mean pooling by
default).

Token selection: Hugging Face BEiT hands the relative position bias to every attention as its
``attention_mask``; a forward pre-hook on each attention gathers that bias at the original
positions of the tokens it sees once tokens were merged (``(B, H, n, n)``, 0 in the merged token's
row and column), and a forward hook makes the mean-pooling pooler size-weighted (docs/tokens.md).
No Hugging Face code is copied but the reducing layer's forward. ``interpolate_pos_encoding`` is
refused with token selection (the bias would be resized to the reduced token count).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .._token_flow import TokenFlow, gather_pair_bias, weighted_mean
from ..errors import TrptsValueError
from ._hf_common import HFVisionTokenAdapter
from .base import BlockForward, Removable, scores_for


def _reducing_layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                            interpolate_pos_encoding: bool = False, resolution: tuple[int, int] | None = None,
                            **kwargs: Any) -> Tensor:
    """transformers 5.x ``BeitLayer.forward`` with the token reduction before the MLP."""
    if interpolate_pos_encoding:
        raise TrptsValueError("token selection does not support interpolate_pos_encoding=True on BEiT: the "
                              "relative position bias would be resized to the reduced token count")
    if self.relative_position_bias is not None:
        height, width = resolution
        own = self.relative_position_bias((height // self.patch_size, width // self.patch_size), False,
                                          dim_size=hidden_states.shape[1])
        attention_mask = own + attention_mask if attention_mask is not None else own
    residual = hidden_states
    hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask=attention_mask, **kwargs)
    hidden_states = self.drop_path(self.lambda_1 * self.dropout(hidden_states)) + residual
    hidden_states = self._trpts_tokens.reduce(hidden_states)
    residual = hidden_states
    hidden_states = self.lambda_2 * self.dropout(self.mlp(self.layernorm_after(hidden_states)))
    return self.drop_path(hidden_states) + residual


@dataclass
class _GatherBias:
    """Forward pre-hook of a ``BeitAttention``: its ``attention_mask`` (the relative position bias)
    at the tokens of a reduced pass."""

    flow: TokenFlow

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bias, x = kwargs.get("attention_mask"), args[0] if args else kwargs["hidden_states"]
        if bias is None or bias.shape[-1] == x.shape[1]:
            return None
        _, positions = self.flow.current(x.shape[0], x.shape[1] - 1)
        if positions is None:
            return None
        return args, {**kwargs, "attention_mask": gather_pair_bias(bias, positions, 1)}


@dataclass
class _SizeWeightedPooler:
    """Forward hook of a mean-pooling ``BeitPooler``: the mean over patch tokens weighted by size."""

    flow: TokenFlow

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        tokens = args[0]
        sizes, _ = self.flow.current(tokens.shape[0], tokens.shape[1] - 1)
        return None if sizes is None else module.layernorm(weighted_mean(tokens[:, 1:], sizes))


class HFBeitAdapter(HFVisionTokenAdapter):
    family = "hf-beit"
    description = ("Hugging Face BeitModel / BeitForImageClassification (relative position bias gathered "
                   "per token, size-weighted mean pooling)")

    _CLASSES = ("BeitModel", "BeitForImageClassification")
    _BACKBONES = ("beit",)
    _LAYERS = ("BeitLayer",)
    _PARTS = ("layernorm_before", "layernorm_after", "mlp", "dropout", "drop_path", "lambda_1", "lambda_2")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embeddings.projection

    def check_block(self, block: nn.Module) -> None:
        named = [p.name for p in inspect.signature(type(block).forward).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if type(block).__name__ != "BeitLayer" or named != ["self", "hidden_states", "attention_mask",
                                                            "interpolate_pos_encoding", "resolution"] \
                or not hasattr(block.attention, "q_proj") or not all(hasattr(block, p) for p in self._PARTS):
            raise TrptsValueError(f"hf-beit token selection needs the transformers 5.x BeitLayer layout; got "
                                  f"{type(block).__name__}({', '.join(named[1:])})")

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        pooler = self.backbone(model).pooler
        return scores_for(True, pooler is None or pooler.layernorm is None)

    def tracks_positions(self, model: nn.Module) -> bool:
        config = self.backbone(model).config
        return bool(config.use_relative_position_bias or config.use_shared_relative_position_bias)

    def patch_positions(self, model: nn.Module, blocks: Any) -> list[Removable]:
        if not self.tracks_positions(model):
            return []
        return [b.attention.register_forward_pre_hook(_GatherBias(model._trpts_flow), with_kwargs=True)
                for b in blocks]

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        pooler = self.backbone(model).pooler
        if pooler is None or pooler.layernorm is None:
            return []  # pooled by [CLS]
        return [pooler.register_forward_hook(_SizeWeightedPooler(model._trpts_flow))]

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        flops = super().pool_flops(model, num_tokens, reduced)
        pooler = self.backbone(model).pooler
        if reduced and pooler is not None and pooler.layernorm is not None:
            flops += 2 * (num_tokens - 1) * self.backbone(model).config.hidden_size
        return flops

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward
