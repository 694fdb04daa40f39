"""Task deltas: the selected values of a TR-PTS fine-tune in one small safetensors file.

One frozen backbone, many tasks: :func:`save_delta` writes the trained values at the selected
entries (rows implicit, columns as uint16, int32 past fan-in 65,536), the fully trained tensors (head, biases if
trained), the token-selection configuration and a fingerprint of the backbone;
:func:`load_delta` puts a delta onto a backbone in place, :func:`activate_delta` switches
between loaded tasks, :func:`merge_delta` bakes one into a plain state dict. The file format
(writing, reading, checksum, validation) is :mod:`trpts.delta_format`, specified in
``docs/format.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._sharding import full_value, is_sharded, refuse_sharded
from ._state import model_state, update_state
from ._utils import atomic_write, forget_autocast_casts, unwrap_model
from .delta_format import (
    FORMAT_VERSION,
    _version,
    fingerprint,
    read_delta,
    rows_fan_in,
    write_delta_file,
)
from .errors import FingerprintMismatchError, TrptsKeyError, TrptsRuntimeError, TrptsValueError
from .gate import check_gate_module, install_fixed, remove_fixed
from .masking import MaskHandle, SparseMaskHandle, get_mask_handle
from .models import GENERIC, ModelAdapter, TokenAdapter, get_adapter
from .sparse import delta_columns, delta_matrix
from .tokens import TokenConfig, apply_token_config, get_token_config

__all__ = ["DeltaHandle", "activate_delta", "load_delta", "loaded_deltas", "merge_delta", "read_delta",
           "remove_delta", "save_delta"]

PathLike = str | os.PathLike[str]


# ---- writing ----------------------------------------------------------------------------------


def _head_paths(model: nn.Module, adapter: ModelAdapter) -> list[str]:
    ids = {id(h) for h in adapter.heads(model)}
    return [n for n, m in model.named_modules() if id(m) in ids]


def save_delta(model: nn.Module, path: PathLike, *, handle: MaskHandle | None = None,
               dtype: torch.dtype | None = None, name: str | None = None,
               metadata: Mapping[str, Any] | None = None, labels: Sequence[str] | None = None) -> Path:
    """Write the task delta of a model trained with :func:`trpts.apply_masks`.

    Args:
        model: the trained model (its active :class:`~trpts.MaskHandle` tells what was trained).
        path: the ``.safetensors`` file to write (atomically: temporary file + rename).
        handle: the mask handle, if it was already removed from the model.
        dtype: store values as this dtype (``torch.float16`` / ``torch.bfloat16``); default:
            the training dtype, so that reloading is exact.
        name: the task's default name when loaded (default: the file's stem).
        metadata: extra JSON-serializable information kept under ``"user"``.
        labels: the head's class names, one per output (default: the model's own, e.g. a
            Hugging Face config's ``id2label``); a loaded delta sets them on the model.

    Returns:
        The path written.
    """
    base = unwrap_model(model)
    handle = handle if handle is not None else get_mask_handle(base)
    if handle is None:
        raise TrptsRuntimeError("save_delta needs the model's MaskHandle: call trpts.apply_masks(model, "
                                "selection) before training, or pass handle=")
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TrptsValueError(f"dtype must be a floating dtype such as torch.float16, got {dtype!r}")
    selection = handle.selection
    params = dict(base.named_parameters())
    adapter = get_adapter(base)
    heads = _head_paths(base, adapter)
    tensors: dict[str, Tensor] = {}
    matrices: dict[str, Any] = {}
    for m, info in selection.matrices.items():
        p = params[m]
        idx = selection.indices(m)
        values = handle.selected_values(m)  # the weight's entries, or sparse storage's vector
        tensors[f"values:{m}"] = values.to(dtype or p.dtype).cpu().contiguous()
        tensors[f"columns:{m}"] = idx.to(torch.uint16 if info.fan_in <= 1 << 16 else torch.int32)
        matrices[m] = {"shape": list(info.shape), "connections": info.connections,  # the rest: the report
                       "layer": info.layer, "block": info.block, "share": info.share}
    full = {n: p for n, p in handle.full.items() if n not in selection.matrices}
    for n, p in full.items():
        tensors[f"full:{n}"] = full_value(p.detach()).to(dtype or p.dtype).cpu().contiguous()
    base_values = handle.base_values
    thresholds = handle.thresholds() if isinstance(handle, SparseMaskHandle) else {}
    for m, tau in thresholds.items():
        tensors[f"threshold:{m}"] = tau.detach().float().cpu().reshape(())
    gate = getattr(handle, "token_gate", None)
    tokens = get_token_config(base)
    meta = {
        "format_version": FORMAT_VERSION,
        "trpts_version": _version(),
        "name": name or Path(path).stem,
        "family": adapter.family,
        "architecture": adapter.architecture(base),
        "identity": adapter.identity(base),
        "labels": _labels(base, adapter, full, heads, labels),
        "matrices": matrices,
        "full": {n: list(p.shape) for n, p in full.items()},
        "heads": [h for h in heads if any(n.startswith(h + ".") for n in full)],
        "tokens": tokens.to_dict() if tokens else None,
        "gate": {"matrices": sorted(thresholds), "skip": gate.skip, "temperature": gate.temperature,
                 "step": gate.step} if gate is not None else None,
        "selection": selection.config,
        "fingerprint": fingerprint({m: (tuple(selection.matrices[m].shape), base_values[m])
                                    for m in selection.matrices}),
        "user": dict(metadata or {}),
    }
    return _write_once(path, meta, tensors, sharded=any(is_sharded(p) for p in params.values()))


def _write_once(path: PathLike, meta: dict[str, Any], tensors: dict[str, Tensor], sharded: bool) -> Path:
    """Write the file; on a model sharded with ``fully_shard`` every rank has gathered the same
    tensors, rank 0 writes and the others wait for it."""
    if not sharded:
        return write_delta_file(path, meta, tensors)
    import torch.distributed as dist

    written = write_delta_file(path, meta, tensors) if dist.get_rank() == 0 else Path(path)
    dist.barrier()
    return written


def _labels(base: nn.Module, adapter: ModelAdapter, full: Mapping[str, Tensor], heads: list[str],
            labels: Sequence[str] | None) -> list[str] | None:
    """The class names stored with the delta: ``labels``, else the model's own; checked against
    the trained head's output count."""
    names = [str(n) for n in labels] if labels is not None else adapter.labels(base)
    outputs = {int(full[f"{h}.weight"].shape[0]) for h in heads if f"{h}.weight" in full}
    if names is not None and outputs and outputs != {len(names)}:
        if labels is None:  # the model's metadata is stale (a head replaced by hand): store none
            return None
        raise TrptsValueError(f"labels has {len(names)} names but the trained head has "
                              f"{', '.join(map(str, sorted(outputs)))} outputs: give one name per output")
    return names


# ---- many tasks on one backbone ---------------------------------------------------------------


@dataclass
class _Task:
    name: str
    meta: dict[str, Any]
    path: str
    index: dict[str, Tensor]  # flat positions (int64, on the parameter's device)
    values: dict[str, Tensor]  # trained values at those positions (parameter dtype/device)
    base_values: dict[str, Tensor] = field(default_factory=dict)  # plain backbone values there
    full: dict[str, Tensor] = field(default_factory=dict)  # fully trained non-head tensors
    base_full: dict[str, Tensor] = field(default_factory=dict)
    heads: dict[str, nn.Module] = field(default_factory=dict)  # module path -> this task's head
    apply_tokens: bool = False
    thresholds: dict[str, Tensor] = field(default_factory=dict)  # token-gated matrices: their tau


class _Bank:
    """Everything needed to switch a backbone between tasks exactly."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter):
        self.model = model
        self.tasks: dict[str, _Task] = {}
        self.active: str | None = None
        self.original_heads = {p: model.get_submodule(p) for p in _head_paths(model, adapter)}
        self.original_tokens = get_token_config(model)
        self.adapter = adapter
        self.original_metadata = adapter.head_metadata(model)  # HF config labels, timm num_classes
        self.params = dict(model.named_parameters())  # parameter objects are stable; no walk per switch

    def _set_module(self, path: str, module: nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, module)

    def _write(self, task: _Task, values: dict[str, Tensor], full: dict[str, Tensor],
               heads: dict[str, nn.Module], tokens: TokenConfig | dict[str, Any] | None,
               metadata: dict[str, Any]) -> None:
        """Write ``values`` at the task's entries, the ``full`` tensors, ``heads`` (and the
        model's head ``metadata``) and ``tokens``."""
        for m, idx in task.index.items():
            if m not in task.thresholds:  # a gated change stays out of the weight
                self.params[m].view(-1).index_put_((idx,), values[m])
        for n, v in full.items():
            self.params[n].copy_(v)
        forget_autocast_casts(self.params[n] for n in (*task.index, *full))
        for p, head in heads.items():
            self._set_module(p, head)
        if heads:
            self.adapter.set_head_metadata(self.model, metadata)
        if task.apply_tokens:
            apply_token_config(self.model, tokens)

    @torch.no_grad()
    def activate(self, name: str | None) -> None:
        if name == self.active:
            return
        self.deactivate()
        if name is None:
            return
        task = self.tasks[name]
        classes = next((int(h.out_features) for h in task.heads.values()), 0)
        metadata = self.adapter.task_head_metadata(classes, task.meta.get("labels"))
        self._write(task, task.values, task.full, task.heads, task.meta["tokens"], metadata)
        self._gate(task, install=True)
        self.active = name

    def _gate(self, task: _Task, install: bool) -> None:
        """Install (or remove) the fixed token gates of ``task``'s gated matrices."""
        for m, tau in task.thresholds.items():
            module = self.model.get_submodule(m.rpartition(".")[0])
            if not install:
                remove_fixed(module)
                continue
            rows, fan_in = rows_fan_in(task.meta["matrices"][m])
            index = task.index[m].view(rows, -1)
            cols = index % fan_in
            columns, positions = delta_columns(cols)
            delta = delta_matrix(task.values[m] - task.base_values[m], positions, columns.numel())
            install_fixed(module, delta, columns, tau)

    def pretrained_values(self, name: str, flat: Tensor, current: Tensor) -> Tensor:
        """``current`` (values of ``name`` at the ascending positions ``flat``) with the active
        task's positions put back to the backbone's values there."""
        task = self.tasks.get(self.active) if self.active is not None else None
        index = task.index.get(name) if task is not None else None
        if index is None or index.numel() == 0:
            return current
        at = torch.searchsorted(index, flat).clamp_(max=index.numel() - 1)
        hit = index[at] == flat
        out = current.clone()
        out[hit] = task.base_values[name][at[hit]].to(out.dtype)
        return out

    @torch.no_grad()
    def deactivate(self) -> None:
        if self.active is None:
            return
        task = self.tasks[self.active]
        heads = {p: h for p, h in self.original_heads.items() if p in task.heads}
        self._gate(task, install=False)
        self._write(task, task.base_values, task.base_full, heads, self.original_tokens, self.original_metadata)
        self.active = None


def _bank(model: nn.Module) -> _Bank | None:
    return model_state(model).deltas


class DeltaHandle:
    """A task delta loaded onto a backbone (from :func:`load_delta`)."""

    def __init__(self, model: nn.Module, name: str):
        self._model = model
        self.name = name

    @property
    def meta(self) -> dict[str, Any]:
        """The delta's metadata (format version, family, per-weight C_l, tokens, fingerprint, ...)."""
        return dict(self._task().meta)

    @property
    def active(self) -> bool:
        bank = _bank(self._model)
        return bank is not None and bank.active == self.name

    def _task(self) -> _Task:
        bank = _bank(self._model)
        if bank is None or self.name not in bank.tasks:
            raise TrptsRuntimeError(f"the delta {self.name!r} was removed")
        return bank.tasks[self.name]

    def activate(self) -> None:
        """Make this task the active one (same as ``activate_delta(model, name)``)."""
        activate_delta(self._model, self.name)

    def remove(self) -> None:
        """Unload this task; if it is active, the backbone (head included) is restored bit-exactly
        (same as ``trpts.remove_delta(model, name)``)."""
        bank = _bank(self._model)
        if bank is None or self.name not in bank.tasks:
            return
        _refuse_while_training(self._model, "removing a loaded delta")
        if bank.active == self.name:
            bank.deactivate()
        del bank.tasks[self.name]
        if not bank.tasks:
            update_state(self._model, deltas=None)

    def __repr__(self) -> str:
        return f"DeltaHandle({self.name!r}, {'active' if self.active else 'inactive'})"


def loaded_deltas(model: nn.Module) -> list[str]:
    """Names of the deltas loaded on ``model``, in load order."""
    bank = _bank(unwrap_model(model))
    return list(bank.tasks) if bank else []


def remove_delta(model: nn.Module, name: str) -> None:
    """Unload the delta loaded under ``name``; if it is active, the backbone (head included) is
    restored bit-exactly (PEFT's ``delete_adapter``)."""
    base = unwrap_model(model)
    if name not in loaded_deltas(base):
        raise TrptsKeyError(f"no delta named {name!r} is loaded (loaded: {loaded_deltas(base)})")
    DeltaHandle(base, name).remove()


def _refuse_while_training(model: nn.Module, what: str) -> None:
    """Task switches write the selected entries, so they wait until training is over (and
    cannot write into weights sharded by ``fully_shard``)."""
    refuse_sharded(model.parameters(), what)
    if model_state(model).masks is not None:
        raise TrptsRuntimeError(
            f"{what} while the model is being trained (apply_masks) would overwrite trained entries. "
            "Save the task with trpts.save_delta, then call handle.merge_and_unload() or handle.unload(). "
            "To resume training from a delta, load it first: load_delta(model, path), then "
            "apply_masks(model, trpts.Selection.from_delta(path))"
        )


def activate_delta(model: nn.Module, name: str | None) -> None:
    """Switch the active task: rewrites only the selected entries, the fully trained tensors and
    the head (and the token-selection configuration). ``None`` gives back the plain backbone."""
    base = unwrap_model(model)
    bank = _bank(base)
    if bank is not None and name != bank.active:
        _refuse_while_training(base, "switching tasks")
    if name is None:
        if bank is not None:
            bank.deactivate()
        return
    if bank is None or name not in bank.tasks:
        raise TrptsKeyError(f"no delta named {name!r} is loaded (loaded: {loaded_deltas(base)}); "
                            "load it with trpts.load_delta(model, path, name=...)")
    bank.activate(name)


def load_delta(model: nn.Module, path: PathLike, *, name: str | None = None, tokens: bool = True,
               ignore_fingerprint: bool = False, ignore_architecture: bool = False) -> DeltaHandle:
    """Apply a task delta onto a pretrained backbone in place and make it the active task.

    Args:
        model: the backbone the delta was trained on (checked by fingerprint).
        path: a file written by :func:`save_delta`.
        name: the task's name (default: the name stored at save time). Must be new.
        tokens: re-apply the token-selection configuration recorded at training time.
            ``False`` keeps the model's current token behaviour.
        ignore_fingerprint: load even onto a backbone whose values at the selected entries
            differ from those the delta was trained on (at your own risk).
        ignore_architecture: load even onto a model whose depth, width, heads, patch size, image
            size or prefix tokens differ from the stored ones, as long as every stored tensor
            fits (at your own risk: e.g. a delta trained at 224 px onto the same model at 384 px).

    Transactional: on any error the model is exactly as before. Right after loading, a delta
    stored in the training dtype gives outputs equal (``torch.equal``) to the trained model's.
    """
    base = unwrap_model(model)
    _refuse_while_training(base, "loading a delta")
    meta, tensors = read_delta(path)  # 1. an intact, well-formed file (checksum, metadata, tensors)
    name = name or meta.get("name") or Path(path).stem
    bank = _bank(base)
    if bank is not None and name in bank.tasks:
        raise TrptsValueError(f"a delta named {name!r} is already loaded; pass another name= "
                              f"(loaded: {list(bank.tasks)})")
    adapter = get_adapter(base)
    _check_fit(base, adapter, meta, path, tokens, ignore_architecture)  # 2. this model has what the delta writes to
    task = _build_task(base, name, meta, tensors, path, tokens)  # 3. without touching the model
    _install(base, adapter, bank, task, path, ignore_fingerprint)  # 4. fingerprint check, then activate
    return DeltaHandle(base, name)


def _check_fit(base: nn.Module, adapter: ModelAdapter, meta: dict[str, Any], path: PathLike, tokens: bool,
               ignore_architecture: bool = False) -> None:
    """Check that the delta fits ``base`` (family, architecture, parameters and shapes, heads,
    token-selection blocks)."""
    params = dict(base.named_parameters())
    family = adapter.family
    if (meta.get("family") or GENERIC.family) != family:  # files before 0.2 stored None for generic
        raise TrptsValueError(f"{path} was trained on a {meta.get('family')} model ({meta.get('architecture')}); "
                              f"this model is {family} ({adapter.architecture(base)})")
    if not ignore_architecture:
        _check_identity(meta.get("identity"), adapter.identity(base), path)
    for m, info in meta["matrices"].items():
        if m not in params:
            raise TrptsValueError(f"{path} holds {m!r}, which this model ({adapter.architecture(base)}) does "
                                  "not have: a different architecture")
        if list(params[m].shape) != list(info["shape"]):
            raise TrptsValueError(f"{path}: {m!r} has shape {info['shape']} in the delta but "
                                  f"{list(params[m].shape)} in the model: a different architecture")
    heads = list(meta["heads"])
    for n, shape in meta["full"].items():
        in_head = any(n.startswith(h + ".") for h in heads)
        if n not in params and not in_head:
            raise TrptsValueError(f"{path} holds {n!r}, which this model does not have")
        if not in_head and list(params[n].shape) != list(shape):
            raise TrptsValueError(f"{path}: {n!r} has shape {shape} in the delta but "
                                  f"{list(params[n].shape)} here")
    modules = dict(base.named_modules())
    for h in heads:
        if h not in modules:
            raise TrptsValueError(f"{path} replaces the head {h!r}, which this model does not have")
        if not isinstance(modules[h], nn.Linear) or f"{h}.weight" not in meta["full"]:
            raise TrptsValueError(f"{path}: the head {h!r} must be an nn.Linear with a stored weight")
    for m in (meta.get("gate") or {}).get("matrices", []):
        check_gate_module(m, modules.get(m.rpartition(".")[0], nn.Identity()))
    token_config = meta["tokens"] if tokens else None
    if token_config:
        if not isinstance(adapter, TokenAdapter):
            raise TrptsValueError(f"the delta was trained with token selection, which the {adapter.family} "
                                  "adapter does not support; pass tokens=False")
        adapter.check_token_support(base)
        blocks = adapter.blocks(base)
        for i in token_config["layers"]:
            if not 0 <= i < len(blocks):
                raise TrptsValueError(f"the delta's token-selection blocks {token_config['layers']} do not exist here")
            adapter.check_block(blocks[i])


def _check_identity(stored: dict[str, Any] | None, here: dict[str, Any], path: PathLike) -> None:
    """The stored architecture (older files have none) equals this model's on every field both
    name, but the label (a name; the fingerprint tells weights apart)."""
    if not stored:
        return
    differ = {k: (stored[k], here[k]) for k in stored if k in here and k != "architecture" and stored[k] != here[k]}
    if differ:
        what = ", ".join(f"{k} {a} in the delta but {b} here" for k, (a, b) in differ.items())
        raise TrptsValueError(
            f"{path} was trained on a different architecture ({stored.get('architecture')}: {what}; this model: "
            f"{here.get('architecture')}). Load it onto the model it was trained on, or pass "
            "ignore_architecture=True if you know the delta fits"
        )


def _build_task(base: nn.Module, name: str, meta: dict[str, Any], tensors: dict[str, Tensor],
                path: PathLike, tokens: bool) -> _Task:
    """The task's positions, values, fully trained tensors and new heads, on the model's devices
    and dtypes. Touches nothing."""
    params = dict(base.named_parameters())
    modules = dict(base.named_modules())
    heads = list(meta["heads"])
    task = _Task(name=name, meta=meta, path=str(path), index={}, values={},
                 apply_tokens=bool(meta["tokens"] if tokens else None))
    for m, info in meta["matrices"].items():
        p = params[m]
        cols = tensors[f"columns:{m}"].to(torch.int64)
        n_rows, fan_in = rows_fan_in(info)
        rows = torch.arange(n_rows, dtype=torch.int64).unsqueeze(1)
        task.index[m] = (rows * fan_in + cols).view(-1).to(p.device)
        task.values[m] = tensors[f"values:{m}"].reshape(-1).to(device=p.device, dtype=p.dtype)
        if f"threshold:{m}" in tensors:
            task.thresholds[m] = tensors[f"threshold:{m}"].to(device=p.device, dtype=torch.float32)
    for n in meta["full"]:
        if not any(n.startswith(h + ".") for h in heads):
            q = params[n]
            task.full[n] = tensors[f"full:{n}"].to(device=q.device, dtype=q.dtype)
    for h in heads:
        original = modules[h]
        weight = tensors[f"full:{h}.weight"]
        bias = tensors.get(f"full:{h}.bias")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                         device=original.weight.device, dtype=original.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        task.heads[h] = head
    return task


def _install(base: nn.Module, adapter: ModelAdapter, existing: _Bank | None, task: _Task, path: PathLike,
             ignore_fingerprint: bool) -> None:
    """Record the backbone's values at the task's entries, check the fingerprint, add the task
    to the bank and activate it; on any error the model is left as it was."""
    meta = task.meta
    params = dict(base.named_parameters())
    bank = existing if existing is not None else _Bank(base, adapter)
    previous = bank.active
    bank.deactivate()  # exact: the plain backbone, to read its values at the task's entries
    with torch.no_grad():
        for m, idx in task.index.items():
            task.base_values[m] = params[m].detach().view(-1)[idx].clone()
        for n in task.full:
            task.base_full[n] = params[n].detach().clone()
    got = fingerprint({m: (tuple(info["shape"]), task.base_values[m]) for m, info in meta["matrices"].items()})
    if got != meta["fingerprint"] and not ignore_fingerprint:
        bank.activate(previous)
        raise FingerprintMismatchError(
            f"{path} was trained on another backbone: the model's values at the delta's selected entries "
            f"do not match (fingerprint {got[:12]}... vs {meta['fingerprint'][:12]}...). Load the pretrained "
            "weights the delta was trained from, or pass ignore_fingerprint=True"
        )
    bank.tasks[task.name] = task
    try:
        bank.activate(task.name)
    except BaseException:
        del bank.tasks[task.name]
        bank.activate(previous)
        raise
    if existing is None:
        update_state(base, deltas=bank)


def merge_delta(model: nn.Module, path: PathLike, out: PathLike | None = None, *,
                ignore_fingerprint: bool = False, ignore_architecture: bool = False) -> dict[str, Tensor]:
    """A plain state dict of ``model`` with the delta baked in (usable without trpts; token
    selection is not part of a state dict). Writes it as safetensors to ``out`` (atomically)
    when given. The model itself is left as it was."""
    base = unwrap_model(model)
    bank = _bank(base)
    previous = bank.active if bank is not None else None
    handle = load_delta(base, path, name=f"__merge__{id(path)}", tokens=False, ignore_fingerprint=ignore_fingerprint,
                        ignore_architecture=ignore_architecture)
    try:
        if _bank(base).tasks[handle.name].thresholds:
            raise TrptsValueError(f"{path} is token-gated: its change applies per token and cannot be merged into "
                                  "a state dict; load it with trpts.load_delta instead")
        state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    finally:
        handle.remove()
        if previous is not None:
            activate_delta(base, previous)
    if out is not None:
        from safetensors.torch import save_file

        plain = {k: v.cpu() for k, v in state.items()}
        atomic_write(Path(out), lambda tmp: save_file(plain, tmp, metadata={"format": "pt",
                                                                              "merged_from": str(Path(path).name)}))
    return state
