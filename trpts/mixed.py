"""Mixed-task batches: one forward pass in which every sample uses its own task's delta and head.

A delta loaded with :func:`trpts.load_delta` changes ``k_l`` entries of some weights (and, if it
trained them, whole biases or norms) and brings its own head. :func:`forward_tasks` sorts the
batch by task so that each task's samples are contiguous rows. Wherever the model then calls
``F.linear``, ``F.conv2d`` or ``F.layer_norm`` with a tensor that a task of the batch changed,
the call runs once per task group on that group's rows, with the task's values written into
the shared tensor for the call and the backbone's values written back right after (``k_l``
writes per group and layer: no copy of the weight, no dense ``W + dW``). So each group computes
with exactly the weights :func:`trpts.activate_delta` would give it; the only difference from a
one-task batch is the matmul's rounding for a different number of rows.

When the groups are small (under 1,024 rows of a layer's input each, e.g. 5 images of 197
tokens), a linear layer whose changes touch few input columns (Fisher
selections do: on a pretrained DINOv2 ViT-S at 0.5 %, each layer's entries sit in 5-30 of its
384 or 1,536 input columns) runs instead as one matmul over the whole batch with the backbone's
weight, plus, for each group, the change as a skinny matmul over those columns: ``W0 x + dW x``
rather than ``(W0 + dW) x``, equal up to float rounding (a few ulps of the output). Splitting a
matmul into small blocks costs more than that extra pass over the output.
Each head is swapped, for the call, for one that applies every group's own head to its rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._utils import forget_autocast_casts, unwrap_model
from .delta import _Bank, _bank, _refuse_while_training, loaded_deltas
from .errors import TrptsKeyError, TrptsTypeError, TrptsValueError
from .tokens import apply_token_config, get_token_config

__all__ = ["forward_tasks"]

# The calls a changed tensor may appear in, and the argument positions of weight and bias.
_SLOTS: dict[Any, tuple[tuple[int, str], ...]] = {
    F.linear: ((1, "weight"), (2, "bias")),
    F.conv2d: ((1, "weight"), (2, "bias")),
    F.layer_norm: ((2, "weight"), (3, "bias")),
}
# A weight change is applied as ``W0 x + dW x`` when it touches at most 1/_SKINNY of the inputs.
_SKINNY = 8
_WRITE = "write"  # a group whose values must be written into the weight for its rows
# ... and only when the call's groups average fewer than _ADD_BELOW_ROWS rows: larger per-group
# matmul blocks cost less than the extra pass over the output that adding takes (CPU, ViT-B:
# blocks of 788 rows +2.5 % plus the writes, 394 rows +15 %, 197 rows +24 %; adding +4-6 %).
_ADD_BELOW_ROWS = 1024
# Each task's change as (columns, dense change there), built once per loaded delta: keyed by the
# id of the delta's values tensor, and dropped when that tensor goes.
_COLUMNS: dict[int, tuple[Tensor, Tensor] | None] = {}


@dataclass(frozen=True)
class _Patch:
    """How one task changes one tensor: ``values`` at the flat positions ``index`` (``None``:
    the whole tensor), and the backbone's ``base`` values there."""

    index: Tensor | None
    values: Tensor
    base: Tensor

    def write(self, t: Tensor, values: Tensor) -> None:
        if self.index is None:
            t.copy_(values)
        else:
            t.view(-1).index_put_((self.index,), values)

    def change(self, t: Tensor) -> Tensor:
        """The change to ``t`` as a dense tensor of its shape (for biases and norms)."""
        if self.index is None:
            return self.values - self.base
        return t.new_zeros(t.shape).view(-1).index_put_((self.index,), self.values - self.base).view(t.shape)

    def columns(self, weight: Tensor) -> tuple[Tensor, Tensor] | None:
        """For a linear ``weight`` ``[out, in]``: the input columns ``cols`` the change touches
        (int64, sorted) and the change there, ``[out, len(cols)]`` in the weight's dtype; ``None``
        when it touches more than ``in / _SKINNY`` columns or the whole tensor."""
        if self.index is None or weight.ndim != 2:
            return None
        key = id(self.values)
        if key not in _COLUMNS:
            index = self.index.to(weight.device)
            rows, cols = index // weight.shape[1], index % weight.shape[1]
            used, position = torch.unique(cols, return_inverse=True)
            dense = None
            if used.numel() * _SKINNY <= weight.shape[1]:
                dense = weight.new_zeros((weight.shape[0], used.numel()))
                dense.index_put_((rows, position), (self.values - self.base).to(weight.device, weight.dtype))
            _COLUMNS[key] = (used, dense) if dense is not None else None
            weakref.finalize(self.values, _COLUMNS.pop, key, None)
        return _COLUMNS[key]


class _MixedCalls(TorchFunctionMode):
    """Runs every call that uses a changed tensor once per task group, on the group's rows."""

    def __init__(self, groups: list[slice], patches: dict[int, list[_Patch | None]], names: dict[int, str],
                 batch: int):
        super().__init__()
        self.groups, self.patches, self.names, self.batch = groups, patches, names, batch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        changed = [t for t in tree_flatten((args, kwargs))[0] if id(t) in self.patches]
        if not changed:
            return func(*args, **kwargs)
        if getattr(func, "__name__", None) == "__get__":  # an attribute: dtype, shape, device, ...
            out = func(*args, **kwargs)
            if not isinstance(out, Tensor):  # .data, .T, ... would alias the values: refused below
                return out
        slots = _SLOTS.get(func)
        used = [_slot_value(args, kwargs, i, k) for i, k in slots] if slots else []
        stray = [t for t in changed if not any(t is u for u in used)]
        if stray:
            raise TrptsValueError(
                f"a task of this batch changes {self.names[id(stray[0])]!r}, which the model uses in "
                f"{getattr(func, '__name__', func)!s}, not as the weight or bias of F.linear, F.conv2d or "
                "F.layer_norm; forward_tasks cannot apply it per sample. Run those tasks one at a time "
                "(activate_delta)")
        x = args[0]
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[0] != self.batch:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise TrptsValueError(
                f"the model applies the changed {self.names[id(changed[0])]!r} to an input of shape {shape}, "
                f"whose first dimension is not the batch ({self.batch}); forward_tasks needs batch-first "
                "inputs there. Run the tasks one at a time (activate_delta)")
        if func is F.linear:
            fixes = [self._fix(g, *used) for g in range(len(self.groups))]
            small = x.numel() // max(1, x.shape[-1]) < _ADD_BELOW_ROWS * len(self.groups)
            adding = small and any(isinstance(f, _Fix) for f in fixes)
            if _plain_linear(x, used[0]):
                return self._linear(x, used[0], used[1], changed, fixes if adding else None)
            if adding:
                return self._base_and_fixes(args, kwargs, x, changed, fixes)
        return self._per_group(func, args, kwargs, x, changed)

    def _per_group(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor,
                   changed: list[Tensor]) -> Tensor:
        """``func`` once per group on its rows, with its values written in; outputs concatenated."""
        outs = []
        for g, rows in enumerate(self.groups):
            with self._patched(changed, g):
                outs.append(func(x[rows], *args[1:], **kwargs))
        return torch.cat(outs)

    def _fix(self, group: int, weight: Any, bias: Any) -> _Fix | str | None:
        """How ``group`` differs in ``F.linear(x, weight, bias)``: ``None`` (not at all), a
        :class:`_Fix` to add to the backbone's output, or ``_WRITE`` (its values must be written in:
        a change spread over many input columns)."""
        patch_w, patch_b = (self.patches[id(t)][group] if id(t) in self.patches else None for t in (weight, bias))
        if patch_w is None and patch_b is None:
            return None
        columns = patch_w.columns(weight) if patch_w is not None else None
        if patch_w is not None and columns is None:
            return _WRITE
        cols, dw = columns if columns is not None else (None, None)
        return _Fix(cols, dw, patch_b.change(bias) if patch_b is not None else None)

    def _base_and_fixes(self, args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor, changed: list[Tensor],
                        fixes: list[_Fix | str | None]) -> Tensor:
        """``F.linear`` over the whole batch with the backbone's values, then each group's fix:
        its change added (``W0 x + dW x``) or its rows recomputed with its values written in."""
        out = F.linear(*args, **kwargs)
        for g, (rows, fix) in enumerate(zip(self.groups, fixes, strict=True)):
            if fix == _WRITE:
                with self._patched(changed, g):
                    out[rows] = F.linear(x[rows], *args[1:], **kwargs)
            elif isinstance(fix, _Fix):
                fix.add_to(out[rows], x[rows], plain=False)
        return out

    @contextmanager
    def _patched(self, changed: list[Tensor], group: int) -> Iterator[None]:
        """The tensors ``changed`` hold task ``group``'s values inside the block."""
        todo = [(t, p) for t in changed if (p := self.patches[id(t)][group]) is not None]
        for t, p in todo:
            p.write(t, p.values)
        forget_autocast_casts(t for t, _ in todo)
        try:
            yield
        finally:
            for t, p in todo:
                p.write(t, p.base)
            forget_autocast_casts(t for t, _ in todo)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, changed: list[Tensor],
                fixes: list[_Fix | str | None] | None) -> Tensor:
        """``F.linear`` straight into one output, on row slices (``addmm(out=)``: no concatenation
        pass over the activations). With ``fixes``: the backbone's values over all rows, then each
        group's fix (added, or its rows recomputed with its values written in); without: group by
        group with its values written in."""
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))
        x2, o2 = x.view(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        per = x2.shape[0] // self.batch  # rows per sample (tokens)
        if fixes is not None:
            _addmm(x2, weight, bias, o2)
        for g, rows in enumerate(self.groups):
            r = slice(rows.start * per, rows.stop * per)
            if fixes is None or fixes[g] == _WRITE:
                with self._patched(changed, g):
                    _addmm(x2[r], weight, bias, o2[r])
            elif isinstance(fix := fixes[g], _Fix):
                fix.add_to(o2[r], x2[r], plain=True)
        return out


@dataclass(frozen=True)
class _Fix:
    """A group's change to one ``F.linear`` as a term to add to the backbone's output: the weight's
    change over the input columns ``cols`` (``dw``: ``[out, len(cols)]``) and the bias's ``db``."""

    cols: Tensor | None
    dw: Tensor | None
    db: Tensor | None

    def add_to(self, out: Tensor, x: Tensor, plain: bool) -> None:
        """``out += dW x + db`` for one group's rows (``plain``: 2-D tensors of the weight's
        dtype outside autocast, added in place by ``addmm_``)."""
        if self.dw is not None:
            picked = x.index_select(-1, self.cols)
            if plain:
                out.addmm_(picked, self.dw.t())
            else:
                out.add_(F.linear(picked, self.dw))
        if self.db is not None:
            out.add_(self.db)


def _addmm(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _plain_linear(x: Tensor, weight: Any) -> bool:
    """Whether ``F.linear(x, weight)`` can be written as ``addmm`` into row slices: same dtype,
    contiguous input, no autocast (which ``out=`` does not follow)."""
    return (isinstance(weight, Tensor) and x.dtype == weight.dtype and x.is_contiguous() and x.ndim >= 2
            and not torch.is_autocast_enabled(x.device.type))


def _slot_value(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, keyword: str) -> Any:
    return args[position] if len(args) > position else kwargs.get(keyword)


class _MixedHead(nn.Module):
    """Applies each group's head to its rows; outputs padded with zeros to the widest head."""

    def __init__(self, heads: list[nn.Module], groups: list[slice]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.groups = groups
        self.width = max(int(h.out_features) for h in heads)

    def forward(self, x: Tensor) -> Tensor:
        outs = [head(x[rows]) for head, rows in zip(self.heads, self.groups, strict=True)]
        out = outs[0].new_zeros((x.shape[0], *outs[0].shape[1:-1], self.width))  # the heads' dtype
        for o, rows in zip(outs, self.groups, strict=True):
            out[rows, ..., :o.shape[-1]] = o
        return out


def forward_tasks(model: nn.Module, inputs: Tensor, tasks: Sequence[str | None]) -> list[Tensor]:
    """Run one batch in which every sample uses the delta and head of its own task.

    Args:
        model: a backbone with deltas loaded by :func:`trpts.load_delta` (not being trained).
        inputs: the batch, ``(B, C, H, W)`` pixel values (any dtype the model takes).
        tasks: ``B`` names of loaded deltas, one per sample; ``None`` means the plain backbone.

    Returns:
        ``B`` logits tensors, ``[classes of that sample's task]`` each, in input order. Each
        equals the sample's output with its task activated alone up to the matmul's rounding
        for a different number of rows (float32: well within ``1e-5``; often bit-identical).

    Runs under ``torch.no_grad``. Every name is checked before anything runs (unknown names
    raise :class:`TrptsKeyError`). Tasks whose token-selection settings differ (one selects
    tokens, another does not) cannot share one pass exactly: the batch then runs as one pass
    per setting, each still mixing its tasks. The model's active task, heads and token
    selection are as before afterwards, also after an error.
    """
    base = unwrap_model(model)
    bank = _checked_bank(base, inputs, tasks)
    out: list[Tensor] = []
    rows: list[int] = []
    previous = bank.active
    with torch.no_grad():
        bank.deactivate()
        try:
            for tokens, samples in _by_tokens(bank, tasks):
                index = torch.tensor(samples, dtype=torch.int64, device=inputs.device)
                out += _one_pass(base, bank, inputs[index], [tasks[i] for i in samples], tokens)
                rows += samples
        finally:
            bank.activate(previous)
    return [out[i] for i in sorted(range(len(rows)), key=rows.__getitem__)]


def _one_pass(base: nn.Module, bank: _Bank, inputs: Tensor, tasks: list[str | None],
              tokens: dict[str, Any] | None) -> list[Tensor]:
    """One forward pass of tasks that share the token-selection settings ``tokens``."""
    order, names, groups = _group(tasks)
    with _tokens(base, bank, tokens), _heads(bank, names, groups) as widths:
        patches, labels = _patches(bank, names)
        with _MixedCalls(groups, patches, labels, len(tasks)):
            logits = bank.adapter.logits(base(inputs[order.to(inputs.device)]))
    return _unsort(logits, order, groups, widths)


def _checked_bank(base: nn.Module, inputs: Any, tasks: Sequence[str | None]) -> _Bank:
    """The model's loaded deltas, after checking ``inputs`` and ``tasks`` (nothing has run yet)."""
    if not isinstance(inputs, Tensor) or inputs.ndim == 0:
        raise TrptsTypeError(f"inputs must be a batch tensor (B, C, H, W), got {type(inputs).__name__}")
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TrptsTypeError("tasks must be a sequence of task names (or None), one per sample")
    if len(tasks) != inputs.shape[0]:
        raise TrptsValueError(f"tasks names {len(tasks)} samples but inputs hold {inputs.shape[0]}: "
                              "give one task name (or None) per sample")
    bank = _bank(base)
    unknown = sorted({t for t in tasks if t is not None and (bank is None or t not in bank.tasks)}, key=str)
    if unknown:
        raise TrptsKeyError(f"no delta named {', '.join(map(repr, unknown))} is loaded (loaded: "
                            f"{loaded_deltas(base)}); load it with trpts.load_delta(model, path, name=...)")
    if bank is None:
        raise TrptsValueError("no delta is loaded on this model; load deltas with trpts.load_delta first")
    _refuse_while_training(base, "forward_tasks")
    gated = sorted({t for t in tasks if t is not None and bank.tasks[t].thresholds}, key=str)
    if gated:
        raise TrptsValueError(f"forward_tasks does not mix token-gated deltas ({', '.join(map(repr, gated))}): "
                              "activate each with trpts.activate_delta(model, name) and run its samples alone")
    return bank


def _group(tasks: Sequence[str | None]) -> tuple[Tensor, list[str | None], list[slice]]:
    """A stable order that makes each task's samples contiguous, the tasks in order of first
    appearance, and each task's rows in that order."""
    names = list(dict.fromkeys(tasks))
    position = {n: i for i, n in enumerate(names)}
    keys = torch.tensor([position[t] for t in tasks], dtype=torch.int64)
    order = torch.sort(keys, stable=True).indices
    sizes = torch.bincount(keys, minlength=len(names)).tolist()
    starts = [sum(sizes[:i]) for i in range(len(names))]
    return order, names, [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def _by_tokens(bank: _Bank, tasks: Sequence[str | None]) -> list[tuple[dict[str, Any] | None, list[int]]]:
    """The samples of each token-selection setting (a task's recorded one, or the backbone's
    for ``None`` and for deltas loaded with ``tokens=False``), in order of first appearance."""
    original = bank.original_tokens.to_dict() if bank.original_tokens is not None else None
    settings: dict[str, tuple[Any, list[int]]] = {}
    for i, n in enumerate(tasks):
        wanted = bank.tasks[n].meta["tokens"] if n is not None and bank.tasks[n].apply_tokens else original
        settings.setdefault(repr(wanted), (wanted, []))[1].append(i)
    return list(settings.values())


@contextmanager
def _tokens(base: nn.Module, bank: _Bank, tokens: dict[str, Any] | None) -> Iterator[None]:
    """The batch's token selection for the call; the backbone's own afterwards."""
    current = get_token_config(base)
    change = repr(tokens) != repr(current.to_dict() if current is not None else None)
    if change:
        apply_token_config(base, tokens)
    try:
        yield
    finally:
        if change:
            apply_token_config(base, bank.original_tokens)


@contextmanager
def _heads(bank: _Bank, names: list[str | None], groups: list[slice]) -> Iterator[list[int]]:
    """Swap each head for a :class:`_MixedHead`; yields each group's number of classes."""
    paths = [p for p in bank.original_heads if any(n is not None and p in bank.tasks[n].heads for n in names)]
    per_group = {p: [bank.tasks[n].heads.get(p, h) if n is not None else h for n in names]
                 for p, h in bank.original_heads.items() if p in paths}
    first = next(iter(bank.original_heads.values()), None)
    widths = [int(per_group[paths[0]][g].out_features) if paths else
              (int(first.out_features) if isinstance(first, nn.Linear) else -1) for g in range(len(names))]
    try:
        for p in paths:
            bank._set_module(p, _MixedHead(per_group[p], groups))
        yield widths
    finally:
        for p in paths:
            bank._set_module(p, bank.original_heads[p])


def _patches(bank: _Bank, names: list[str | None]) -> tuple[dict[int, list[_Patch | None]], dict[int, str]]:
    """For every tensor a task of the batch changes: each group's patch (``None``: unchanged)."""
    patches: dict[int, list[_Patch | None]] = {}
    labels: dict[int, str] = {}
    for g, n in enumerate(names):
        if n is None:
            continue
        task = bank.tasks[n]
        changes = [(m, _Patch(i, task.values[m], task.base_values[m])) for m, i in task.index.items()]
        changes += [(m, _Patch(None, v, task.base_full[m])) for m, v in task.full.items()]
        for m, patch in changes:
            t = bank.params[m]
            patches.setdefault(id(t), [None] * len(names))[g] = patch
            labels[id(t)] = m
    return patches, labels


def _unsort(logits: Tensor, order: Tensor, groups: list[slice], widths: list[int]) -> list[Tensor]:
    """Per-sample logits in input order, each cut to its task's number of classes."""
    out: list[Tensor] = [logits[0]] * len(order)
    for rows, width in zip(groups, widths, strict=True):
        for r in range(rows.start, rows.stop):
            out[int(order[r])] = logits[r, :width] if width >= 0 else logits[r]
    return out
