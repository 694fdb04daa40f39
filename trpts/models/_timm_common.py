"""What the timm adapters share: a timm model class whose ``blocks`` are the transformer blocks
and whose ``patch_embed.proj`` is the patch-embedding projection."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from .._utils import model_type
from .base import ModelAdapter
from .generic import conventional_heads


def _ints(value: Any) -> list[int] | None:
    """A size (int or pair) as a JSON list."""
    if value is None:
        return None
    return [int(v) for v in (value if isinstance(value, (tuple, list)) else (value, value))]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """A timm model by name, with random weights (``timm.create_model(name, pretrained=False)``):
    nothing is downloaded."""
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


class TimmBlocksAdapter(ModelAdapter):
    """Base of the timm adapters; subclasses set ``_timm_class`` (``"module:Class"``) and, without
    token support, ``tokens_unsupported`` (the reason ``wrap_vit`` gives)."""

    block_name_pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
    _timm_class: ClassVar[str]

    def matches(self, model: nn.Module) -> bool:
        if not model_type(model).__module__.startswith("timm."):
            return False
        import importlib

        module, name = self._timm_class.split(":")
        return isinstance(model, getattr(importlib.import_module(module), name))

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.patch_embed, "proj", None)

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return conventional_heads(model)

    def identity(self, model: nn.Module) -> dict[str, Any]:
        """Adds width, heads, patch size, image size (``None`` with ``dynamic_img_size``) and
        prefix tokens."""
        patch = model.patch_embed
        attn = getattr(self.blocks(model)[0], "attn", None) if self.blocks(model) else None
        dynamic = bool(getattr(patch, "dynamic_img_size", False) or getattr(model, "dynamic_img_size", False))
        img = getattr(patch, "img_size", None)
        return {**super().identity(model), "width": int(getattr(model, "embed_dim", model.num_features)),
                "heads": int(attn.num_heads) if attn is not None and hasattr(attn, "num_heads") else None,
                "patch_size": _ints(getattr(patch, "patch_size", None)),
                "img_size": None if dynamic else _ints(img),
                "prefix_tokens": int(getattr(model, "num_prefix_tokens", 0))}

    def head_metadata(self, model: nn.Module) -> dict[str, Any]:
        return {"num_classes": model.num_classes} if hasattr(model, "num_classes") else {}

    def set_head_metadata(self, model: nn.Module, metadata: dict[str, Any]) -> None:
        if "num_classes" in metadata and hasattr(model, "num_classes"):
            model.num_classes = int(metadata["num_classes"])

    def task_head_metadata(self, num_classes: int, labels: list[str] | None) -> dict[str, Any]:
        return {"num_classes": num_classes}

    def architecture(self, model: nn.Module) -> str:
        """``Class:timm_name`` from the model's ``pretrained_cfg`` (the class name alone without it)."""
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
        return model_type(model).__name__ + (f":{arch}" if arch else "")


def pooling_flops(model: nn.Module, heads: list[nn.Module], num_tokens: int, reduced: bool, pooled: int) -> int:
    """FLOPs a timm model's pooling adds to one-token head linears, for one image whose last block
    outputs ``num_tokens`` tokens of which the pooling reads ``pooled``: an attention pool (``kv``
    on those tokens, the latent queries' ``q k^T`` and ``A v``), the size-weighted mean of a
    reduced pass, or the head on every token (``global_pool=''``)."""
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        latent = int(pool.latent_len)
        flops = 4 * latent * pooled * pool.q.out_features
        for m in pool.modules():
            if isinstance(m, nn.Linear):
                flops += 2 * ((pooled if m is pool.kv else latent) - 1) * m.in_features * m.out_features
        return flops
    if model.global_pool == "avg":
        return 2 * pooled * model.embed_dim if reduced else 0
    if not model.global_pool:
        return sum(2 * (num_tokens - 1) * m.in_features * m.out_features
                   for head in heads for m in head.modules() if isinstance(m, nn.Linear))
    return 0
