"""The interface every model-family adapter implements.

An adapter knows where a family keeps its transformer blocks, its patch-embedding
projection and its classification head. Everything else (which weights are scored,
which block a parameter belongs to) is derived here from module *types* and module
*identity*, never from name patterns, so it survives DDP/compile prefixes and renames.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from .._utils import model_type
from ..errors import TrptsTypeError, TrptsValueError


def scores_for(has_cls: bool, head_reads_cls: bool) -> tuple[str, ...]:
    """The token scores a model can give, its default first: ``"cls"`` (eq. 8) where the head reads
    the [CLS] token, ``"mean"`` where it reads the patch tokens (it kept a mean-pooled DINOv2 more
    accurate, frozen and fine-tuned: docs/tokens.md) or there is no [CLS] token."""
    if not has_cls:
        return ("mean",)
    return ("cls", "mean") if head_reads_cls else ("mean", "cls")


class Removable(Protocol):
    """A hook handle, or anything else ``unwrap_vit`` undoes by calling ``remove()``."""

    def remove(self) -> None: ...


class Restore:
    """Undo of an instance-level patch of one module: ``remove()`` deletes the instance
    attributes ``names`` (so the class's own methods show through again)."""

    def __init__(self, module: nn.Module, names: Sequence[str]):
        self.module, self.names = module, tuple(names)

    def remove(self) -> None:
        for name in self.names:
            self.module.__dict__.pop(name, None)


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
    """Model-family knowledge behind one small interface (one subclass per family file).

    Parameter selection needs only the four abstract methods. Token selection is an optional
    capability: a family that supports it subclasses :class:`TokenAdapter` instead."""

    #: Short identifier stored in selections and delta files, e.g. ``"timm-vit"``.
    family: ClassVar[str]
    #: Human-readable description used in error messages.
    description: ClassVar[str]
    #: Matches a canonical parameter name of this family; group 1 is the block index.
    #: Only used when no model is at hand (e.g. ``allocate_connections`` on a plain dict).
    block_name_pattern: ClassVar[re.Pattern[str]]
    #: Why ``wrap_vit`` cannot run on this family (families without :class:`TokenAdapter`).
    tokens_unsupported: ClassVar[str] = "this family has no token-selection support"

    @property
    def supports_tokens(self) -> bool:
        """Whether this family implements token selection (is a :class:`TokenAdapter`)."""
        return isinstance(self, TokenAdapter)

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

    def architecture(self, model: nn.Module) -> str:
        """The architecture label stored in delta files (the class name by default)."""
        return model_type(model).__name__

    def identity(self, model: nn.Module) -> dict[str, Any]:
        """Everything that decides whether a task delta fits ``model``, stored in delta files and
        compared on load (JSON values): the architecture label and depth here; families add
        width, heads, patch size, image size and prefix tokens."""
        return {"architecture": self.architecture(model), "depth": len(self.blocks(model))}

    def labels(self, model: nn.Module) -> list[str] | None:
        """The class names the model's own metadata gives its head (stored in deltas), if any."""
        return None

    def head_metadata(self, model: nn.Module) -> dict[str, Any]:
        """A copy of what the model says about its head (class count, names): restored by
        :meth:`set_head_metadata` when a task delta is deactivated. None by default."""
        return {}

    def set_head_metadata(self, model: nn.Module, metadata: dict[str, Any]) -> None:
        """Write metadata from :meth:`head_metadata` or :meth:`task_head_metadata` (families
        without head metadata keep nothing to write)."""
        return None

    def task_head_metadata(self, num_classes: int, labels: list[str] | None) -> dict[str, Any]:
        """The metadata of a head with ``num_classes`` outputs named ``labels``."""
        return {}

    def batch(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, targets)`` of one batch of the user's loader (the ecosystems' conventions:
        an ``(inputs, targets)`` tuple, or a Hugging Face dict with ``pixel_values`` / ``labels``)."""
        return unpack_batch(batch)

    def logits(self, output: Any) -> Tensor:
        """The logits tensor in a forward output (a tensor, ``.logits``, or a tuple's first item)."""
        return output_logits(output)

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


class TokenAdapter(ModelAdapter):
    """A family adapter with token selection (``wrap_vit``): [CLS]-attention scores of a block's
    own queries and keys, and a block forward that reduces tokens between attention and MLP."""

    def check_token_support(self, model: nn.Module) -> None:
        """Raise a clear trpts error if token selection cannot run on this model of the family
        (for example a pooling that would read merged tokens wrongly); the default accepts."""
        return None

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        """The token scores (:mod:`trpts.token_scores`) this model can give, the default first:
        ``("cls", "mean")`` by default (a [CLS]-pooled model). A model whose head reads the patch
        tokens puts ``"mean"`` first (measured: docs/tokens.md), one without [CLS] has only it."""
        return ("cls", "mean")

    def tracks_positions(self, model: nn.Module) -> bool:
        """Whether attention depends on each token's original position (RoPE, relative position
        bias), so the token flow must carry positions. False by default."""
        return False

    def patch_positions(self, model: nn.Module, blocks: Sequence[nn.Module]) -> list[Removable]:
        """Hooks or patches that give every block the position information of the tokens it sees
        (read from the model's token flow), each undone by its ``remove()``; none by default.
        ``wrap_vit`` has checked every block with :meth:`check_block` first."""
        return []

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        """Make the model's pooling of patch tokens size-aware (read the model's token flow):
        hooks or patches, each undone by ``remove()``. Nothing by default: a [CLS]-pooled head
        never reads a merged token."""
        return []

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        """FLOPs after the blocks for one image whose last block outputs ``num_tokens`` tokens
        (``reduced``: whether a block merged tokens in the pass), as ``FlopCounterMode`` counts
        them: by default every ``nn.Linear`` outside the blocks on one token (a [CLS] head)."""
        inside = {id(m) for b in self.blocks(model) for m in b.modules()}
        return sum(2 * m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, nn.Linear) and id(m) not in inside)

    @abstractmethod
    def num_prefix_tokens(self, model: nn.Module) -> int:
        """P: the leading tokens (CLS first, then distillation / register tokens) never merged."""

    @abstractmethod
    def check_block(self, block: nn.Module) -> None:
        """Raise a clear trpts error if this block's type cannot be patched."""

    @abstractmethod
    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]] | None:
        """Modules whose outputs are the block's queries and keys, and a function turning such an
        output into ``(B, H, N, d)`` (queries/keys exactly as the attention uses them); or
        ``None`` when the family's patched attention hands them to the block's state itself
        (``block._trpts_tokens.capture(q, k)``)."""

    @abstractmethod
    def attention_scale(self, block: nn.Module) -> float:
        """The scale the block's attention multiplies ``q k^T`` by."""

    @abstractmethod
    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The block's attention part (runs on all input tokens) and MLP part (runs on the
        tokens left after the reduction), for FLOP counting."""

    @abstractmethod
    def reducing_forward(self, block: nn.Module) -> BlockForward:
        """The block's forward with the reducing step between attention and MLP."""

    def attention_width(self, block: nn.Module) -> int:
        """Query width (heads x head_dim) of the block's attention, for FLOP counting: the
        query module's output width by default."""
        q_module, _, _ = self.query_key(block)
        if isinstance(q_module, nn.Linear):
            return q_module.out_features
        raise TrptsValueError(f"cannot infer the attention width of {type(block).__name__}")


def unpack_batch(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` from a tuple/list batch or a Hugging Face style dict."""
    if isinstance(batch, Mapping):
        missing = [k for k in ("pixel_values", "labels") if k not in batch]
        if missing:
            raise TrptsValueError(
                f"dict batches need the keys 'pixel_values' and 'labels'; missing {missing} "
                f"(got {sorted(batch)})"
            )
        return batch["pixel_values"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TrptsTypeError(
        "each batch must be an (inputs, targets) tuple or a dict with 'pixel_values' and "
        f"'labels'; got {type(batch).__name__}"
    )


def output_logits(output: Any) -> Tensor:
    """The logits in a model output: a tensor, an object with ``.logits`` (Hugging Face), or a
    tuple/list whose first element is a tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TrptsTypeError(
        "the model must return a logits tensor, an object with .logits, or a tuple whose first "
        f"element is the logits; got {type(output).__name__}"
    )
