"""Task-relevant token selection (paper section 3.3, eq. 7-11) and its placement in a ViT.

In a reducing block, after the attention residual and before the MLP, the patch tokens that
score highest (the [CLS] token's attention, eq. 8, or the attention a token receives from all
queries, see :mod:`trpts.token_scores`) are kept (in their original order) and all others are
merged into one token, appended last. The reducing block's MLP and every later block then run on
``P + k + 1`` tokens instead of ``N``. How many patches each token stands for is carried along
(:mod:`trpts._token_flow`), so a head that averages the patch tokens averages the patches.
"""

from __future__ import annotations

import math
import random
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._state import model_state, update_state
from ._token_flow import TokenFlow
from ._utils import unwrap_model
from .allocation import Selection
from .errors import TrptsRuntimeError, TrptsTypeError, TrptsValueError
from .models import TokenAdapter, get_adapter, get_token_adapter
from .token_scores import check_score, cls_attention, token_scores  # noqa: F401  (re-exported)

__all__ = [
    "TokenConfig",
    "TokenSelectMerge",
    "apply_token_config",
    "get_token_config",
    "record_kept_tokens",
    "token_sizes",
    "unwrap_vit",
    "wrap_vit",
]

Placement = Literal["sparse", "dense", "random"]


class TokenSelectMerge(nn.Module):
    """Keep the top ``k = max(1, floor(rho * (N - P)))`` patch tokens by score (eq. 9) and merge
    the rest into one attention-weighted token (eq. 10), appended last (eq. 11).

    Args:
        rho: select rate in ``(0, 1]``.
        num_prefix_tokens: P, the protected leading tokens (CLS, distillation, registers).

    ``forward(x, scores)``: ``x`` is ``(B, N, D)``; ``scores`` is ``(B, N - P)`` (eq. 8, see
    :func:`cls_attention`). Returns ``(B, P + k + 1, D)`` in ``x``'s dtype, or ``x`` itself
    when nothing would be merged (``k == N - P``). Ties are broken by lower index; scores and
    merge weights are float32 even under autocast; gradients flow to kept tokens, through the
    merge to the merged tokens, and to the scores. A merged token from an earlier reducing
    block is an ordinary non-prefix token here: it may be kept or merged again.
    """

    def __init__(self, rho: float, num_prefix_tokens: int = 1):
        super().__init__()
        _check_rho(rho)
        if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise TrptsValueError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")
        self.rho = float(rho)
        self.num_prefix_tokens = num_prefix_tokens

    def num_kept(self, num_tokens: int) -> int:
        """k for an input of ``num_tokens`` tokens (prefix included)."""
        return max(1, math.floor(self.rho * (num_tokens - self.num_prefix_tokens)))

    def output_tokens(self, num_tokens: int) -> int:
        """Tokens out for ``num_tokens`` in: ``P + k + 1``, or ``num_tokens`` if nothing merges."""
        k = self.num_kept(num_tokens)
        n = num_tokens - self.num_prefix_tokens
        return num_tokens if k >= n else self.num_prefix_tokens + k + 1

    def forward(self, x: Tensor, scores: Tensor, return_indices: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """See the class docstring. With ``return_indices``, also the kept positions
        ``(B, k)`` int64 among the input's non-prefix tokens, ascending."""
        p = self.num_prefix_tokens
        b, num_tokens, _ = x.shape
        n = num_tokens - p
        if n < 1:
            raise TrptsValueError(f"x has {num_tokens} tokens, no more than num_prefix_tokens={p}")
        if scores.shape != (b, n):
            raise TrptsValueError(f"scores must have shape (B, N - P) = {(b, n)}, got {tuple(scores.shape)}")
        k = self.num_kept(num_tokens)
        if k >= n:
            kept = torch.arange(n, device=x.device).expand(b, n)
            return (x, kept) if return_indices else x
        scores = scores.float()
        # Stable descending sort: equal scores keep their order, so ties go to lower indices.
        order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
        kept = order[:, :k].sort(dim=1).values
        patches = x[:, p:]
        kept_tokens = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        weights = scores.scatter(1, kept, 0.0)  # eq. 10 numerator weights: a_i on merged tokens
        with torch.autocast(x.device.type, enabled=False):
            denom = weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            merged = torch.bmm((weights / denom).unsqueeze(1), patches.float()).to(x.dtype)
        out = torch.cat([x[:, :p], kept_tokens, merged], dim=1)
        return (out, kept) if return_indices else out

    def extra_repr(self) -> str:
        return f"rho={self.rho}, num_prefix_tokens={self.num_prefix_tokens}"


def _check_rho(rho: float) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise TrptsValueError(f"rho must be in (0, 1] (the fraction of patch tokens kept), got {rho!r}")


# ---- wrapping a model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenConfig:
    """The token-selection configuration of a wrapped model (travels with task deltas).
    ``score``: the token score the reducing blocks rank by (:mod:`trpts.token_scores`)."""

    layers: tuple[int, ...]
    rho: float
    num_prefix_tokens: int
    placement: str
    family: str
    score: str = "cls"

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "rho": self.rho, "num_prefix_tokens": self.num_prefix_tokens,
                "placement": self.placement, "family": self.family, "score": self.score}


@dataclass
class _BlockState:
    """Per-wrapped-block state: the reducer, the captured queries and keys, the model's token
    flow, restore info."""

    reducer: TokenSelectMerge
    to_heads: Callable[[Tensor], Tensor]
    scale: float
    score: str
    flow: TokenFlow
    hooks: list[RemovableHandle] = field(default_factory=list)
    q: Tensor | None = None
    k: Tensor | None = None
    record: list[Tensor] | None = None

    def capture_q(self, module: nn.Module, args: Any, out: Tensor) -> None:
        q = self.to_heads(out)
        self.q = q[:, :, :1] if self.score == "cls" else q

    def capture_k(self, module: nn.Module, args: Any, out: Tensor) -> None:
        self.k = self.to_heads(out)

    def capture(self, q: Tensor, k: Tensor) -> None:
        """Queries and keys ``(B, H, N, d)`` handed over by a family's patched attention."""
        self.q, self.k = (q[:, :, :1] if self.score == "cls" else q), k

    def reduce(self, x: Tensor) -> Tensor:
        """The reducing step, called by the patched block between attention and MLP."""
        reducer = self.reducer
        p = reducer.num_prefix_tokens
        if reducer.output_tokens(x.shape[1]) == x.shape[1]:
            self.q = self.k = None
            if self.record is not None:
                self.record.append(torch.arange(x.shape[1] - p, device=x.device).expand(x.shape[0], -1))
            return x
        if self.q is None or self.k is None:
            raise TrptsRuntimeError("the block's attention did not run its query/key modules; "
                                    "cannot score tokens")
        scores = token_scores(self.score, self.q, self.k, self.scale, p)
        self.q = self.k = None
        out, kept = reducer(x, scores, return_indices=True)
        self.flow.update(kept, x.shape[1] - p)
        if self.record is not None:
            self.record.append(kept)
        return out


_STATE_ATTR = "_trpts_tokens"  # a reducing block's state, read by its patched forward
_FLOW_ATTR = "_trpts_flow"  # the model's TokenFlow, read by patched pooling and position hooks


def get_token_config(model: nn.Module) -> TokenConfig | None:
    """The :class:`TokenConfig` of a model wrapped by :func:`wrap_vit`, or ``None``."""
    return model_state(model).tokens


def _wrapped_states(model: nn.Module) -> dict[int, _BlockState]:
    base = unwrap_model(model)
    config = get_token_config(base)
    if config is None:
        raise TrptsRuntimeError("the model is not wrapped by trpts.wrap_vit")
    blocks = get_adapter(base).blocks(base)
    return {i: getattr(blocks[i], _STATE_ATTR) for i in config.layers}


def choose_layers(depth: int, num_layers: int, selection: Selection | None, placement: Placement,
                  seed: int = 0) -> list[int]:
    """Block indices for ``num_layers`` reducing blocks (ascending).

    ``"sparse"``: the blocks with the fewest selected weights (the paper's sparse insertion;
    ties to the later block, see :meth:`Selection.sparsest_blocks`); ``"dense"``: those with
    the most; ``"random"``: uniformly at random (``seed``). Every block is a candidate.
    """
    if not isinstance(num_layers, int) or not 1 <= num_layers <= depth:
        raise TrptsValueError(f"num_layers must be an integer in 1..{depth} (the model's depth), got {num_layers!r}")
    if placement == "random":
        return sorted(random.Random(seed).sample(range(depth), num_layers))
    if placement not in ("sparse", "dense"):
        raise TrptsValueError(f"placement must be 'sparse', 'dense' or 'random', got {placement!r}")
    if selection is None:
        raise TrptsValueError(f"placement={placement!r} needs a selection (or pass layers=[...])")
    return selection.sparsest_blocks(num_layers, depth=depth, densest=placement == "dense")


def wrap_vit(
    model: nn.Module,
    selection: Selection | None = None,
    *,
    rho: float = 0.7,
    layers: Sequence[int] | None = None,
    num_layers: int = 3,
    placement: Placement = "sparse",
    seed: int = 0,
    score: str = "auto",
) -> nn.Module:
    """Patch ``model`` in place so chosen blocks keep their top tokens and merge the rest.

    Args:
        model: a ViT whose family adapter supports tokens: timm ``VisionTransformer`` (pooled by
            [CLS], ``'avg'``, SigLIP-style ``'map'`` or not at all; with or without a class
            token; DeiT distilled; register tokens; LayerScale; qk_norm), timm ``Eva`` (EVA-02,
            RoPE) and ``Beit`` (relative position bias), Hugging Face ViT, DeiT (with teacher
            too), DINOv2 (with registers, classifiers too), CLIP and SigLIP vision
            (docs/models.md, docs/tokens.md); DDP / compile wrappers are looked through. Other
            models raise :class:`~trpts.UnsupportedModelError` saying why.
        selection: a :class:`~trpts.Selection` for ``placement="sparse"`` / ``"dense"``.
        rho: select rate in ``(0, 1]`` (eq. 9).
        layers: explicit reducing block indices (overrides ``num_layers``/``placement``).
        num_layers: how many reducing blocks to choose.
        placement: ``"sparse"`` (fewest selected weights, the paper's choice), ``"dense"``,
            or ``"random"`` (``seed``): the Table 5 ablation.
        score: which tokens to keep: ``"cls"`` ([CLS] attention, eq. 8), ``"mean"`` (attention
            received from all queries) or ``"auto"``: ``"cls"`` where the head reads the
            [CLS] token, ``"mean"`` where it reads the patch tokens or there is no [CLS] token
            (measured, docs/tokens.md).

    Each reducing block runs its own attention unchanged (fused SDPA included), then scores
    the tokens with its own queries and keys and reduces them before its MLP. Every token
    carries how many patches it stands for: a head that averages the patch tokens takes the
    size-weighted mean, an attention-pooling head adds ``log(size)`` to its logits. Works in
    training and inference, under autocast and ``torch.compile``. ``state_dict()`` keys do not
    change. Undo with :func:`unwrap_vit`.

    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TrptsTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_rho(rho)
    check_score(score)
    base = unwrap_model(model)
    if get_token_config(base) is not None:
        raise TrptsRuntimeError("the model is already wrapped; call trpts.unwrap_vit(model) first")
    adapter = get_token_adapter(base)
    adapter.check_token_support(base)
    score = _resolve_score(adapter, base, score)
    blocks = list(adapter.blocks(base))
    if layers is not None:
        chosen, placement_name = _explicit_layers(layers, len(blocks)), "explicit"
    else:
        chosen, placement_name = choose_layers(len(blocks), num_layers, selection, placement, seed), placement
    prefix = adapter.num_prefix_tokens(base)
    for i in range(len(blocks)) if adapter.tracks_positions(base) else chosen:
        adapter.check_block(blocks[i])  # validate every block it patches before patching any
    flow = _install_flow(adapter, base, blocks)
    for i in chosen:
        _patch_block(adapter, blocks[i], TokenSelectMerge(rho, prefix), score, flow)
    update_state(base, tokens=TokenConfig(tuple(chosen), float(rho), prefix, placement_name, adapter.family, score))
    return model


def _resolve_score(adapter: TokenAdapter, model: nn.Module, score: str) -> str:
    """``score``, or the family's default for ``"auto"``; refuse a score the model cannot give."""
    supported = adapter.token_scores(model)
    if score == "auto":
        return supported[0]
    if score not in supported:
        raise TrptsValueError(f"score={score!r} is not available for this model (it supports {supported}); "
                              "'cls' needs a [CLS] token")
    return score


def _explicit_layers(layers: Sequence[int], depth: int) -> list[int]:
    chosen = sorted({int(i) for i in layers})
    if not chosen or any(not 0 <= i < depth for i in chosen):
        raise TrptsValueError(f"layers must be non-empty block indices in 0..{depth - 1}, got {list(layers)}")
    return chosen


def _install_flow(adapter: TokenAdapter, model: nn.Module, blocks: Sequence[nn.Module]) -> TokenFlow:
    """The model's :class:`TokenFlow`, reset when the first block starts a pass, and the family's
    size-aware pooling and position hooks."""
    flow = TokenFlow(track_positions=adapter.tracks_positions(model))
    model.__dict__[_FLOW_ATTR] = flow
    undo = [blocks[0].register_forward_pre_hook(flow.reset)]
    undo += adapter.patch_positions(model, blocks)
    undo += adapter.patch_pooling(model)
    model.__dict__["_trpts_flow_undo"] = undo
    return flow


def _patch_block(adapter: TokenAdapter, block: nn.Module, reducer: TokenSelectMerge, score: str,
                 flow: TokenFlow) -> None:
    """Give ``block`` its reducing forward (an instance-level patch) and the hooks that capture
    its queries and keys."""
    taps = adapter.query_key(block)
    state = _BlockState(reducer, taps[2] if taps else _same, adapter.attention_scale(block), score, flow)
    if taps:  # else the family's patched attention calls state.capture(q, k)
        state.hooks = [taps[0].register_forward_hook(state.capture_q), taps[1].register_forward_hook(state.capture_k)]
    block.forward = types.MethodType(adapter.reducing_forward(block), block)
    setattr(block, _STATE_ATTR, state)


def _same(t: Tensor) -> Tensor:
    return t


def token_sizes(model: nn.Module) -> Tensor | None:
    """How many original patches each non-prefix token of the last forward pass's output stands
    for: ``(B, n)`` float32 (kept tokens first, the merged token last), or ``None`` if that pass
    reduced nothing. For users who pool the tokens themselves (``global_pool=''``,
    ``forward_features``): weight a mean by it (``sizes / sizes.sum(1, keepdim=True)``)."""
    base = unwrap_model(model)
    if get_token_config(base) is None:
        raise TrptsRuntimeError("the model is not wrapped by trpts.wrap_vit")
    return base.__dict__[_FLOW_ATTR].sizes


def apply_token_config(model: nn.Module, config: TokenConfig | dict[str, Any] | None) -> nn.Module:
    """Make ``model``'s token selection exactly ``config`` (a :class:`TokenConfig` or its
    ``to_dict()``; ``None`` = none), unwrapping first if needed. Used by task deltas."""
    if get_token_config(model) is not None:
        unwrap_vit(model)
    if config is None:
        return model
    config = config if isinstance(config, TokenConfig) else TokenConfig(
        tuple(config["layers"]), float(config["rho"]), int(config["num_prefix_tokens"]),
        str(config["placement"]), str(config["family"]), str(config.get("score", "cls")))
    wrap_vit(model, rho=config.rho, layers=config.layers, score=config.score)
    update_state(model, tokens=config)  # keep the recorded placement label
    return model


def unwrap_vit(model: nn.Module) -> nn.Module:
    """Restore the original block behaviour of a model patched by :func:`wrap_vit`."""
    base = unwrap_model(model)
    states = _wrapped_states(base)
    blocks = get_adapter(base).blocks(base)
    for i, state in states.items():
        for hook in state.hooks:
            hook.remove()
        del blocks[i].forward
        delattr(blocks[i], _STATE_ATTR)
    for undo in base.__dict__.pop("_trpts_flow_undo"):
        undo.remove()
    del base.__dict__[_FLOW_ATTR]
    update_state(base, tokens=None)
    return model


@contextmanager
def record_kept_tokens(model: nn.Module) -> Iterator[dict[int, list[Tensor]]]:
    """Collect, per reducing block, the kept positions ``(B, k)`` of every forward pass inside
    the context (among that block's input non-prefix tokens)."""
    states = _wrapped_states(model)
    records: dict[int, list[Tensor]] = {i: [] for i in states}
    for i, state in states.items():
        state.record = records[i]
    try:
        yield records
    finally:
        for state in states.values():
            state.record = None
