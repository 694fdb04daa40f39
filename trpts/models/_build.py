"""Build the backbone a task delta was trained on, from what the delta stores (for ``trpts merge``).

timm models are created by name (the delta's architecture label, or ``model``) with the stored
depth, width, heads, patch size and image size, plus ``model_kwargs``; Hugging Face models from a
local directory (``hf_config``: its ``config.json``, and its weights when it holds them, read
with ``from_pretrained``) and the stored class name. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import TrptsValueError
from ._timm_common import create_model

_TIMM_KWARGS = {"depth": "depth", "width": "embed_dim", "heads": "num_heads", "patch_size": "patch_size",
                "img_size": "img_size"}


def build_backbone(meta: dict[str, Any], *, model: str | None = None, model_kwargs: dict[str, Any] | None = None,
                   hf_config: str | Path | None = None, num_classes: int | None = None) -> nn.Module:
    """The (randomly initialised) backbone of the delta whose metadata is ``meta``."""
    family = meta.get("family") or "generic"
    if hf_config is not None or family.startswith("hf-"):
        if hf_config is None:
            raise TrptsValueError(f"the delta was trained on a Hugging Face model ({meta.get('architecture')}); "
                                  "pass --hf-config DIR, a local directory with its config.json")
        return _hugging_face(str(meta.get("architecture")), Path(hf_config), num_classes)
    if family.startswith("timm-"):
        return _timm(meta, model, model_kwargs or {}, num_classes)
    raise TrptsValueError(f"the delta's family is {family!r}: the command line builds timm and Hugging Face "
                          "models only; merge it in Python with trpts.merge_delta(model, path, out)")


def _timm(meta: dict[str, Any], name: str | None, overrides: dict[str, Any], num_classes: int | None) -> nn.Module:
    label = str(meta.get("architecture") or "")
    name = name or (label.split(":", 1)[1] if ":" in label else None)
    if not name:
        raise TrptsValueError(f"the delta does not name its timm model ({label!r}); pass --model NAME")
    identity = meta.get("identity") or {}
    kwargs = {arg: identity[key] for key, arg in _TIMM_KWARGS.items() if identity.get(key) is not None}
    kwargs.update(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return create_model(name, **kwargs)
    except (TypeError, RuntimeError) as err:
        raise TrptsValueError(f"timm could not build {name!r} with {kwargs}: {err}; adjust --model-kwargs") from err


def _hugging_face(label: str, config_dir: Path, num_classes: int | None) -> nn.Module:
    import transformers

    cls = getattr(transformers, label, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TrptsValueError(f"transformers has no model class {label!r} (the delta's architecture)")
    if not (config_dir / "config.json").exists():
        raise TrptsValueError(f"--hf-config {config_dir} has no config.json")
    if any((config_dir / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        extra = {"num_labels": num_classes, "ignore_mismatched_sizes": True} if num_classes is not None else {}
        return cls.from_pretrained(config_dir, local_files_only=True, **extra)  # the directory's weights
    config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
    if num_classes is not None:
        config.num_labels = num_classes
    return cls(config)
