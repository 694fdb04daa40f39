"""Gradient masks: train only the selected entries with the user's own optimizer and loop.

``apply_masks`` registers a gradient hook on every partially selected weight that zeroes the
gradient of frozen entries, freezes (``requires_grad=False``) every parameter with no
selected entry, and keeps the new classification head fully trainable. With zero gradient
and zero optimizer state, SGD (momentum, nesterov), Adam, AdamW, RMSprop, ... leave frozen
entries bit-identical. The one trap is weight decay, which optimizers apply to every entry
of a parameter whose ``.grad`` is not None: trpts checks every ``optimizer.step()`` and
raises :class:`~trpts.errors.WeightDecayError` *before* the step if a param group would
decay a masked weight. :meth:`MaskHandle.param_groups` builds groups that cannot drift.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ._sharding import full_value, gather_selected, is_sharded, refuse_sharded
from ._state import model_state, update_state
from ._utils import canonical_name, fmt_count, unwrap_model
from .allocation import Selection
from .errors import (
    TrptsKeyError,
    TrptsRuntimeError,
    TrptsTypeError,
    TrptsValueError,
    WeightDecayError,
)
from .gate import GATE, SCALE, Controller, TokenGate
from .models import get_adapter
from .sparse import VALUES, SparseStorage, check_sparse_module

__all__ = ["MaskHandle", "SparseMaskHandle", "Storage", "apply_masks", "get_mask_handle"]

Storage = Literal["hooks", "sparse"]

def get_mask_handle(model: nn.Module) -> MaskHandle | None:
    """The active :class:`MaskHandle` of ``model`` (DDP/compile wrappers removed), if any."""
    return model_state(model).masks


class MaskHandle:
    """Result of :func:`apply_masks`: what is trainable, and how to undo it.

    Attributes:
        selection: the :class:`~trpts.Selection` that was applied.
        base_values: ``{name: 1-D tensor}`` the pretrained backbone's values at the selected
            entries (they fingerprint the backbone in deltas): the values when the masks were
            applied, except where a loaded task delta had changed them (resuming from a delta).
        masked: ``{name: parameter}`` of weights with frozen entries (hooked).
        full: ``{name: parameter}`` of fully trainable parameters (head, biases, extras,
            and selected weights whose every entry is selected).
    """

    storage = "hooks"

    def __init__(self, model: nn.Module, selection: Selection, masked: dict[str, nn.Parameter],
                 frozen: dict[str, Tensor], full: dict[str, nn.Parameter], base_values: dict[str, Tensor]):
        self.selection = selection
        self.base_values = base_values
        # Parameters are looked up by name: FSDP2's fully_shard, applied after apply_masks,
        # replaces them with sharded ones.
        self._masked_names = list(masked)
        self._full_names = list(full)
        self._model_ref = weakref.ref(model)
        self._frozen = frozen  # name -> bool, True = frozen entry (never a float copy)
        self._flags: list[tuple[str, bool]] = []
        self._hooks: list[RemovableHandle] = []
        self._hooked: dict[str, weakref.ref[Tensor]] = {}  # the weight object each mask hook is on
        self._active = False
        self._initial: dict[str, Tensor] = {}  # values at the selected entries at install
        self._initial_full: dict[str, Tensor] = {}  # fully trainable tensors at install

    @property
    def masked(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of weights with frozen entries (looked up in the model now)."""
        named = self._named()
        return {n: named[n] for n in self._masked_names}

    @property
    def full(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of fully trainable parameters (looked up in the model now)."""
        named = self._named()
        return {n: named[n] for n in self._full_names}

    def _named(self) -> dict[str, nn.Parameter]:
        model = self._model_ref()
        if model is None:
            raise TrptsRuntimeError("the model of this MaskHandle no longer exists")
        return dict(model.named_parameters())

    # ---- lifecycle ---------------------------------------------------------------------
    def _install(self) -> None:
        model = self._model_ref()
        assert model is not None
        self._flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
        self._initial = {n: self._read_selected(n) for n in self.masked}  # storage not attached yet
        self._initial_full = {n: p.detach().clone() for n, p in self.full.items()}
        self._active = True
        try:
            self._attach()
            trainable = {id(p) for p in self.parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable)
        except BaseException:
            self._uninstall(keep=True)
            raise
        update_state(model, masks=self)

    def _attach(self) -> None:
        """Add this storage to the model (here: gradient hooks and the weight-decay check)."""
        for name, p in self.masked.items():
            self._hook(name, p)
        model = self._model_ref()
        assert model is not None
        owners: dict[str, list[tuple[str, str]]] = {}
        for name in self._masked_names:
            path, _, attr = name.rpartition(".")
            owners.setdefault(path, []).append((attr, name))
        for path, owned in owners.items():
            module = model.get_submodule(path)
            self._hooks.append(module.register_forward_pre_hook(self._rehook(owned)))
        step_hook = register_optimizer_step_pre_hook(_weak_step_check(self))
        self._hooks.append(step_hook)
        weakref.finalize(self, step_hook.remove)  # unregister if dropped without remove()

    def merge_and_unload(self) -> nn.Module | None:
        """Stop training: keep the trained values as plain weights, remove what trpts added
        (hooks, or sparse storage's compact vectors) and restore every ``requires_grad`` flag.
        Idempotent. Returns the model (PEFT's ``merge_and_unload``)."""
        self._uninstall(keep=True)
        return self._model_ref()

    def unload(self) -> nn.Module | None:
        """Undo :func:`apply_masks` completely: the selected entries and the fully trained
        tensors (head, biases) get back their values from before ``apply_masks``, bit-exactly,
        and every ``requires_grad`` flag is restored. Idempotent. Returns the model."""
        self._uninstall(keep=False)
        return self._model_ref()

    def remove(self) -> None:
        """Deprecated alias of :meth:`merge_and_unload` (it keeps the trained values); use
        :meth:`unload` to restore the model as it was before ``apply_masks``."""
        warnings.warn("MaskHandle.remove() is merge_and_unload(): it keeps the trained values. Call "
                      "handle.merge_and_unload(), or handle.unload() to restore the model as it was "
                      "before apply_masks", DeprecationWarning, stacklevel=2)
        self._uninstall(keep=True)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the ``with`` block the model computes what it computed before
        :func:`apply_masks` (the pretrained backbone and its original head, exactly); the
        trained values come back on exit. Do not step an optimizer inside."""
        if not self._active:
            raise TrptsRuntimeError("disable_adapter() needs an active handle (this one was unloaded)")
        trained = self._swap(self._initial, self._initial_full)
        try:
            yield
        finally:
            self._swap(*trained)

    def _swap(self, selected: dict[str, Tensor], full: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Write ``selected`` (values at the selected entries) and ``full``; return what was there."""
        refuse_sharded([*self.masked.values(), *self.full.values()], "unload() / disable_adapter()")
        with torch.no_grad():
            before = ({n: self._read_selected(n) for n in selected},
                      {n: p.detach().clone() for n, p in self.full.items()})
            for n, values in selected.items():
                self._write_selected(n, values)
            for n, values in full.items():
                self.full[n].copy_(values)
        return before

    def _read_selected(self, name: str) -> Tensor:
        p = self.masked[name]
        return p.detach().reshape(-1)[self.selection.flat_indices(name).to(p.device)].clone()

    def _write_selected(self, name: str, values: Tensor) -> None:
        p = self.masked[name]
        p.view(-1).index_put_((self.selection.flat_indices(name).to(p.device),), values.to(p.dtype))

    def _uninstall(self, keep: bool) -> None:
        if not self._active:
            return
        if not keep:
            self._swap(self._initial, self._initial_full)
        self._detach()
        named = self._named()
        for n, flag in self._flags:
            if n in named:
                named[n].requires_grad_(flag)
        model = self._model_ref()
        if model is not None and model_state(model).masks is self:
            update_state(model, masks=None)
        self._active = False

    def _detach(self) -> None:
        """Undo what this storage added to the model (here: the gradient hooks)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.merge_and_unload()

    # ---- hooks ------------------------------------------------------------------------------
    def _hook(self, name: str, weight: Tensor) -> None:
        """Mask the gradient of ``weight`` (the parameter ``name`` computes with)."""
        if is_sharded(weight):
            raise TrptsRuntimeError(
                f"{name!r} is still sharded when its module runs (fully_shard on the module that owns it?): "
                "apply fully_shard to the transformer blocks and the root, not to single layers, so that "
                "trpts can mask the gathered weight's gradient")
        self._hooks.append(weight.register_hook(self._make_hook(name)))
        self._hooked[name] = weakref.ref(weight)

    def _rehook(self, owned: list[tuple[str, str]]):
        """A forward pre-hook for a masked weight's module: if the module computes with another
        weight object than the one hooked (FSDP2 swaps in the gathered weight), hook that one."""
        def pre_hook(module: nn.Module, args: Any) -> None:
            if torch.compiler.is_compiling():  # compiled: the weights are the hooked parameters
                return
            for attr, name in owned:
                weight = getattr(module, attr)
                ref = self._hooked.get(name)
                if ref is None or ref() is not weight:
                    self._hook(name, weight)

        return pre_hook

    def _make_hook(self, name: str):
        def hook(grad: Tensor) -> Tensor:
            frozen = self._frozen[name]
            if frozen.device != grad.device:  # the model moved after apply_masks
                frozen = self._frozen[name] = frozen.to(grad.device)
            return grad.masked_fill(frozen, 0)

        return hook

    def _check_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for gi, group in enumerate(optimizer.param_groups):
            decay = group.get("weight_decay", 0)
            if not decay:
                continue
            if self._model_ref() is None:  # the model is gone: nothing of it can be stepped
                return
            masked_ids = {id(p): n for n, p in self.masked.items()}
            for p in group["params"]:
                name = masked_ids.get(id(p))
                if name is not None and p.grad is not None:
                    raise WeightDecayError(
                        f"{type(optimizer).__name__} param group {gi} has weight_decay={decay} and "
                        f"holds the masked weight {name!r}: its frozen entries would drift. Build "
                        "the optimizer from handle.param_groups(weight_decay=...), which puts masked "
                        "weights in a group without weight decay (nothing was changed by this step)"
                    )

    def selected_values(self, name: str) -> Tensor:
        """Current values of the selected entries of weight ``name``: ``[rows, C_l]`` (a copy)."""
        info = self.selection.matrices[name]
        p = self.masked.get(name, self.full.get(name))
        if p is None:
            raise TrptsKeyError(f"{name!r} is not a weight of this handle's selection")
        if is_sharded(p):
            return gather_selected(p.detach(), self.selection.indices(name))
        idx = self.selection.indices(name).to(p.device)
        return p.detach().reshape(info.rows, info.fan_in).gather(1, idx)

    # ---- optimizer helpers -------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter (masked weights first, then fully trainable ones)."""
        return [*self.masked.values(), *self.full.values()]

    def param_groups(self, weight_decay: float = 0.0, *, head_lr: float | None = None,
                     **options: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups for the trainable parameters, tagged ``trpts_group``.

        ``"masked"``: the masked weights, ``weight_decay=0`` (decay would move their frozen
        entries); ``"decay"``: fully trainable matrices (e.g. the head's weight) with
        ``weight_decay``; ``"no_decay"``: 1-D parameters (biases), no decay, as in timm and
        Hugging Face. ``options`` (e.g. ``lr``) are copied into every group. Empty groups are
        left out.

        ``head_lr``: the classification head's parameters (the adapter's head that this handle
        trains fully) move to their own groups with ``lr=head_lr``: ``"head"`` (its weight,
        ``weight_decay``) and ``"head_no_decay"`` (its bias), after the others. Under Adam a
        new head wants ~10x the learning rate of pretrained entries: with AdamW,
        ``param_groups(lr=1e-3, head_lr=1e-2)`` was best on a real ViT-S (docs/faq.md).
        ``None`` (default): no head groups.
        """
        return self._groups(("masked", list(self.masked.values()), 0.0), weight_decay, head_lr, options)

    def _head_ids(self, head_lr: Any) -> set[int]:
        """``id`` of each fully trainable head parameter; validates ``head_lr`` (not None)."""
        if (isinstance(head_lr, bool) or not isinstance(head_lr, numbers.Real)
                or not math.isfinite(head_lr) or head_lr <= 0):
            raise TrptsValueError(f"head_lr must be a positive finite number (or None), got {head_lr!r}")
        model = self._model_ref()
        if model is None:
            raise TrptsRuntimeError("head_lr needs the handle's model, which no longer exists")
        names = get_adapter(model).head_parameters(model)
        head = {id(self.full[n]) for n in names if n in self.full}
        if not head:
            raise TrptsValueError(
                "head_lr was given but this handle trains no classification-head parameter "
                "(apply_masks(..., train_head=False), or a model whose head trpts cannot find); drop "
                "head_lr, or apply_masks with train_head=True"
            )
        return head

    def _groups(self, first: tuple[str, list[nn.Parameter], float], weight_decay: float,
                head_lr: float | None, options: dict[str, Any]) -> list[dict[str, Any]]:
        head = set() if head_lr is None else self._head_ids(head_lr)
        body = [p for p in self.full.values() if id(p) not in head]
        tail = [p for p in self.full.values() if id(p) in head]
        head_options = {**options, "lr": float(head_lr)} if head_lr is not None else options
        groups = [
            (*first, options),
            ("decay", [p for p in body if p.ndim >= 2], float(weight_decay), options),
            ("no_decay", [p for p in body if p.ndim < 2], 0.0, options),
            ("head", [p for p in tail if p.ndim >= 2], float(weight_decay), head_options),
            ("head_no_decay", [p for p in tail if p.ndim < 2], 0.0, head_options),
        ]
        return [{"params": ps, "weight_decay": wd, "trpts_group": g, **opts}
                for g, ps, wd, opts in groups if ps]

    # ---- counts ------------------------------------------------------------------------------
    @property
    def num_selected(self) -> int:
        """Trainable entries of the masked weights."""
        return sum(int((~self._frozen[n]).sum()) for n in self.masked)

    @property
    def num_trainable(self) -> int:
        """All trainable values: selected entries plus fully trainable parameters."""
        return self.num_selected + sum(p.numel() for p in self.full.values())

    @property
    def num_total(self) -> int:
        """All parameter values of the model."""
        model = self._model_ref()
        return sum(p.numel() for p in model.parameters()) if model is not None else 0

    @property
    def trainable_fraction(self) -> float:
        return self.num_trainable / max(1, self.num_total)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable values, all values of the model)``, as PEFT's method of that name."""
        return self.num_trainable, self.num_total

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format: ``trainable params: ... || all params: ... ||
        trainable%: ...``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(1, total):.4f}")

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (f"MaskHandle({state}, {len(self.masked)} masked weights with "
                f"{fmt_count(self.num_selected)} selected entries, {len(self.full)} fully trainable "
                f"tensors; {fmt_count(self.num_trainable)} / {fmt_count(self.num_total)} values "
                f"trainable ({100 * self.trainable_fraction:.3f}%))")


class SparseMaskHandle(MaskHandle):
    """:class:`MaskHandle` of ``storage="sparse"``: each masked weight is frozen and its selected
    entries live in a compact trainable vector ``values[name]`` (float, ``[k]``, row-major in
    :meth:`Selection.flat_indices` order) registered on the weight's module as
    ``trpts_values``. ``remove()`` writes the values into the weights."""

    storage = "sparse"

    def __init__(self, model: nn.Module, selection: Selection, masked: dict[str, nn.Parameter],
                 frozen: dict[str, Tensor], full: dict[str, nn.Parameter], base_values: dict[str, Tensor],
                 owners: dict[str, nn.Module], token_gate: TokenGate | None = None):
        super().__init__(model, selection, masked, frozen, full, base_values)
        self._owners = owners
        self.token_gate = token_gate
        self._storages: dict[str, SparseStorage] = {}
        self._merge = False

    @property
    def values(self) -> dict[str, nn.Parameter]:
        """Each masked weight's compact value vector, as the model holds it now (looked up by
        name: under ``fully_shard`` these are the sharded parameters the optimizer steps)."""
        if not self._storages:
            return {}
        named = self._named()
        return {n: named[f"{n.rpartition('.')[0]}.{VALUES}" if "." in n else VALUES] for n in self._storages}

    def _attach(self) -> None:
        self._merge = False  # a failed install restores the weights untouched
        gated = [n for n, m in self._owners.items() if isinstance(m, nn.Linear)]
        controller = Controller(self.token_gate, len(gated)) if self.token_gate is not None else None
        for name, module in self._owners.items():
            storage = SparseStorage(module, self.selection.indices(name), self._initial[name], controller)
            storage.install()
            self._storages[name] = storage
        self._merge = True

    def _uninstall(self, keep: bool) -> None:
        if self._active and self._model_ref() is not None:
            refuse_sharded(self.values.values(), "merge_and_unload() / unload() with storage='sparse'")
            if keep and self.token_gate is not None and self._merge:  # not while undoing a failed install
                raise TrptsRuntimeError(
                    "a token-gated change cannot be merged into the weights (each token gets it or not): "
                    "save it with trpts.save_delta(model, path) and load it with trpts.load_delta, or call "
                    "handle.unload() to restore the model as it was")
        super()._uninstall(keep)

    def _read_selected(self, name: str) -> Tensor:
        if name in self._storages:
            return full_value(self.values[name].detach()).clone()
        return super()._read_selected(name)

    def _write_selected(self, name: str, values: Tensor) -> None:
        if name in self._storages:  # the forward writes them into the weight
            self.values[name].copy_(values)
        else:
            super()._write_selected(name, values)

    def _detach(self) -> None:
        for storage in self._storages.values():
            storage.remove(merge=self._merge and not storage.gated)
        self._storages.clear()
        super()._detach()

    def selected_values(self, name: str) -> Tensor:
        if self._active and name in self._storages:
            info = self.selection.matrices[name]
            return self._read_selected(name).view(info.rows, info.connections)
        return super().selected_values(name)

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter (compact value vectors first, then fully trainable ones)."""
        return [*self.values.values(), *self.full.values()]

    def param_groups(self, weight_decay: float = 0.0, selected_weight_decay: float = 0.0, *,
                     head_lr: float | None = None, **options: Any) -> list[dict[str, Any]]:
        """Like :meth:`MaskHandle.param_groups`, with the value vectors as the first group,
        ``"selected"``.

        ``selected_weight_decay`` decays the selected entries themselves (towards 0, as
        decoupled decay does for any weight); default 0, which matches the hook mode.
        ``head_lr`` gives the head its own groups, as for the hook storage.
        """
        return self._groups(("selected", list(self.values.values()), float(selected_weight_decay)),
                            weight_decay, head_lr, options)

    def thresholds(self) -> dict[str, Tensor]:
        """Each token-gated weight's learned threshold ``tau_l`` (float32 scalar; empty
        without ``token_gate``)."""
        return {n: getattr(s.module, GATE) * getattr(s.module, SCALE) for n, s in self._storages.items() if s.gated}

    @property
    def num_selected(self) -> int:
        return sum(self.selection.matrices[n].count for n in self.masked)

    @property
    def num_total(self) -> int:
        """All parameter values of the model, not counting the compact copies."""
        compact = {id(v) for v in self.values.values()}
        model = self._model_ref()
        return sum(p.numel() for p in model.parameters() if id(p) not in compact) if model is not None else 0

    def __repr__(self) -> str:
        return "Sparse" + super().__repr__().replace("masked weights", "compact weights")


def _weak_step_check(handle: MaskHandle):
    """A global optimizer pre-hook that does not keep the handle (and its model) alive."""
    ref = weakref.ref(handle)

    def check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        live = ref()
        if live is not None:
            live._check_step(optimizer, args, kwargs)

    return check


def apply_masks(
    model: nn.Module,
    selection: Selection,
    *,
    train_head: bool = True,
    train_biases: bool = False,
    extra_trainable: Iterable[str] = (),
    storage: Storage = "hooks",
    token_gate: TokenGate | float | None = None,
) -> MaskHandle:
    """Make the model train only the selected entries (plus the head) in the user's own loop.

    Call it before wrapping the model in ``DistributedDataParallel`` (DDP only registers
    parameters that require grad) and before building the optimizer (or build it from
    :meth:`MaskHandle.param_groups`). ``torch.compile`` may come before or after.

    Args:
        model: the model the selection was made for (optionally already compiled).
        selection: from :func:`trpts.allocate_connections`.
        train_head: keep the classification head (new per task) fully trainable. The head is
            the family adapter's, or on any other model the first found of timm's
            ``get_classifier()``, Hugging Face's ``classifier`` / ``get_output_embeddings()``,
            a top-level ``head`` / ``fc``; when there is none, name it in
            ``extra_trainable`` or pass ``train_head=False`` (a bare backbone).
        train_biases: also train the biases of the masked weights' modules (GPS does).
            Default off: only the selected entries and the head change.
        extra_trainable: names of further parameters to train fully (e.g. a custom head).
        storage: ``"hooks"`` (default): gradient hooks on the dense weights; training memory
            and time are those of full fine-tuning. ``"sparse"``: each masked weight is
            frozen and its selected entries become a compact trainable vector (see
            :class:`SparseMaskHandle`): no dense weight gradient, O(k) optimizer state, the
            same training trajectory. Supports ``nn.Linear`` and patch-embedding convs.
        token_gate: experimental, ``storage="sparse"`` only: apply each masked linear layer's
            change only to the tokens whose relative update ``||dW x|| / ||W0 x + b||``
            reaches a threshold learned per layer (TS-PEFT; :class:`trpts.TokenGate`, or a
            number: the target share of token updates skipped). Such a change cannot be
            merged into the weights; ``save_delta`` stores the thresholds
            (docs/token_gate.md).

    Everything else gets ``requires_grad=False``: LayerNorms, position embedding, class /
    register tokens and every weight without a selected entry. Validates everything before
    touching the model: a failed call leaves it unchanged.

    Returns:
        A :class:`MaskHandle`: ``handle.merge_and_unload()`` keeps the trained values as plain
        weights, ``handle.unload()`` restores the model as it was, ``with
        handle.disable_adapter():`` computes the model as it was for a while.
    """
    base = _check_arguments(model, selection, storage)
    gate = TokenGate.coerce(token_gate)
    if gate is not None and storage != "sparse":
        raise TrptsValueError("token_gate needs storage='sparse' (the gate applies the compact change per token); "
                              "pass storage='sparse'")
    named = dict(base.named_parameters())
    masked, frozen, full, base_values = _split_selection(base, named, selection, storage)
    if train_head:
        full.update({n: named[n] for n in _head_names(base, extra_trainable) if n not in full})
    if train_biases:
        full.update({n: p for n, p in _biases_of(base, named, masked).items() if n not in full})
    full.update({n: p for n, p in _extra(base, named, masked, extra_trainable).items() if n not in full})
    if storage == "sparse":
        owners = _owners(base, named, masked)
        handle: MaskHandle = SparseMaskHandle(base, selection, masked, frozen, full, base_values, owners, gate)
    else:
        handle = MaskHandle(base, selection, masked, frozen, full, base_values)
    handle._install()
    return handle


def _check_arguments(model: nn.Module, selection: Selection, storage: str) -> nn.Module:
    """Validate :func:`apply_masks`' arguments; the unwrapped model."""
    if not isinstance(model, nn.Module):
        raise TrptsTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(selection, Selection):
        raise TrptsTypeError(
            f"selection must be a trpts.Selection (from allocate_connections), got {type(selection).__name__}"
        )
    if storage not in ("hooks", "sparse"):
        raise TrptsValueError(f"storage must be 'hooks' or 'sparse', got {storage!r}")
    base = unwrap_model(model)
    bank = model_state(base).deltas
    if bank is not None and bank.active is not None and bank.tasks[bank.active].thresholds:
        raise TrptsRuntimeError(
            f"the active delta {bank.active!r} is token-gated, which trpts cannot resume training from yet; "
            "call trpts.activate_delta(model, None) first (training then starts from the plain backbone)")
    if get_mask_handle(base) is not None:
        raise TrptsRuntimeError(
            "this model already has masks applied; call handle.merge_and_unload() or handle.unload() "
            "(the handle is trpts.get_mask_handle(model)) before applying another selection"
        )
    return base


def _split_selection(base: nn.Module, named: dict[str, nn.Parameter], selection: Selection, storage: str,
                     ) -> tuple[dict[str, nn.Parameter], dict[str, Tensor], dict[str, nn.Parameter], dict[str, Tensor]]:
    """``(masked, frozen, full, base_values)``: the selected weights with frozen entries, their
    frozen-entry masks (bool, hooks storage only), those selected in full, and the pretrained
    values at the selected entries (1-D, the delta fingerprint)."""
    masked: dict[str, nn.Parameter] = {}
    frozen: dict[str, Tensor] = {}
    full: dict[str, nn.Parameter] = {}
    base_values: dict[str, Tensor] = {}
    for name in selection:
        p = named.get(name)
        if p is None:
            raise TrptsKeyError(
                f"selection weight {name!r} is not a parameter of {type(base).__name__}; "
                "was the selection made for another model?"
            )
        info = selection.matrices[name]
        if tuple(p.shape) != info.shape:
            raise TrptsValueError(
                f"selection weight {name!r} has shape {info.shape} but the "
                f"model's parameter has shape {tuple(p.shape)}"
            )
        if info.connections == info.fan_in:
            full[name] = p
        else:
            masked[name] = p
            if storage == "hooks":  # sparse storage needs no dense mask
                frozen[name] = (~selection[name]).to(p.device)
        flat = selection.flat_indices(name).to(p.device)
        base_values[name] = _pretrained_values(base, name, flat, p.detach().reshape(-1)[flat].clone())
    return masked, frozen, full, base_values


def _pretrained_values(base: nn.Module, name: str, flat: Tensor, current: Tensor) -> Tensor:
    """``current`` (values of weight ``name`` at positions ``flat``) with the positions an
    active loaded task delta changed put back to the backbone's values there (resuming)."""
    bank = model_state(base).deltas
    return current if bank is None else bank.pretrained_values(name, flat, current)


def _head_names(base: nn.Module, extra_trainable: Iterable[str]) -> list[str]:
    """The classification head's parameter names; an error when there is none to train."""
    names = get_adapter(base).head_parameters(base)
    if not names and not extra_trainable:
        raise TrptsValueError(
            f"train_head=True but trpts finds no classification head on {type(base).__name__} "
            "(it looks for timm's get_classifier(), Hugging Face's classifier / "
            "get_output_embeddings(), or a top-level head / fc with parameters). Name your head's "
            "parameters with extra_trainable=[...], or pass train_head=False for a bare backbone"
        )
    return names


def _owner_of(base: nn.Module) -> dict[int, nn.Module]:
    return {id(m.weight): m for m in base.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}


def _biases_of(base: nn.Module, named: dict[str, nn.Parameter],
               masked: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """The biases of the masked weights' modules (GPS trains them)."""
    owner, name_of = _owner_of(base), {id(p): n for n, p in named.items()}
    biases = (getattr(owner.get(id(p)), "bias", None) for p in masked.values())
    return {name_of[id(b)]: b for b in biases if isinstance(b, nn.Parameter)}


def _extra(base: nn.Module, named: dict[str, nn.Parameter], masked: dict[str, nn.Parameter],
           extra_trainable: Iterable[str]) -> dict[str, nn.Parameter]:
    """The user's ``extra_trainable`` parameters, checked."""
    out: dict[str, nn.Parameter] = {}
    for raw in extra_trainable:
        name = canonical_name(raw)
        if name not in named:
            raise TrptsKeyError(f"extra_trainable name {raw!r} is not a parameter of {type(base).__name__}")
        if name in masked:
            raise TrptsValueError(f"extra_trainable name {raw!r} is masked by the selection; drop it")
        out[name] = named[name]
    return out


def _owners(base: nn.Module, named: dict[str, nn.Parameter], masked: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """The module owning each masked weight, checked for sparse storage."""
    owner = _owner_of(base)
    owners = {}
    for name in masked:
        module = owner.get(id(named[name]))
        check_sparse_module(name, module)
        owners[name] = module
    return owners
