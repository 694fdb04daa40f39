"""Exceptions and warnings raised by trpts.

Every error is a :class:`TrptsError` and also subclasses the matching built-in
(``ValueError``, ``TypeError``, ``KeyError``, ``RuntimeError``), so existing
``except ValueError`` blocks keep working.
"""

from __future__ import annotations

__all__ = [
    "DeltaFormatError",
    "FingerprintMismatchError",
    "TrptsError",
    "TrptsKeyError",
    "TrptsRuntimeError",
    "TrptsTypeError",
    "TrptsValueError",
    "TrptsWarning",
    "UnsupportedModelError",
    "WeightDecayError",
]


class TrptsError(Exception):
    """Base class of every exception raised by trpts."""


class TrptsValueError(TrptsError, ValueError):
    """An argument has the right type but an invalid value."""


class TrptsTypeError(TrptsError, TypeError):
    """An argument has the wrong type."""


class TrptsKeyError(TrptsError, KeyError):
    """A parameter name is unknown to the model or the selection."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class TrptsRuntimeError(TrptsError, RuntimeError):
    """An operation is not possible in the model's current state."""


class UnsupportedModelError(TrptsError, TypeError):
    """The model is not of a family trpts has an adapter for."""


class WeightDecayError(TrptsError, RuntimeError):
    """An optimizer would apply weight decay to frozen entries of a masked weight."""


class DeltaFormatError(TrptsValueError):
    """A file is not a readable trpts delta (not safetensors, not trpts, truncated, newer format)."""


class FingerprintMismatchError(TrptsValueError):
    """A delta was trained on another backbone than the model it is loaded onto."""


class TrptsWarning(UserWarning):
    """A request was honoured only approximately (e.g. a budget below the minimum)."""
