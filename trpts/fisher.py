"""Diagonal empirical Fisher information (paper eq. 2).

``F(theta) ~= E_(x,y) [ (dL_CE / dtheta)^2 ]``, estimated from a few batches of the
user's own data, accumulated in float32 and, under ``torch.distributed``, summed
over all ranks so that every rank gets identical scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._sharding import gathered_weights, is_sharded
from ._utils import canonical_name, iter_limited, unwrap_model
from .errors import TrptsKeyError, TrptsTypeError, TrptsValueError
from .models import ModelAdapter, get_adapter

__all__ = ["compute_fisher", "default_scored_parameters"]

LossFn = Callable[[Any, Tensor], Tensor]
ParamSelector = Iterable[str] | Callable[[str, nn.Parameter], bool] | None
Score = Literal["fisher", "gradient"]
#: ``compute_fisher``'s default number of batches (see ``benchmarks/fisher_batches.py``).
DEFAULT_BATCHES = 16

_VMAP_WARNING = "There is a performance drop because we have not yet implemented the batching rule"


def default_scored_parameters(model: nn.Module) -> list[str]:
    """Names scored by default (model order): for a known family, the weight of every
    ``nn.Linear`` inside the transformer blocks and the patch-embedding projection's weight;
    for any other module, every ``nn.Linear`` weight except the classification head's."""
    base = unwrap_model(model)
    return get_adapter(base).scored_parameters(base)


def _resolve_params(base: nn.Module, adapter: ModelAdapter, params: ParamSelector) -> dict[str, nn.Parameter]:
    named = dict(base.named_parameters())
    if params is None:
        names = adapter.scored_parameters(base)
        if not names:
            raise TrptsValueError(
                f"{type(base).__name__} has no weights to score by default (nn.Linear layers outside "
                "the head, or a known family's blocks and patch embedding); pass params=[...] explicitly"
            )
    elif callable(params):
        names = [n for n, p in named.items() if params(n, p)]
    elif isinstance(params, str):
        raise TrptsTypeError("params must be an iterable of parameter names, not a single string")
    else:
        names = [canonical_name(n) for n in params]
        unknown = [n for n in names if n not in named]
        if unknown:
            raise TrptsKeyError(
                f"params names {unknown[:5]} are not parameters of {type(base).__name__}; "
                f"use names from model.named_parameters() (e.g. {next(iter(named), '?')!r})"
            )
    if not names:
        raise TrptsValueError("params selected no parameters; nothing to score")
    return {n: named[n] for n in dict.fromkeys(names)}


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) else x


@contextmanager
def _preserved_state(model: nn.Module, scored: dict[str, nn.Parameter], train_mode: bool):
    """Set up the model for scoring and put back flags, modes and buffers afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if train_mode else []
    scored_ids = {id(p) for p in scored.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in scored_ids)
        model.train(train_mode)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def compute_fisher(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    num_batches: int | None = DEFAULT_BATCHES,
    per_sample: bool = False,
    params: ParamSelector = None,
    train_mode: bool = False,
    chunk_size: int = 16,
    progress: bool = True,
    score: Score = "fisher",
    scores_device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher scores of the model's parameters on ``data`` (paper eq. 2).

    Args:
        model: any ``nn.Module`` (optionally wrapped in DDP or ``torch.compile``): a timm /
            Hugging Face ViT, a bare backbone, or a model trpts has no adapter for. Left
            exactly as it was found.
        data: iterable of ``(inputs, targets)`` tuples or of dicts with ``pixel_values``
            and ``labels``; inputs ``(B, C, H, W)``, targets ``(B,)`` int64.
        loss_fn: ``loss_fn(output, targets) -> scalar`` averaged over the batch, where
            ``output`` is what the model returns, unchanged (a tensor, a Hugging Face
            ``ModelOutput`` such as a bare ``Dinov2Model``'s, a tuple). Default: cross-entropy
            on the logits (the output itself, its ``.logits``, or its first element).
        num_batches: read at most this many batches (default 16: a few batches, not a training
            epoch; on the real-backbone benchmark 16 batches of 32 images select 84 % of the
            entries that all 800 training images select, 8 batches 73 %, see
            ``benchmarks/fisher_batches.py``); ``None``: the whole iterable.
        per_sample: exact mode; squares each sample's gradient (``torch.func.vmap``,
            ``chunk_size`` samples at a time). Default: the microbatch estimate, which
            squares each batch's mean gradient ``g_b`` and weights it by the batch size
            ``n_b``: ``sum_b n_b g_b^2 / sum_b n_b``. With per-sample gradients of mean
            ``mu`` and variance ``s^2`` its expectation is ``s^2 + n mu^2`` where the exact
            Fisher is ``s^2 + mu^2``: identical for ``n = 1``, and ranking-equivalent when
            the gradient noise dominates the mean (as it does for a pretrained model).
        params: which parameters to score: ``None`` (a known family: the weights of every
            ``nn.Linear`` inside the blocks plus the patch-embedding projection; any other
            model: every ``nn.Linear`` weight but the head's), an iterable of names, or a
            predicate ``(name, param) -> bool``.
        train_mode: score in training mode (dropout / drop-path active). Default: eval mode.
        chunk_size: samples per vmap call in ``per_sample`` mode (memory ~ chunk x params).
        progress: show a tqdm progress bar.
        score: ``"fisher"`` (default, eq. 2: the mean squared gradient) or ``"gradient"``: the
            magnitude of the mean gradient, ``|sum_b n_b g_b| / sum_b n_b`` (per sample:
            ``|mean_i g_i|``), GPS's score, which favours entries whose gradient keeps one
            sign over the data over entries with large but noisy gradients.
        scores_device: where the float32 accumulators and the returned scores live, e.g.
            ``"cpu"`` for a model whose scores (4 bytes per scored weight) do not fit beside
            it on the GPU: each gradient is then moved there and freed one tensor at a time.
            Default: each parameter's own device. Under ``torch.distributed`` the process
            group needs a backend for that device (``init_process_group("cpu:gloo,cuda:nccl")``).

    Returns:
        ``{name: scores}`` keyed by ``model.named_parameters()`` names (DDP's ``module.``
        and compile's ``_orig_mod.`` prefixes removed); each value is float32, on the
        parameter's device (or ``scores_device``), of the parameter's shape, finite and ``>= 0``.
    """
    _check_arguments(model, num_batches, chunk_size, score)
    target = _scores_device(scores_device)
    base = unwrap_model(model)
    adapter = get_adapter(base)
    scored = _resolve_params(base, adapter, params)
    sharded = any(is_sharded(p) for p in scored.values())
    if sharded and per_sample:
        raise TrptsValueError("per_sample=True is not supported on a model sharded with fully_shard; use the "
                              "default microbatch estimate, or score before fully_shard")
    default_loss = loss_fn is None
    if loss_fn is None:
        def loss_fn(output: Any, targets: Tensor) -> Tensor:  # cross-entropy on the logits
            return _cross_entropy(adapter.logits(output), targets)
    device = next(iter(scored.values())).device
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=target or p.device) for n, p in scored.items()}
    count, classes = 0, None
    with (_preserved_state(base, scored, train_mode), gathered_weights(base, list(scored), sharded) as weights,
          torch.inference_mode(False), torch.enable_grad()):
        for batch in _progress_bar(data, num_batches, progress):
            inputs, targets = (_to(t, device) for t in adapter.batch(batch))
            n = _batch_size(targets, default_loss)
            if n == 0:
                continue
            classes = _check_batch(base, adapter, inputs, targets, n, default_loss, classes)
            if per_sample:
                _accumulate_per_sample(base, scored, sums, inputs, targets, loss_fn, chunk_size, train_mode,
                                       score)
            else:
                _accumulate_batch(base, scored if weights is None else weights, sums, inputs, targets, loss_fn, n, score)
            count += n
    return _average(sums, count, device, score)


def _check_arguments(model: Any, num_batches: Any, chunk_size: Any, score: Any) -> None:
    if score not in ("fisher", "gradient"):
        raise TrptsValueError(f"score must be 'fisher' (eq. 2) or 'gradient' (|mean gradient|), got {score!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise TrptsValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise TrptsValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if not isinstance(model, nn.Module):
        raise TrptsTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _scores_device(scores_device: Any) -> torch.device | None:
    if scores_device is None:
        return None
    try:
        device = torch.device(scores_device)
    except (RuntimeError, TypeError):
        raise TrptsValueError(f"scores_device must be a torch.device or a device string such as 'cpu' or "
                              f"'cuda:0', got {scores_device!r}") from None
    if device.type == "meta":
        raise TrptsValueError("scores_device='meta' holds no values; pass 'cpu' or a GPU")
    return device


def _batch_size(targets: Any, default_loss: bool) -> int:
    """Samples in a batch, from its targets (checked for the default loss)."""
    if default_loss:
        ok = isinstance(targets, Tensor) and ((targets.dtype == torch.int64 and targets.ndim == 1)
                                              or (targets.is_floating_point() and targets.ndim == 2))
        if not ok:
            got = (f"{targets.dtype} of shape {tuple(targets.shape)}" if isinstance(targets, Tensor)
                   else type(targets).__name__)
            raise TrptsTypeError(
                "the default loss (cross-entropy) needs targets as int64 class indices of shape (batch,) "
                f"(or float class probabilities (batch, classes)); got {got}. Convert them (y.long(), "
                "y.view(-1)), or pass loss_fn=(output, targets) -> scalar loss"
            )
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.ndim else 1
    try:
        return len(targets)
    except TypeError:
        raise TrptsTypeError(f"cannot tell the batch size from targets of type {type(targets).__name__}; "
                             "pass a tensor or a sequence") from None


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The default loss; logits ``(B, classes)``, targets ``(B,)`` int64 or ``(B, classes)`` float."""
    if logits.ndim != 2:
        raise TrptsValueError(
            f"the default loss (cross-entropy) needs logits of shape (batch, classes); the model returned "
            f"{tuple(logits.shape)} (a model without pooling, e.g. timm global_pool=''?). Pass "
            "loss_fn=(output, targets) -> scalar loss"
        )
    if targets.shape[0] != logits.shape[0] or (targets.ndim == 2 and targets.shape != logits.shape):
        raise TrptsValueError(f"targets of shape {tuple(targets.shape)} do not match the logits "
                              f"{tuple(logits.shape)} (batch, classes)")
    return F.cross_entropy(logits, targets)


def _check_batch(base: nn.Module, adapter: ModelAdapter, inputs: Any, targets: Any, n: int, default_loss: bool,
                 classes: int | None) -> int | None:
    """Inputs and targets agree on the batch size, and (default loss) class indices lie within
    the model's outputs, checked per batch outside any vmap. Returns the number of outputs
    (found once, from one sample), or ``None`` when it was not needed."""
    if isinstance(inputs, Tensor) and inputs.ndim and int(inputs.shape[0]) != n:
        raise TrptsValueError(f"a batch's inputs hold {int(inputs.shape[0])} samples but its targets {n}: "
                              "targets do not match the inputs")
    if not (default_loss and isinstance(inputs, Tensor) and targets.ndim == 1 and targets.numel()):
        return classes
    if classes is None:
        with torch.no_grad():
            classes = int(adapter.logits(base(inputs[:1])).shape[-1])
    if not (0 <= int(targets.min()) and int(targets.max()) < classes):
        raise TrptsValueError(f"class indices must lie in 0..{classes - 1} (the model has {classes} "
                              f"outputs); got {int(targets.min())}..{int(targets.max())}")
    return classes


def _progress_bar(data: Iterable[Any], num_batches: int | None, progress: bool) -> Iterable[Any]:
    """The first ``num_batches`` batches of ``data`` behind a tqdm bar (off unless ``progress``)."""
    from tqdm.auto import tqdm

    total = num_batches
    if hasattr(data, "__len__"):
        total = len(data) if total is None else min(total, len(data))  # type: ignore[arg-type]
    return tqdm(iter_limited(data, num_batches), total=total, desc="trpts Fisher",
                unit="batch", disable=not progress, leave=False)


def _accumulate_batch(base: nn.Module, scored: dict[str, Tensor], sums: dict[str, Tensor],
                      inputs: Any, targets: Tensor, loss_fn: LossFn, n: int, score: Score) -> None:
    """Add ``n g_b^2`` (``"gradient"``: ``n g_b``) of one batch's mean gradient ``g_b`` to
    ``sums`` (the microbatch estimate). ``scored``: the tensors to differentiate, by name (the
    parameters, or under ``fully_shard`` the gathered weights the forward fills in)."""
    loss = loss_fn(base(inputs), targets)
    grads = list(torch.autograd.grad(loss, list(scored.values()), allow_unused=True))
    for i, name in enumerate(scored):
        g, grads[i] = grads[i], None  # moved and freed one tensor at a time (scores_device)
        if g is not None:
            g = g.to(sums[name].device, torch.float32)
            if score == "gradient":
                sums[name].add_(g, alpha=float(n))
            else:
                sums[name].addcmul_(g, g, value=float(n))
            del g


def _average(sums: dict[str, Tensor], count: int, device: torch.device, score: Score) -> dict[str, Tensor]:
    """``sums / samples`` (``"gradient"``: its magnitude), both summed over ranks under
    ``torch.distributed``; checked finite."""
    count_t = torch.tensor([float(count)], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count_t)
        for s in sums.values():
            torch.distributed.all_reduce(s)
    total_count = float(count_t.item())
    if total_count == 0:
        raise TrptsValueError(
            "data yielded no samples; pass a non-empty iterable of (inputs, targets) batches"
        )
    fisher = {name: s.div_(total_count) for name, s in sums.items()}
    if score == "gradient":
        fisher = {name: s.abs_() for name, s in fisher.items()}
    bad = [n for n, s in fisher.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise TrptsValueError(
            f"Fisher scores of {bad[:3]} are not finite (the loss or its gradient overflowed); "
            "score in float32, or lower the loss scale"
        )
    return fisher


def _accumulate_per_sample(
    base: nn.Module,
    scored: dict[str, nn.Parameter],
    sums: dict[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    chunk_size: int,
    train_mode: bool,
    score: Score = "fisher",
) -> None:
    """Add ``sum_i g_i^2`` (``"gradient"``: ``sum_i g_i``) over the samples of one batch to
    ``sums`` (exact, via vmap)."""
    from torch.func import functional_call, grad, vmap

    if not isinstance(inputs, Tensor):
        raise TrptsTypeError("per_sample=True needs tensor inputs")
    primal = {n: p.detach() for n, p in scored.items()}
    frozen = {n: p.detach() for n, p in base.named_parameters() if n not in scored}
    frozen.update(dict(base.named_buffers()))

    def sample_loss(weights: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(base, (weights, frozen), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0),
                           randomness="different" if train_mode else "error")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_VMAP_WARNING)
        for start in range(0, int(inputs.shape[0]), chunk_size):
            grads = per_sample_grad(primal, inputs[start : start + chunk_size],
                                    targets[start : start + chunk_size])
            for name in list(grads):
                g = grads.pop(name).float()
                g = g.sum(0) if score == "gradient" else g.square_().sum(0)
                sums[name].add_(g.to(sums[name].device))
                del g
