"""The CPU sparse-gradient kernel in C (``csrc/sddmm.c``): built once with the system C
compiler, cached, loaded with :mod:`ctypes`.

The shared library is cached under ``$XDG_CACHE_HOME/trpts/kernels`` (default
``~/.cache/trpts/kernels``), keyed by the source, the compiler, its flags and the CPU (it is
built with ``-march=native``), and written atomically, so concurrent processes (DDP ranks)
never load a half-written file. ``TRPTS_CC`` (else ``CC``, else ``cc``/``gcc``/``clang``)
names the compiler. Any failure raises :class:`NativeKernelUnavailable` with the reason; the
caller decides whether to fall back.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from ._utils import atomic_write
from .errors import TrptsRuntimeError

__all__ = ["NativeKernelUnavailable", "native_sddmm"]

_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


class NativeKernelUnavailable(TrptsRuntimeError):
    """The C kernel could not be built or loaded (no compiler, unsupported platform, ...)."""


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trpts" / "kernels"


def _compiler() -> list[str]:
    for var in ("TRPTS_CC", "CC"):
        if os.environ.get(var):
            return shlex.split(os.environ[var])
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise NativeKernelUnavailable("no C compiler found (set TRPTS_CC or CC)")


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags where Linux says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build(source: bytes) -> Path:
    cc = _compiler()
    key = hashlib.sha256(b"\0".join([source, " ".join(cc + _FLAGS).encode(), _cpu_id().encode(),
                                     platform.platform().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"sddmm-{key}{'.dll' if os.name == 'nt' else '.so'}"
    if path.exists():
        return path
    src = _cache_dir() / f"sddmm-{key}.c"
    atomic_write(src, lambda tmp: Path(tmp).write_bytes(source))
    errors = []
    for extra in (["-march=native"], []):  # some compilers/targets lack -march=native

        def compile_to(tmp: str, extra: list[str] = extra) -> None:
            done = subprocess.run([*cc, *_FLAGS, *extra, str(src), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode:
                raise OSError(done.stderr.strip()[-500:] or f"exit status {done.returncode}")

        try:
            return atomic_write(path, compile_to)
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err))
    raise NativeKernelUnavailable(f"compiling {src} with {' '.join(cc)} failed: {errors[-1]}")


def _load() -> ctypes.CDLL:
    global _lib, _error
    if _lib is not None:  # every backward call: no lock once loaded
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise NativeKernelUnavailable(_error)
        try:
            source = resources.files("trpts").joinpath("csrc/sddmm.c").read_bytes()
            lib = ctypes.CDLL(str(_build(source)))
            fn = lib.trpts_sddmm
        except (OSError, AttributeError, NativeKernelUnavailable) as err:
            _error = str(err)
            raise NativeKernelUnavailable(_error) from None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64]
        _lib = lib
        return lib


def native_sddmm(x: Tensor, grad_out: Tensor, index: Tensor) -> Tensor:
    """``out[i, c] = sum_t grad_out[t, i] * x[t, index[i, c]]`` on the CPU, in C.

    Args:
        x: ``[T, in]`` CPU tensor (any float dtype; computed in float32).
        grad_out: ``[T, out]`` CPU tensor.
        index: ``int64 [out, C]``, values in ``[0, in)``.

    Returns:
        float32 ``[out, C]``. Uses ``torch.get_num_threads()`` threads; deterministic for a
        given thread count. The GIL is released while it runs.
    """
    fn = _load().trpts_sddmm
    x = x.float()
    grad_out = grad_out.float()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    index = index.to(torch.int64).contiguous()
    rows, conns = index.shape
    out = torch.empty(rows, conns, dtype=torch.float32)
    status = fn(x.data_ptr(), x.stride(0), x.shape[1], grad_out.data_ptr(), grad_out.stride(0), rows,
                index.data_ptr(), conns, x.shape[0], out.data_ptr(), torch.get_num_threads())
    if status == 2:
        raise TrptsRuntimeError(f"sparse gradient: an index is outside [0, {x.shape[1]})")
    if status:
        raise MemoryError("trpts sparse gradient kernel: out of memory")
    return out
