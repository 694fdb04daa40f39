"""Adapter for timm ``Eva`` (EVA, EVA-02, Perception Encoder), with token selection under RoPE.

Blocks are ``EvaBlock`` / ``EvaBlockPostNorm`` with fused ``qkv`` or separate ``q_proj`` /
``k_proj`` / ``v_proj`` and (SwiGLU) MLPs; every ``nn.Linear`` weight in them is scored, plus
the patch projection and, for ``global_pool='map'``, the pretrained attention pool's linear
weights. The head (``get_classifier()``) is trained in full.

Token selection: rotary position embeddings are applied per token inside attention, so after a
reduction every block's attention gets the rotary table gathered at the original positions of the
tokens it sees, per sample (timm's own ``PatchDropout`` convention, ``apply_keep_indices_nlc``).
The merged token has no single position: it gets the identity rotation (``sin = 0, cos = 1``),
so it interacts with every other token by content alone. Scores use the rotated queries and keys,
exactly as the attention does. Mean and attention pooling are size-aware (docs/tokens.md).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._token_flow import TokenFlow, pool_by_size
from ..errors import TrptsValueError
from ._timm_common import TimmBlocksAdapter, pooling_flops
from .base import BlockForward, Removable, Restore, TokenAdapter, pool_linear_weights, scores_for

POOLS = ("token", "avg", "map", "")


def _refuse_masks(attn_mask: Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise TrptsValueError("token selection does not support attention masks (attn_mask/is_causal)")


def _reducing_block_forward(self: nn.Module, x: Tensor, rope: Tensor | None = None,
                            attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``EvaBlock.forward`` with the token reduction between attention and MLP."""
    _refuse_masks(attn_mask, is_causal)
    x_attn = self.attn(self.norm1(x), rope=rope)
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = self._trpts_tokens.reduce(x + self.drop_path1(x_attn))
    x_mlp = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    return x + self.drop_path2(x_mlp)


def _reducing_post_norm_forward(self: nn.Module, x: Tensor, rope: Tensor | None = None,
                                attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm ``EvaBlockPostNorm.forward`` with the token reduction between attention and MLP."""
    _refuse_masks(attn_mask, is_causal)
    x = self._trpts_tokens.reduce(x + self.drop_path1(self.norm1(self.attn(x, rope=rope))))
    return x + self.drop_path2(self.norm2(self.mlp(x)))


@dataclass
class _Rope:
    """Per attention module: gives it the rotary table of the tokens it sees (a forward pre-hook)
    and rotates captured queries / keys as it does (for the scores)."""

    flow: TokenFlow
    num_prefix_tokens: int
    half: bool
    rope: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        rope = kwargs.get("rope")
        if rope is not None:
            x = args[0] if args else kwargs["x"]
            rope = self.gathered(rope, x.shape[0], x.shape[1] - self.num_prefix_tokens)
            kwargs = {**kwargs, "rope": rope}
        self.rope = rope
        return args, kwargs

    def gathered(self, rope: Tensor, batch: int, n: int) -> Tensor:
        """``rope`` (``(N, D)`` or per head ``(H, N, D)``) at the original positions of the ``n``
        tokens of this pass: ``(B, 1, n, D)`` / ``(B, H, n, D)``; identity rows for merged tokens.
        Unchanged when nothing was merged yet."""
        _, positions = self.flow.current(batch, n)
        if positions is None:
            return rope
        table = rope if rope.ndim == 3 else rope.unsqueeze(0)  # (H or 1, N, D)
        rows = table[:, positions.clamp_min(0)].transpose(0, 1)  # (B, H or 1, n, D)
        half = rope.shape[-1] // 2  # [sin | cos]: the identity rotation is sin = 0, cos = 1
        identity = torch.cat([rope.new_zeros(half), rope.new_ones(rope.shape[-1] - half)])
        return torch.where((positions >= 0)[:, None, :, None], rows, identity)

    def rotate(self, t: Tensor) -> Tensor:
        """``(B, H, N, d)`` queries or keys rotated as the attention rotates them."""
        if self.rope is None:
            return t
        from timm.layers import apply_rot_embed_cat

        p = self.num_prefix_tokens
        return torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], self.rope, half=self.half)], dim=2).type_as(t)


class TimmEvaAdapter(TimmBlocksAdapter, TokenAdapter):
    family = "timm-eva"
    description = ("timm Eva (EVA, EVA-02, PE; fused or separate q/k/v, SwiGLU, RoPE): parameter "
                   "selection, both storages, deltas; token selection with RoPE gathered per token")
    _timm_class = "timm.models.eva:Eva"

    def scored_parameters(self, model: nn.Module) -> list[str]:
        return pool_linear_weights(model, super().scored_parameters(model))

    def check_token_support(self, model: nn.Module) -> None:
        pool = "map" if getattr(model, "attn_pool", None) is not None else model.global_pool
        if pool not in POOLS or (pool == "map" and type(model.attn_pool).__name__ != "AttentionPoolLatent"):
            raise TrptsValueError(f"token selection supports timm Eva global_pool in {sorted(POOLS)}; this model "
                                  f"pools with global_pool={model.global_pool!r}. Create the model with one of those")
        if getattr(model.patch_drop, "prob", 0.0) > 0 or getattr(model, "rope_mixed", False):
            raise TrptsValueError("token selection does not support timm Eva with patch dropout "
                                  "(patch_drop_rate > 0) or mixed-mode RoPE (rope_type='mixed') yet")

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        return scores_for(getattr(model, "cls_token", None) is not None,
                          model.global_pool == "token" and getattr(model, "attn_pool", None) is None)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def check_block(self, block: nn.Module) -> None:
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

        if type(block) not in (EvaBlock, EvaBlockPostNorm) or type(block.attn) is not EvaAttention:
            raise TrptsValueError(f"token selection patches timm EvaBlock/EvaBlockPostNorm with EvaAttention "
                                  f"only; this model has {type(block).__name__}/"
                                  f"{type(getattr(block, 'attn', None)).__name__}")

    def tracks_positions(self, model: nn.Module) -> bool:
        return getattr(model, "rope", None) is not None

    def patch_positions(self, model: nn.Module, blocks: Sequence[nn.Module]) -> list[Removable]:
        if not self.tracks_positions(model):
            return []
        flow = model._trpts_flow
        hooks = []
        for block in blocks:
            rope = _Rope(flow, int(block.attn.num_prefix_tokens), bool(getattr(block.attn, "rotate_half", False)))
            hooks.append(block.attn.register_forward_pre_hook(rope, with_kwargs=True))
        return hooks

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        if getattr(model, "attn_pool", None) is None and model.global_pool != "avg":
            return []
        model.pool = types.MethodType(_size_aware_pool, model)
        return [Restore(model, ["pool"])]

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
        rope = next((h for h in block.attn._forward_pre_hooks.values() if isinstance(h, _Rope)), None)
        return block.attn.q_norm, block.attn.k_norm, (rope.rotate if rope is not None else _same)

    def attention_scale(self, block: nn.Module) -> float:
        return float(block.attn.scale)

    def attention_width(self, block: nn.Module) -> int:
        attn = block.attn
        return int(attn.qkv.out_features // 3 if attn.qkv is not None else attn.q_proj.out_features)

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return block.attn, block.mlp

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        from timm.models.eva import EvaBlockPostNorm

        return _reducing_post_norm_forward if type(block) is EvaBlockPostNorm else _reducing_block_forward

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        """Eva's attention pool reads every token, prefix included; its mean only the patches."""
        pooled = num_tokens if model.attn_pool is not None else num_tokens - self.num_prefix_tokens(model)
        return super().pool_flops(model, num_tokens, reduced) + pooling_flops(
            model, self.heads(model), num_tokens, reduced, pooled)


def _same(t: Tensor) -> Tensor:
    return t


def _size_aware_pool(self: nn.Module, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm ``Eva.pool`` over tokens that stand for several patches (its attention pool reads
    every token, prefix included; its mean excludes the prefix)."""
    p = self.num_prefix_tokens
    sizes, _ = self._trpts_flow.current(x.shape[0], x.shape[1] - p)
    mean = (self.global_pool if pool_type is None else pool_type) == "avg"
    if sizes is None or (self.attn_pool is None and not mean):
        return type(self).pool(self, x, pool_type)
    return pool_by_size(x, sizes, p, include_prefix=self.attn_pool is not None, attn_pool=self.attn_pool)
