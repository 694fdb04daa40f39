"""The part of a Hugging Face vision config that decides whether a task delta fits a model."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from .base import ModelAdapter, TokenAdapter


def config_identity(model: nn.Module, prefix_tokens: int) -> dict[str, Any]:
    """Width, depth, heads, patch size and image size from ``model.config`` (the vision config of
    CLIP / SigLIP towers), and the prefix tokens the family puts before the patches."""
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    out: dict[str, Any] = {"model_type": getattr(config, "model_type", None), "prefix_tokens": prefix_tokens}
    for key, attr in (("width", "hidden_size"), ("heads", "num_attention_heads"), ("patch_size", "patch_size"),
                      ("img_size", "image_size")):
        value = getattr(config, attr, None)
        out[key] = [int(v) for v in value] if isinstance(value, (list, tuple)) else value
    return out


def config_head_metadata(model: nn.Module) -> dict[str, Any]:
    """A copy of the config's head metadata: ``num_labels``, ``id2label``, ``label2id``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "id2label"):
        return {}
    return {"id2label": dict(config.id2label), "label2id": dict(config.label2id)}


def set_config_head_metadata(model: nn.Module, metadata: dict[str, Any]) -> None:
    """Write what :func:`config_head_metadata` returned (``num_labels`` follows ``id2label``)."""
    config = getattr(model, "config", None)
    if config is not None and metadata:
        config.id2label = {int(k): v for k, v in metadata["id2label"].items()}
        config.label2id = dict(metadata["label2id"])


def config_labels(model: nn.Module) -> list[str] | None:
    """The class names in the config, unless they are the placeholders ``LABEL_i``."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def task_head_metadata(num_classes: int, labels: list[str] | None) -> dict[str, Any]:
    """The config metadata of a head with ``num_classes`` outputs named ``labels``."""
    names = labels or [f"LABEL_{i}" for i in range(num_classes)]
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


class HFConfigMixin(ModelAdapter):
    """What a Hugging Face model's config says about its architecture and head, for the
    adapters of Hugging Face families (put it first among the bases)."""

    #: Tokens before the patches for families without token selection (the others say it).
    _PREFIX_TOKENS: ClassVar[int] = 1

    def identity(self, model: nn.Module) -> dict[str, Any]:
        prefix = self.num_prefix_tokens(model) if isinstance(self, TokenAdapter) else self._PREFIX_TOKENS
        return {**super().identity(model), **config_identity(model, prefix)}

    def labels(self, model: nn.Module) -> list[str] | None:
        return config_labels(model)

    def head_metadata(self, model: nn.Module) -> dict[str, Any]:
        return config_head_metadata(model)

    def set_head_metadata(self, model: nn.Module, metadata: dict[str, Any]) -> None:
        set_config_head_metadata(model, metadata)

    def task_head_metadata(self, num_classes: int, labels: list[str] | None) -> dict[str, Any]:
        return task_head_metadata(num_classes, labels)
