"""The Triton source of the sparse weight gradient (imported only where Triton is installed;
decorated with ``triton.jit`` by :mod:`trpts._triton` at first use)."""

from typing import Any

import triton.language as tl


def sddmm_body(X: Any, DY: Any, IDX: Any, OUT: Any, T: Any, R: Any, C: Any, tokens_per_split: Any,
                stride_xt: Any, stride_xk: Any, stride_dt: Any, stride_di: Any, stride_ir: Any, stride_ic: Any,
                stride_os: Any, stride_or: Any,
                BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr) -> None:
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    tile = (rows < R)[:, None] & (cols < C)[None, :]
    idx = tl.load(IDX + rows[:, None] * stride_ir + cols[None, :] * stride_ic, mask=tile, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # no int32 overflow in ts * stride
        live = ts < t_end
        dy = tl.load(DY + ts[:, None] * stride_dt + rows[None, :] * stride_di,
                     mask=live[:, None] & (rows < R)[None, :], other=0.0).to(tl.float32)  # [BT, BR]
        x = tl.load(X + ts[:, None, None] * stride_xt + idx[None, :, :] * stride_xk,
                    mask=live[:, None, None] & tile[None, :, :], other=0.0).to(tl.float32)  # [BT, BR, BC]
        acc += tl.sum(dy[:, :, None] * x, axis=0)
    tl.store(OUT + pid_s * stride_os + rows[:, None] * stride_or + cols[None, :], acc, mask=tile)
