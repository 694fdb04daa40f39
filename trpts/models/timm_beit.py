"""Adapter for timm ``Beit`` (BEiT, BEiT v2), with token selection under relative position bias.

Every ``nn.Linear`` weight in the blocks (fused ``qkv`` with separate q/v biases, ``proj``, MLP)
and the patch projection are scored; relative position bias tables, LayerScale gammas and
biases stay frozen. The head (``get_classifier()``) is trained in full.

Token selection: the relative position bias (per layer, shared, or both) is indexed by token
position, so every block's attention is patched: after a reduction it gathers the bias rows and
columns of the original positions of the tokens it sees, per sample, and passes the
``(B, H, n, n)`` result to fused attention (SDPA) as its additive mask. The merged token has no
single position: its bias row and column are 0 (it interacts by content alone). Token scores
use the queries and keys without the bias (in the [CLS] row of an unreduced sequence the bias is
one entry per head, which the softmax ignores). Mean pooling is size-aware.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._token_flow import TokenFlow, gather_pair_bias, gather_table_bias, weighted_mean
from ..errors import TrptsValueError
from ._timm_common import TimmBlocksAdapter, pooling_flops
from .base import BlockForward, Removable, Restore, TokenAdapter, scores_for


def _reducing_block_forward(self: nn.Module, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
    """timm ``beit.Block.forward`` with the token reduction between attention and MLP."""
    y = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
    x = self._trpts_tokens.reduce(x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y))
    y = self.mlp(self.norm2(x))
    return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


def _position_aware_attention(self: nn.Module, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
    """timm ``beit.Attention.forward`` (the same operations in the same order) that hands its
    queries and keys to a reducing block and gathers the relative position bias of the tokens it
    sees once tokens were merged."""
    b, n, c = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += qkv_bias
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    relpos: _RelPos = self._trpts_relpos
    if relpos.state is not None:
        relpos.state.capture(q, k)
    if relpos.gathering(b, n):  # each token's bias at its original place, built from the table
        own, shared_rel_pos_bias = None, relpos.gathered(self, shared_rel_pos_bias, b, n)
    else:
        own = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if self.fused_attn:
        bias = own if shared_rel_pos_bias is None else shared_rel_pos_bias if own is None else own + shared_rel_pos_bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
    else:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if own is not None:
            attn = attn + own
        if shared_rel_pos_bias is not None:
            attn = attn + shared_rel_pos_bias
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


@dataclass
class _RelPos:
    """Per attention module: the model's token flow and, in a reducing block, its state."""

    flow: TokenFlow
    num_prefix_tokens: int
    block: nn.Module

    @property
    def state(self) -> Any:
        return self.block.__dict__.get("_trpts_tokens")

    def gathering(self, batch: int, n: int) -> bool:
        return self.flow.current(batch, n - self.num_prefix_tokens)[1] is not None

    def gathered(self, attn: nn.Module, shared: Tensor | None, batch: int, n: int) -> Tensor:
        """The attention's own bias plus ``shared`` at the tokens of this pass: ``(B, H, n, n)``
        (see :func:`gather_table_bias`, :func:`gather_pair_bias`)."""
        _, positions = self.flow.current(batch, n - self.num_prefix_tokens)
        p, bias = self.num_prefix_tokens, None
        if attn.relative_position_bias_table is not None:
            bias = gather_table_bias(attn.relative_position_bias_table, attn.relative_position_index, positions, p)
        if shared is not None:
            shared = gather_pair_bias(shared, positions, p)
            bias = shared if bias is None else bias + shared
        return bias


class TimmBeitAdapter(TimmBlocksAdapter, TokenAdapter):
    family = "timm-beit"
    description = ("timm Beit (BEiT, BEiT v2; relative position bias, mean pooling): parameter selection, "
                   "both storages, deltas; token selection with the bias gathered per token")
    _timm_class = "timm.models.beit:Beit"

    def check_token_support(self, model: nn.Module) -> None:
        return None  # Beit pools by 'avg', 'token' or not at all: all supported

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        return scores_for(True, model.global_pool == "token")

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def check_block(self, block: nn.Module) -> None:
        from timm.models.beit import Attention, Block

        if type(block) is not Block or type(block.attn) is not Attention:
            raise TrptsValueError(f"token selection patches timm beit Block/Attention only; this model has "
                                  f"{type(block).__name__}/{type(getattr(block, 'attn', None)).__name__}")

    def tracks_positions(self, model: nn.Module) -> bool:
        return True

    def patch_positions(self, model: nn.Module, blocks: Sequence[nn.Module]) -> list[Removable]:
        undo = []
        for block in blocks:
            block.attn.__dict__["_trpts_relpos"] = _RelPos(model._trpts_flow, self.num_prefix_tokens(model), block)
            block.attn.forward = types.MethodType(_position_aware_attention, block.attn)
            undo.append(Restore(block.attn, ("forward", "_trpts_relpos")))
        return undo

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        model.forward_head = types.MethodType(_size_aware_forward_head, model)
        return [Restore(model, ["forward_head"])]

    def query_key(self, block: nn.Module) -> None:
        return None  # _position_aware_attention hands q and k over

    def attention_scale(self, block: nn.Module) -> float:
        return float(block.attn.scale)

    def attention_width(self, block: nn.Module) -> int:
        return int(block.attn.qkv.out_features) // 3

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return block.attn, block.mlp

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_block_forward

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        return super().pool_flops(model, num_tokens, reduced) + pooling_flops(
            model, self.heads(model), num_tokens, reduced, num_tokens - self.num_prefix_tokens(model))


def _size_aware_forward_head(self: nn.Module, x: Tensor, pre_logits: bool = False) -> Tensor:
    """timm ``Beit.forward_head`` whose mean over patch tokens is weighted by their sizes."""
    p = self.num_prefix_tokens
    sizes, _ = self._trpts_flow.current(x.shape[0], x.shape[1] - p)
    if sizes is None or self.global_pool != "avg":
        return type(self).forward_head(self, x, pre_logits)
    x = self.head_drop(self.fc_norm(weighted_mean(x[:, p:], sizes)))
    return x if pre_logits else self.head(x)
