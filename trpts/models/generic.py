"""The fallback for any ``nn.Module`` trpts has no family adapter for (Swin, ConvNeXt's linear
layers, a text encoder, your own model): parameter selection, both storages and deltas.

What is scored: the weight of every ``nn.Linear`` except the classification head. The head is
found by the ecosystem's own conventions, in this order: timm's ``get_classifier()``; Hugging
Face's ``classifier`` (and DeiT-with-teacher's ``cls_classifier`` / ``distillation_classifier``)
or ``get_output_embeddings()``; a top-level ``head`` or ``fc``. The blocks (for
``unit="block"`` and per-block reports) are the children of the largest ``nn.ModuleList`` of
same-typed modules. Token selection needs a family adapter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .base import ModelAdapter, has_parameters

_HF_HEADS = ("classifier", "cls_classifier", "distillation_classifier")
_TOP_LEVEL_HEADS = ("head", "fc")


def conventional_heads(model: nn.Module) -> list[nn.Module]:
    """The classification head(s) by timm / Hugging Face / plain-PyTorch conventions; empty when
    none is found (a bare backbone, or a head under an unconventional name)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm
        head = get_classifier()
        if isinstance(head, nn.Module):
            return [head] if has_parameters(head) else []
    heads = [getattr(model, name) for name in _HF_HEADS if has_parameters(getattr(model, name, None))]
    if heads:
        return heads
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):  # Hugging Face language-model heads
        try:
            head = get_output()
        except (NotImplementedError, AttributeError):
            head = None
        if has_parameters(head):
            return [head]  # type: ignore[list-item]
    return [m for name in _TOP_LEVEL_HEADS if has_parameters(m := getattr(model, name, None))]


def largest_block_list(model: nn.Module) -> list[nn.Module]:
    """Children of the ``nn.ModuleList`` (>= 2 modules of one type) holding the most parameters."""
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


class GenericAdapter(ModelAdapter):
    family = "generic"
    description = ("any other nn.Module: every nn.Linear weight but the head is scored (parameter "
                   "selection, both storages, deltas; no token selection)")
    block_name_pattern = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)\.")

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return largest_block_list(model)

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return None

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return conventional_heads(model)

    def scored_parameters(self, model: nn.Module) -> list[str]:
        head = {id(p) for h in self.heads(model) for p in h.parameters()}
        wanted = {id(m.weight) for m in model.modules()
                  if isinstance(m, nn.Linear) and id(m.weight) not in head}
        return [name for name, p in model.named_parameters() if id(p) in wanted]
