"""Shared parts of the Hugging Face vision-transformer adapters (DeiT, DINOv2, CLIP, SigLIP, BEiT).

Each family declares its class names, where its backbone, blocks, patch convolution and heads
live; matching, block lookup across module layouts, heads, and the query/key/scale lookups used by
token selection are implemented once here.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._token_flow import TokenFlow, log_sizes, weighted_mean
from .._utils import model_type
from ..errors import TrptsValueError
from ._hf_config import HFConfigMixin
from .base import ModelAdapter, Removable, TokenAdapter, has_parameters
from .hf_vit import HFViTAdapter

#: Block names of every layout: ``layers.i`` (transformers >= 5.9 ViT family), ``encoder.layer.i``
#: (DINOv2, BEiT) and ``encoder.layers.i`` (CLIP, SigLIP).
HF_BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:encoder\.layers?|layers)\.(\d+)\.")


def refuse_masks(attention_mask: Tensor | None, kwargs: Mapping[str, Any]) -> None:
    """Raise if a reducing block is given an attention mask: it would no longer fit the reduced
    token count of the following blocks."""
    if attention_mask is not None or kwargs.get("causal_attention_mask") is not None:
        raise TrptsValueError("token selection does not support attention masks: a reduced block "
                              "changes the token count the mask was built for; call the model without "
                              "attention_mask")


class HFVisionAdapter(HFConfigMixin, ModelAdapter):
    """Base of the Hugging Face vision adapters; subclasses set the class variables below and
    implement :meth:`patch_embedding`. Families with token selection use
    :class:`HFVisionTokenAdapter`."""

    block_name_pattern = HF_BLOCK_PATTERN
    #: Exact class names (module under ``transformers.``) this family matches.
    _CLASSES: ClassVar[tuple[str, ...]]
    #: Attribute names under which task models keep the bare backbone (``deit``, ``vision_model``).
    _BACKBONES: ClassVar[tuple[str, ...]] = ()
    #: Attribute names of the classification head(s) on task models.
    _HEADS: ClassVar[tuple[str, ...]] = ("classifier",)
    def matches(self, model: nn.Module) -> bool:
        return model_type(model).__module__.startswith("transformers.") and model_type(model).__name__ in self._CLASSES

    def backbone(self, model: nn.Module) -> nn.Module:
        """The bare backbone (the model itself for ``...Model`` classes)."""
        for name in self._BACKBONES:
            inner = getattr(model, name, None)
            if isinstance(inner, nn.Module):
                return inner
        return model

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        base = self.backbone(model)
        for owner, name in ((base, "layers"), (getattr(base, "encoder", None), "layers"),
                            (getattr(base, "encoder", None), "layer")):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList):
                return list(layers)
        raise TrptsValueError(f"cannot find the transformer blocks of {model_type(model).__name__}")

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(model, name) for name in self._HEADS if has_parameters(getattr(model, name, None))]



class HFVisionTokenAdapter(HFVisionAdapter, TokenAdapter):
    """A Hugging Face vision family with token selection: subclasses set the block class names,
    their attention attribute and the parts their reducing forward uses, and
    :meth:`reducing_forward`."""

    #: Block class names token selection patches.
    _LAYERS: ClassVar[tuple[str, ...]] = ()
    #: Attribute of a block holding its self-attention.
    _ATTENTION: ClassVar[str] = "attention"
    #: Further block submodules the family's reducing forward uses.
    _PARTS: ClassVar[tuple[str, ...]] = ()

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # [CLS]

    def _attention(self, block: nn.Module) -> nn.Module:
        return getattr(block, self._ATTENTION)

    def check_block(self, block: nn.Module) -> None:
        """The block is one of ``_LAYERS`` in the layout the reducing forward replicates: the
        transformers 5.x ``forward(hidden_states, attention_mask, **kwargs)`` returning a tensor,
        the ``_PARTS`` submodules and an attention with ``q_proj`` / ``k_proj``."""
        name = type(block).__name__
        if name not in self._LAYERS:
            raise TrptsValueError(f"{self.family} token selection patches {'/'.join(self._LAYERS)} blocks "
                                  f"only; got {name}")
        named = [p.name for p in inspect.signature(type(block).forward).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        attention = getattr(block, self._ATTENTION, None)
        if (named != ["self", "hidden_states", "attention_mask"] or not hasattr(attention, "q_proj")
                or not all(hasattr(block, part) for part in self._PARTS)):
            raise TrptsValueError(
                f"{self.family} token selection needs the transformers 5.x {name} layout "
                f"(forward(hidden_states, attention_mask, **kwargs), {self._ATTENTION}.q_proj / k_proj, "
                f"{', '.join(self._PARTS)}); this transformers version's {name} differs"
            )

    def query_key(self, block: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
        attention = self._attention(block)
        return attention.q_proj, attention.k_proj, HFViTAdapter._heads(attention, attention.head_dim)

    def attention_scale(self, block: nn.Module) -> float:
        attention = self._attention(block)
        return float(attention.scaling if hasattr(attention, "scaling") else attention.scale)

    def attention_and_mlp(self, block: nn.Module) -> tuple[nn.Module, nn.Module]:
        return self._attention(block), block.mlp


# ---- size-aware pooling of Hugging Face heads (forward hooks: no Hugging Face code is copied) ----
@dataclass
class _KeepTokens:
    """Forward hook of a backbone: keeps its ``last_hidden_state`` for a size-aware head."""

    flow: TokenFlow

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.flow.output = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


@dataclass
class _SizeWeightedMeanInput:
    """Forward pre-hook of a classifier whose input ends with the mean of the patch tokens (the
    last ``width`` features): replaces that mean by the size-weighted one."""

    flow: TokenFlow
    num_prefix_tokens: int

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        tokens, x = self.flow.output, args[0]
        if tokens is None or x.ndim != 2 or x.shape[0] != tokens.shape[0]:
            return None
        sizes, _ = self.flow.current(tokens.shape[0], tokens.shape[1] - self.num_prefix_tokens)
        if sizes is None:
            return None
        mean = weighted_mean(tokens[:, self.num_prefix_tokens:], sizes).to(x.dtype)
        return (torch.cat([x[:, :x.shape[1] - mean.shape[1]], mean], dim=1), *args[1:])


@dataclass
class _LogSizeMask:
    """Forward pre-hook of a batch-first ``nn.MultiheadAttention`` pooling head: adds ``log(size)``
    of every key token to the logits (as its ``attn_mask``)."""

    flow: TokenFlow

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        query, key = args[0], args[1] if len(args) > 1 else kwargs["key"]
        sizes, _ = self.flow.current(key.shape[0], key.shape[1])
        if sizes is None:
            return None
        b, heads, length = key.shape[0], module.num_heads, query.shape[1]
        mask = log_sizes(sizes).expand(b, heads, length, -1).reshape(b * heads, length, -1)
        return args, {**kwargs, "attn_mask": mask.to(query.dtype)}


def size_weighted_classifier(backbone: nn.Module, classifier: nn.Module, flow: TokenFlow,
                             num_prefix_tokens: int) -> list[Removable]:
    """Hooks making ``classifier``'s patch-mean input size-weighted (see ``_SizeWeightedMeanInput``)."""
    return [backbone.register_forward_hook(_KeepTokens(flow)),
            classifier.register_forward_pre_hook(_SizeWeightedMeanInput(flow, num_prefix_tokens))]


def log_size_attention_pool(attention: nn.Module, flow: TokenFlow) -> list[Removable]:
    """A hook adding ``log(size)`` to a batch-first ``nn.MultiheadAttention`` pool's logits."""
    return [attention.register_forward_pre_hook(_LogSizeMask(flow), with_kwargs=True)]
