"""Where trpts keeps what it added to a model: one :class:`ModelState` per (unwrapped) model.

The state lives in one plain attribute of the model, so ``state_dict()`` keys never change, a
DDP / ``torch.compile`` wrapper is looked through, and a copy of the model carries its token
selection and loaded deltas. A training :class:`~trpts.MaskHandle` belongs to the model it was
applied to: ``copy.deepcopy`` and pickling leave it out (the copy is a plain model with the
trained values; call :func:`trpts.apply_masks` on it to train it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from ._utils import unwrap_model

__all__ = ["ModelState", "model_state", "update_state"]

_ATTR = "_trpts_state"


@dataclass
class ModelState:
    """What trpts added to one model: the training handle (``masks``, from ``apply_masks``),
    the token-selection configuration (``tokens``, from ``wrap_vit``) and the loaded task
    deltas (``deltas``, from ``load_delta``). ``None`` where nothing was added."""

    masks: Any = None
    tokens: Any = None
    deltas: Any = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the training handle out
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "masks"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.masks = None
        for name, value in state.items():
            setattr(self, name, value)

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def model_state(model: nn.Module) -> ModelState:
    """The state of ``model`` (DDP/compile wrappers removed); an empty one if trpts added nothing."""
    state = getattr(unwrap_model(model), _ATTR, None)
    return state if isinstance(state, ModelState) else ModelState()


def update_state(model: nn.Module, **changes: Any) -> None:
    """Set fields of ``model``'s state (``None`` clears one); the attribute goes once empty."""
    base = unwrap_model(model)
    state = getattr(base, _ATTR, None)
    state = state if isinstance(state, ModelState) else ModelState()
    for name, value in changes.items():
        if name not in {f.name for f in fields(state)}:
            raise AttributeError(f"ModelState has no field {name!r}")
        setattr(state, name, value)
    if state.empty:
        if _ATTR in base.__dict__:
            delattr(base, _ATTR)
    else:
        base.__dict__[_ATTR] = state
