"""Adapter for timm ``VisionTransformer`` (and subclasses such as DeiT ``VisionTransformerDistilled``)."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import Tensor, nn

from .._token_flow import pool_by_size
from ..errors import TrptsValueError
from ._timm_common import TimmBlocksAdapter, pooling_flops
from .base import (
    BlockForward,
    Removable,
    Restore,
    TokenAdapter,
    has_parameters,
    pool_linear_weights,
    scores_for,
)


def _reducing_block_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None,
                            is_causal: bool = False) -> Tensor:
    """timm ``Block.forward`` with the token reduction between attention and MLP."""
    if attn_mask is not None or is_causal:
        raise TrptsValueError("token selection does not support attention masks (attn_mask/is_causal)")
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
    x = self._trpts_tokens.reduce(x)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


def _size_aware_pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm ``VisionTransformer.pool`` over tokens that stand for several patches: ``'avg'`` is
    the size-weighted mean, attention pooling adds ``log(size)`` to its logits."""
    p = self.num_prefix_tokens
    sizes, _ = self._trpts_flow.current(x.shape[0], x.shape[1] - p)
    mean = (self.global_pool if pool_type is None else pool_type) == "avg"
    if sizes is None or (self.attn_pool is None and not mean):  # nothing merged, or [CLS] / no pooling
        return type(self).pool(self, x, pool_type)
    return pool_by_size(x, sizes, p, include_prefix=self.pool_include_prefix, attn_pool=self.attn_pool)


POOLS = ("token", "avg", "map", "")  # what token selection reads correctly (pool_type values)


class TimmViTAdapter(TimmBlocksAdapter, TokenAdapter):
    family = "timm-vit"
    description = ("timm VisionTransformer (ViT, DeiT, DeiT distilled, SigLIP; CLS/register tokens, LayerScale, "
                   "qk_norm; [CLS], avg or attention pooling)")
    _timm_class = "timm.models.vision_transformer:VisionTransformer"

    def scored_parameters(self, model: nn.Module) -> list[str]:
        # SigLIP-style attention pooling (global_pool='map') is pretrained: its linears are scored
        return pool_linear_weights(model, super().scored_parameters(model))

    def check_token_support(self, model: nn.Module) -> None:
        pool = "map" if getattr(model, "attn_pool", None) is not None else model.global_pool
        if pool not in POOLS or (pool == "map" and type(model.attn_pool).__name__ != "AttentionPoolLatent"):
            raise TrptsValueError(
                f"token selection supports timm global_pool in {sorted(POOLS)} (attention pooling: "
                f"AttentionPoolLatent); this model pools with global_pool={model.global_pool!r}"
                f"{'' if pool != 'map' else f' ({type(model.attn_pool).__name__})'}, which would read a "
                "merged token as one patch. Create the model with one of those"
            )

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        return scores_for(getattr(model, "cls_token", None) is not None,
                          model.global_pool == "token" and getattr(model, "attn_pool", None) is None)

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        if getattr(model, "attn_pool", None) is None and model.global_pool != "avg":
            return []  # 'token' reads [CLS]; '' returns every token (see trpts.token_sizes)
        model.pool = types.MethodType(_size_aware_pool, model)
        return [Restore(model, ["pool"])]

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        pooled = num_tokens if model.pool_include_prefix else num_tokens - self.num_prefix_tokens(model)
        return super().pool_flops(model, num_tokens, reduced) + pooling_flops(
            model, self.heads(model), num_tokens, reduced, pooled)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def check_block(self, block: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        if type(block) is not Block or type(block.attn) is not Attention:
            raise TrptsValueError(
                f"token selection patches timm Block/Attention only; this model has {type(block).__name__}"
                f"/{type(getattr(block, 'attn', None)).__name__}"
            )

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
        # q_norm / k_norm (Identity without qk_norm) output (B, H, N, d): exactly what SDPA sees.
        return block.attn.q_norm, block.attn.k_norm, lambda t: t

    def attention_scale(self, block: nn.Module) -> float:
        return float(block.attn.scale)

    def attention_width(self, block: nn.Module) -> int:
        return int(block.attn.qkv.out_features) // 3  # fused q, k, v

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return block.attn, block.mlp

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_block_forward

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return [m for attr in ("head", "head_dist") if has_parameters(m := getattr(model, attr, None))]
