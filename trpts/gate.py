"""Token-selective deltas (TS-PEFT's gate): apply a layer's sparse change only where it matters.

A gated linear layer with frozen weight ``W0`` (bias ``b``) and sparse change ``dW`` (the
selected entries' values minus their pretrained values) computes, per token ``x_i``::

    h_i = W0 x_i + b + S_i * (dW x_i),   S_i = 1(r_i >= tau_l),   r_i = ||dW x_i|| / ||W0 x_i + b||

with one threshold ``tau_l`` per layer (Ma et al., arXiv 2511.16147; the ratio's denominator
here is the frozen layer's whole output). ``dW x`` runs over the few input columns the change
touches (``[..., m] @ [m, out]``), so the gate costs one small extra matmul per layer.

**How tau is learned** (TS-PEFT's training rule is not public; this is trpts' choice, see
``docs/token_gate.md``): ``tau_l = g_l * s_l`` with ``s_l`` a running mean of the layer's
ratios (so ``g_l`` is dimensionless, 0 at the start: every token updated) and ``g_l`` moved
at every backward by a projected, RMS-normalised step of

- the task loss' straight-through derivative in ``tau`` (the indicator's derivative replaced
  by a sigmoid's of width ``temperature * s_l``): positive where skipping more tokens hurts;
- minus a pressure ``lambda`` shared by all gated layers, raised while fewer than ``skip`` of
  the token updates are skipped and lowered while more are (dual ascent on the target).

Layers whose change the loss needs resist the pressure and keep more tokens, so the learned
skip shares differ per layer. All of it runs on the device without synchronisation, outside
the user's optimizer (the thresholds are not parameters); the selected values get the gated
gradient ``S_i * dL/dh_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import TrptsTypeError, TrptsValueError

__all__ = ["TokenGate", "token_gate_stats"]

GATE = "trpts_gate"  # dimensionless threshold g_l (persistent buffer, float32 scalar)
SCALE = "trpts_ratio_scale"  # running mean of the layer's ratios s_l (persistent buffer)
ATTR = "_trpts_gate"  # the module's gate object (a plain attribute)
_TINY = 1e-12
_EMA = 0.9  # running means of the ratio scale and of the squared task term
_DUAL_RATE = 0.2  # change of lambda per training step at a skip error of 1
_PROPORTIONAL = 2.0  # pressure per unit of skip error, on top of lambda


@dataclass(frozen=True)
class TokenGate:
    """Settings of the token gate (``apply_masks(..., storage="sparse", token_gate=...)``).

    Args:
        skip: target share of token updates skipped over all gated layers, ``[0, 1)``; the
            layers share it out by how much the loss needs their change. ``0`` learns
            thresholds without pressure (only where skipping helps the loss).
        temperature: width of the straight-through sigmoid, in units of the layer's mean
            ratio, ``> 0``.
        step: how far a threshold moves per training step, in units of the layer's mean
            ratio, ``> 0``.
    """

    skip: float = 0.5
    temperature: float = 0.5
    step: float = 0.05

    def __post_init__(self) -> None:
        for name, low, high in (("skip", 0.0, 1.0), ("temperature", 0.0, None), ("step", 0.0, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TrptsTypeError(f"TokenGate.{name} must be a number, got {type(value).__name__}")
            bad = value < low if name == "skip" else value <= low
            if bad or (high is not None and value >= high) or value != value:
                where = "in [0, 1)" if name == "skip" else "> 0"
                raise TrptsValueError(f"TokenGate.{name} must be {where}, got {value!r}")

    @classmethod
    def coerce(cls, value: Any) -> TokenGate | None:
        """``None``, a :class:`TokenGate`, or a number (the target ``skip``)."""
        if value is None or isinstance(value, TokenGate):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(skip=float(value))
        raise TrptsTypeError(f"token_gate must be None, a number (the target skip share) or a trpts.TokenGate, "
                             f"got {type(value).__name__}")


class Controller:
    """The pressure shared by the gated layers of one model: a PI controller of the skip
    share over all layers towards the target (``lambda``, the integral, is dual ascent on the
    constraint ``skip share == target``; the proportional term damps its overshoot)."""

    def __init__(self, config: TokenGate, layers: int):
        self.config = config
        self.layers = max(1, layers)
        self.pressure: Tensor | None = None  # lambda
        self.skip: Tensor | None = None  # running skip share over the recent layer calls

    def update(self, skipped: Tensor) -> Tensor:
        """Account for one layer's skip share (a float32 scalar); return the pressure."""
        if self.pressure is None or self.pressure.device != skipped.device:
            self.pressure, self.skip = torch.zeros((), device=skipped.device), skipped.clone()
        assert self.skip is not None
        self.skip = self.skip + (skipped - self.skip) / self.layers
        error = self.config.skip - self.skip
        self.pressure = self.pressure + _DUAL_RATE / self.layers * error
        return self.pressure + _PROPORTIONAL * error


class Gate:
    """One layer's gate: its threshold and what it skipped (``tokens``, an int, and
    ``skipped``, a device tensor: counts since the last :func:`token_gate_stats` reset). A learned gate reads ``g_l`` and ``s_l``
    from its module's buffers; a fixed one (a loaded delta) holds ``tau``."""

    def __init__(self, module: nn.Module | None = None, controller: Controller | None = None,
                 tau: float | None = None):
        self._module = module
        self.controller = controller
        self._tau = None if tau is None else torch.tensor(float(tau))
        self._rms: Tensor | None = None
        self.tokens = 0
        self.skipped: Tensor | None = None

    @property
    def learns(self) -> bool:
        return self.controller is not None

    def tau(self, device: torch.device) -> Tensor:
        """The threshold (float32 scalar on ``device``)."""
        if self._tau is not None:
            if self._tau.device != device:
                self._tau = self._tau.to(device)
            return self._tau
        m = self._module
        return getattr(m, GATE) * getattr(m, SCALE)

    def count(self, keep: Tensor) -> None:
        skipped = keep.numel() - keep.sum()  # stays on the device: no synchronisation
        if self.skipped is None or self.skipped.device != keep.device:
            self.tokens, self.skipped = 0, torch.zeros_like(skipped)
        self.tokens += keep.numel()
        self.skipped += skipped

    def observe(self, ratio: Tensor) -> None:
        """Update the running mean ratio ``s_l`` (training forward)."""
        scale = getattr(self._module, SCALE)
        mean = ratio.mean()
        scale.copy_(torch.where(scale > 0, _EMA * scale + (1 - _EMA) * mean, mean))

    def learn(self, slope: Tensor, ratio: Tensor, keep: Tensor) -> None:
        """One threshold step from ``slope`` (``dL/dS_i`` per token, float32) and the forward's
        ``ratio`` and ``keep``."""
        assert self.controller is not None
        config, m = self.controller.config, self._module
        gate, scale = getattr(m, GATE), getattr(m, SCALE)
        width = (config.temperature * scale).clamp(min=_TINY)
        sig = torch.sigmoid((ratio - gate * scale) / width)
        d_tau = -(slope * sig * (1 - sig)).sum() / width  # dL/dtau through the surrogate
        d_gate = d_tau * scale
        if self._rms is None or self._rms.device != d_gate.device:
            self._rms = d_gate.square()
        self._rms = _EMA * self._rms + (1 - _EMA) * d_gate.square()
        pressure = self.controller.update(1.0 - keep.float().mean())
        step = d_gate / (self._rms.sqrt() + _TINY) - pressure
        gate.copy_((gate - config.step * step).clamp(min=0.0))


class _GatedDelta(torch.autograd.Function):
    """``base + S * d`` (``d = xs @ delta.T``, computed without autograd), written into
    ``base``; the gradients of ``xs`` and ``delta`` are computed here, and the gate's threshold
    learns in backward. Saves only the few gathered input columns ``xs``."""

    @staticmethod
    def forward(ctx: Any, base: Tensor, xs: Tensor, delta: Tensor, keep: Tensor, ratio: Tensor, gate: Gate,
                d: Tensor) -> Tensor:
        ctx.save_for_backward(xs, delta, keep, ratio)
        ctx.gate = gate
        ctx.mark_dirty(base)
        return base.addcmul_(d, keep.unsqueeze(-1).to(d.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        xs, delta, keep, ratio = ctx.saved_tensors
        mask = keep.unsqueeze(-1).to(grad.dtype)
        g_delta = grad.matmul(delta.to(grad.dtype))  # [..., m]: the input gradient before gating
        grad_xs = (g_delta * mask).to(xs.dtype) if ctx.needs_input_grad[1] else None
        grad_delta = None
        if ctx.needs_input_grad[2]:  # sum_t S_t g_t xs_t^T, the gate applied to the narrow xs
            kept = (xs.to(grad.dtype) * mask).reshape(-1, xs.shape[-1])
            grad_delta = grad.reshape(-1, grad.shape[-1]).t().matmul(kept).to(delta.dtype)
        if ctx.gate.learns:
            with torch.no_grad():
                slope = (g_delta.float() * xs.float()).sum(-1)  # <dL/dh_i, dW x_i>
                ctx.gate.learn(slope, ratio, keep)
        return grad, grad_xs, grad_delta, None, None, None, None


@torch.compiler.disable  # stateful (counts, threshold steps): runs eagerly inside a compiled model
def gated_linear(x: Tensor, weight: Tensor, bias: Tensor | None, delta: Tensor, columns: Tensor,
                 gate: Gate, training: bool) -> Tensor:
    """``W0 x + b + S * (dW x)`` for ``x [..., in]``; ``delta [out, m]`` is ``dW`` restricted to
    the ``columns [m]`` (int64) it touches. ``training``: learn the threshold (the module is in
    train mode and autograd records). Under ``torch.compile`` it runs eagerly (a graph break
    per gated layer)."""
    base = F.linear(x, weight, bias)
    xs = x.index_select(-1, columns)
    learn = training and gate.learns and torch.is_grad_enabled()
    if learn:  # the autograd function below computes the gradients itself
        with torch.no_grad():
            d = F.linear(xs, delta)
    else:
        d = F.linear(xs, delta)
    with torch.no_grad():
        ratio = d.float().norm(dim=-1) / base.float().norm(dim=-1).clamp(min=_TINY)
        keep = ratio >= gate.tau(ratio.device)
        gate.count(keep)
    if learn:
        gate.observe(ratio)
        return _GatedDelta.apply(base, xs, delta, keep, ratio, gate, d)
    return torch.addcmul(base, d, keep.unsqueeze(-1).to(d.dtype))


def token_gate_stats(model: nn.Module, *, reset: bool = False) -> dict[str, float]:
    """The share of token updates each gated layer skipped since the gate was installed (or
    the last ``reset``), in training and inference: ``{weight name: share in [0, 1]}``, empty
    when no layer is gated. ``reset=True`` starts the counts again after reading them."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        gate = vars(module).get(ATTR)
        if not isinstance(gate, Gate):
            continue
        if gate.skipped is not None and gate.tokens > 0:
            out[f"{name}.weight" if name else "weight"] = float(gate.skipped) / gate.tokens
        if reset:
            gate.tokens, gate.skipped = 0, None
    return out


def check_gate_module(name: str, module: nn.Module) -> None:
    """Raise unless a loaded delta can gate ``module`` (a plain ``nn.Linear`` nothing patched)."""
    fixed = isinstance(vars(module).get(ATTR), Gate) and not vars(module)[ATTR].learns  # another loaded task's
    if not (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
            and ("forward" not in vars(module) or fixed)):
        raise TrptsTypeError(f"a token-gated delta gates nn.Linear layers; {name!r} belongs to "
                             f"{type(module).__name__}{' with a patched forward' if 'forward' in vars(module) else ''}")


def install_fixed(module: nn.Linear, delta: Tensor, columns: Tensor, tau: Tensor) -> None:
    """Make ``module`` compute ``W0 x + b + S * (dW x)`` with a fixed threshold ``tau`` (a
    loaded delta); ``delta [out, m]`` and ``columns [m]`` as for :func:`gated_linear`."""
    gate = Gate(tau=float(tau))

    def forward(x: Tensor) -> Tensor:
        return gated_linear(x, module.weight, module.bias, delta, columns, gate, False)

    vars(module)[ATTR] = gate
    module.forward = forward


def remove_fixed(module: nn.Module) -> None:
    """Undo :func:`install_fixed`."""
    vars(module).pop(ATTR, None)
    vars(module).pop("forward", None)
