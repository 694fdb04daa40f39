"""The CUDA sparse-gradient kernel in Triton (also runs on the CPU under ``TRITON_INTERPRET=1``).

For each selected entry ``(i, index[i, c])`` of a weight it sums ``dY[t, i] * X[t, index[i, c]]``
over tokens, reading ``X [T, in]`` and ``dY [T, out]`` in their own layout (any strides, no
transposed or float32 copies), in tiles of ``BLOCK_T`` tokens, accumulating in float32 for
bfloat16 / float16 / float32 inputs. Each program owns a ``BLOCK_R x BLOCK_C`` tile of the
output and one contiguous share of the tokens; when the tokens are split over several
programs (few rows, many tokens) the per-split partial sums are added in a fixed order
afterwards, so the result is deterministic for a given launch configuration (no atomics).

Triton is imported at first use, and the kernel is compiled (or, under ``TRITON_INTERPRET=1``,
interpreted) then; any failure raises :class:`TritonKernelUnavailable` for the caller to
fall back on.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from .errors import TrptsRuntimeError

__all__ = ["TritonKernelUnavailable", "launch_config", "triton_sddmm"]

BLOCK_T = 32  # tokens per tile
BLOCK_R = 16  # output rows per program
MAX_BLOCK_C = 8  # selected connections per program (fewer when C is smaller)
_TARGET_PROGRAMS = 4 * 132  # enough programs to fill an H100/H200 a few times over
_kernels: dict[bool, Any] = {}


class TritonKernelUnavailable(TrptsRuntimeError):
    """Triton is missing, cannot compile for this device, or the tensors are on the CPU
    without ``TRITON_INTERPRET=1``."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel() -> Any:
    interpret = _interpreting()
    if interpret not in _kernels:
        try:
            import triton

            from ._triton_kernel import sddmm_body
        except ImportError as err:
            raise TritonKernelUnavailable(f"triton is not installed ({err})") from None
        if interpret and type(triton.language.zeros).__name__ != "InterpretedFunction":
            raise TritonKernelUnavailable(
                "TRITON_INTERPRET=1 was set after triton was imported (timm and peft import it); set it "
                "before the first import, e.g. in the shell")
        _kernels[interpret] = triton.jit(sddmm_body)  # decoration reads TRITON_INTERPRET
    return _kernels[interpret]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(tokens: int, rows: int, conns: int) -> tuple[int, int, int, int]:
    """``(BLOCK_C, grid over rows, grid over connections, token splits)`` for an
    ``[rows, conns]`` output over ``tokens`` tokens: the tokens are split over just enough
    programs to keep the device busy when the output tile grid alone would not."""
    block_c = min(MAX_BLOCK_C, _next_pow2(conns))
    grid_r, grid_c = -(-rows // BLOCK_R), -(-conns // block_c)
    tiles = -(-tokens // BLOCK_T)
    splits = max(1, min(tiles, -(-_TARGET_PROGRAMS // (grid_r * grid_c))))
    return block_c, grid_r, grid_c, splits


def triton_sddmm(x: Tensor, grad_out: Tensor, index: Tensor) -> Tensor:
    """``out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]`` with the Triton kernel.

    Args:
        x: ``[T, in]`` float32 / bfloat16 / float16, any strides, on CUDA (or the CPU under
            ``TRITON_INTERPRET=1``).
        grad_out: ``[T, out]``, same device, any of those dtypes and any strides.
        index: ``int32`` or ``int64 [out, C]``, values in ``[0, in)`` (not checked: an index
            outside reads memory outside ``x``).

    Returns:
        float32 ``[out, C]``, accumulated in float32; deterministic for a given shape.

    Raises:
        TritonKernelUnavailable: Triton is missing or fails to compile, or the tensors are on
            the CPU without the interpreter.
    """
    if x.device.type != "cuda" and not _interpreting():
        raise TritonKernelUnavailable(f"the Triton kernel needs CUDA tensors (got {x.device.type}) "
                                      "or TRITON_INTERPRET=1")
    kernel = _kernel()
    tokens, rows, conns = x.shape[0], index.shape[0], index.shape[1]
    if not (tokens and rows and conns):
        return torch.zeros(rows, conns, dtype=torch.float32, device=x.device)
    block_c, grid_r, grid_c, splits = launch_config(tokens, rows, conns)
    per_split = -(-tokens // (splits * BLOCK_T)) * BLOCK_T
    splits = max(1, -(-tokens // per_split))  # no empty split
    partial = torch.empty(splits, rows, conns, dtype=torch.float32, device=x.device)
    try:
        kernel[(grid_r, grid_c, splits)](
            x, grad_out, index, partial, tokens, rows, conns, per_split,
            x.stride(0), x.stride(1), grad_out.stride(0), grad_out.stride(1),
            index.stride(0), index.stride(1), partial.stride(0), partial.stride(1),
            BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_C=block_c)
    except Exception as err:  # compiler or driver failure: let the caller fall back
        first = str(err).splitlines()[0][:300] if str(err) else ""
        raise TritonKernelUnavailable(f"the Triton kernel failed: {type(err).__name__}: {first}") from err
    return partial[0] if splits == 1 else partial.sum(0)
