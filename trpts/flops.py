"""Analytical FLOPs of a (wrapped) ViT, from its modules and the token count of every block.

Counts what ``torch.utils.flop_counter.FlopCounterMode`` counts, i.e. matrix products and
convolutions at 2 FLOPs per multiply-add: every ``nn.Linear`` (on the tokens it sees), the
attention products ``q k^T`` and ``A v``, the patch-embedding convolution, the token scoring
and the merge of reducing blocks, and the head (one token in). Element-wise work (norms, softmax, GELU) is
not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._utils import unwrap_model
from .errors import TrptsValueError
from .models import TokenAdapter, get_token_adapter
from .tokens import TokenSelectMerge, get_token_config

__all__ = ["count_flops", "token_counts"]


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _patches(conv: nn.Module, height: int, width: int) -> int:
    if not isinstance(conv, nn.Conv2d):
        raise TrptsValueError(f"the patch embedding is a {type(conv).__name__}, not an nn.Conv2d")
    if conv.padding == "same":  # PyTorch allows it with stride 1 only: the size is kept
        return height * width
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    dims = []
    for size, k, s, p, d in zip((height, width), conv.kernel_size, conv.stride, padding, conv.dilation, strict=True):
        dims.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return dims[0] * dims[1]


def token_counts(model: nn.Module, input_size: Sequence[int]) -> list[tuple[int, int]]:
    """``(tokens in, tokens after the block's reduction)`` for every block, for one image of
    ``input_size = (B, C, H, W)`` or ``(C, H, W)``."""
    base = unwrap_model(model)
    return _token_counts(base, get_token_adapter(base), input_size)


def _token_counts(base: nn.Module, adapter: TokenAdapter, input_size: Sequence[int]) -> list[tuple[int, int]]:
    height, width = int(input_size[-2]), int(input_size[-1])
    n = _patches(adapter.patch_embedding(base), height, width) + adapter.num_prefix_tokens(base)
    config = get_token_config(base)
    reducer = TokenSelectMerge(config.rho, config.num_prefix_tokens) if config else None
    counts = []
    for i in range(len(adapter.blocks(base))):
        out = reducer.output_tokens(n) if reducer is not None and i in config.layers else n
        counts.append((n, out))
        n = out
    return counts


def count_flops(model: nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs of one forward pass of ``model`` on a batch of ``input_size = (B, C, H, W)``.

    Uses the token counts the model's current :func:`~trpts.wrap_vit` configuration produces
    (the dense model when unwrapped). Matches ``FlopCounterMode`` on the same model (with the
    attention's explicit-matmul path, since CPU SDPA kernels are not counted there).
    """
    if len(input_size) not in (3, 4):
        raise TrptsValueError(f"input_size must be (B, C, H, W) or (C, H, W), got {tuple(input_size)}")
    batch = int(input_size[0]) if len(input_size) == 4 else 1
    base = unwrap_model(model)
    adapter = get_token_adapter(base)
    blocks = list(adapter.blocks(base))
    patch = adapter.patch_embedding(base)
    height, width = int(input_size[-2]), int(input_size[-1])
    num_patches = _patches(patch, height, width)
    flops = 2 * num_patches * patch.weight.numel()
    config = get_token_config(base)
    counts = _token_counts(base, adapter, input_size)
    flops += adapter.pool_flops(base, counts[-1][1], any(n_in != n_out for n_in, n_out in counts))
    for block, (n_in, n_out) in zip(blocks, counts, strict=True):
        attention, mlp = adapter.attention_and_mlp(block)
        for linear in _linears(attention):
            flops += 2 * n_in * linear.in_features * linear.out_features
        width_qk = adapter.attention_width(block)
        flops += 4 * n_in * n_in * width_qk  # q k^T and A v over all heads
        for linear in _linears(mlp):
            flops += 2 * n_out * linear.in_features * linear.out_features
        if n_out != n_in:  # scoring (eq. 8: one query; "mean": every query) and the merge (eq. 10)
            n_patch = n_in - adapter.num_prefix_tokens(base)
            dim = _linears(mlp)[0].in_features
            queries = n_in if config.score == "mean" else 1
            flops += 2 * queries * n_patch * width_qk + 2 * n_patch * dim
    return batch * flops

