"""Adapter for timm ``VisionTransformer`` (and subclasses such as DeiT ``VisionTransformerDistilled``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..errors import TrptsValueError
from ._timm_common import TimmBlocksAdapter
from .base import BlockForward, TokenAdapter, has_parameters, pool_linear_weights


def _reducing_block_forward(self: nn.Module, x: Tensor, attn_mask: Tensor | None = None,
                            is_causal: bool = False) -> Tensor:
    """timm ``Block.forward`` with the token reduction between attention and MLP."""
    if attn_mask is not None or is_causal:
        raise TrptsValueError("token selection does not support attention masks (attn_mask/is_causal)")
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
    x = self._trpts_tokens.reduce(x)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


class TimmViTAdapter(TimmBlocksAdapter, TokenAdapter):
    family = "timm-vit"
    description = "timm VisionTransformer (ViT, DeiT, DeiT distilled; CLS/register tokens, LayerScale, qk_norm)"
    _timm_class = "timm.models.vision_transformer:VisionTransformer"

    def scored_parameters(self, model: nn.Module) -> list[str]:
        # SigLIP-style attention pooling (global_pool='map') is pretrained: its linears are scored
        return pool_linear_weights(model, super().scored_parameters(model))

    def check_token_support(self, model: nn.Module) -> None:
        if getattr(model, "cls_token", None) is None:
            raise TrptsValueError("token selection scores tokens by [CLS] attention (eq. 8); this timm "
                                  "model has no class token (class_token=False)")
        if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
            raise TrptsValueError(
                f"token selection needs global_pool='token' (the head reads the [CLS] token); this model "
                f"pools with global_pool={model.global_pool!r}, which reads the patch tokens, and a merged "
                "token would count as one patch. Create the model with global_pool='token'"
            )

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
