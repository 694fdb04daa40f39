"""The task-delta file format (specified in ``docs/format.md``): write, read, validate, checksum.

File level only: metadata and tensors in, metadata and tensors out; nothing here knows a model
(:mod:`trpts.delta` turns a trained model into a delta and a delta into a task on a backbone).

Format 3 adds the token gate (an optional ``"gate"`` field and a ``threshold:`` tensor per gated
matrix); format 2 is format 3 without it. Format 2 added a SHA-256 checksum of the trpts metadata and of every tensor (name, dtype, shape,
raw bytes), verified before anything is returned: a corrupted file is refused, never loaded
silently wrong. Format-1 files (no checksum) still load, with a :class:`~trpts.TrptsWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from ._utils import atomic_write
from .errors import DeltaFormatError, TrptsTypeError, TrptsWarning

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "checksum", "fingerprint", "read_delta", "rows_fan_in", "validate",
           "write_delta_file"]

FORMAT_NAME = "trpts-delta"
FORMAT_VERSION = 3
UNCHECKED_VERSIONS = (1,)  # readable, but written before checksums: loaded with a TrptsWarning
READABLE_VERSIONS = (*UNCHECKED_VERSIONS, 2, FORMAT_VERSION)  # 2: no token gate (no "gate" field)
PathLike = str | os.PathLike[str]

# safetensors' dtype names (the "dtype" of its header), which the checksum hashes
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
}
COLUMN_DTYPES = (torch.uint16, torch.int32)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- hashes -----------------------------------------------------------------------------------


def fingerprint(entries: Mapping[str, tuple[tuple[int, ...], Tensor]]) -> str:
    """SHA-256 over ``name``, ``shape`` and the float32 bytes of the backbone's values at the
    selected entries, in name order: what decides whether a delta fits a backbone."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        shape, values = entries[name]
        digest.update(name.encode())
        digest.update(json.dumps(list(shape)).encode())
        digest.update(values.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _field(digest: Any, data: bytes | memoryview) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def checksum(metadata_text: str, tensors: Mapping[str, Tensor]) -> str:
    """The checksum (formats 2 and 3): SHA-256 (64 lowercase hex digits) over length-prefixed fields
    (each an 8-byte little-endian byte count, then the bytes): the UTF-8 trpts metadata text,
    then for every tensor in ascending name order its UTF-8 name, its safetensors dtype name
    (``F32``, ``U16``, ...), its shape as compact JSON (``[4,16]``) and its raw little-endian
    row-major bytes (exactly the tensor's bytes in the file's data section)."""
    digest = hashlib.sha256()
    _field(digest, metadata_text.encode("utf-8", "surrogatepass"))
    for name in sorted(tensors):  # code-point order = UTF-8 byte order
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise TrptsTypeError(f"tensor {name!r} has dtype {t.dtype}, which a delta cannot hold")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        _field(digest, name.encode("utf-8", "surrogatepass"))
        _field(digest, DTYPE_NAMES[t.dtype].encode())
        _field(digest, json.dumps(list(t.shape), separators=(",", ":")).encode())
        _field(digest, memoryview(raw).cast("B"))
    return digest.hexdigest()


# ---- writing ----------------------------------------------------------------------------------


def write_delta_file(path: PathLike, meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Path:
    """Write ``tensors`` and the trpts metadata ``meta`` (JSON-serializable) as a delta file of
    the current format, with its checksum, atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    try:
        text = json.dumps(dict(meta, format_version=FORMAT_VERSION), separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise TrptsTypeError(f"metadata must be JSON-serializable: {err}") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT_NAME, "trpts": text, "checksum": checksum(text, tensors)}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


# ---- reading ----------------------------------------------------------------------------------


def _version() -> str:
    from . import __version__

    return __version__


def read_delta(path: PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read, verify and validate a delta file: ``(metadata, tensors)``.

    Raises :class:`~trpts.errors.DeltaFormatError` (naming the file and the problem) for
    anything that is not a complete, intact trpts delta: not safetensors, truncated, a checksum
    that does not match, malformed metadata, a newer or unknown format version. A format-1
    file (written before checksums) is read with a :class:`~trpts.TrptsWarning`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no delta file at {path}")
    header, tensors = _read_container(path)
    text, stored = header["trpts"], header.get("checksum")
    if stored is not None and stored != checksum(text, tensors):
        raise DeltaFormatError(f"{path} is corrupted: its checksum does not match its contents (the tensors or "
                               "metadata changed after it was written); re-save or re-download it")
    meta = _parse_metadata(text, path)
    version = meta["format_version"]
    if stored is None and version not in UNCHECKED_VERSIONS:
        raise DeltaFormatError(f"{path}: a format-{version} delta must carry a checksum, and this one has none")
    if stored is None:
        warnings.warn(TrptsWarning(f"{path} is a format-{version} delta without a checksum: its contents are "
                                   "unchecked, corruption would go unnoticed. Re-save it with trpts.save_delta "
                                   f"(format {FORMAT_VERSION}) to add one"), stacklevel=2)
    validate(meta, tensors, path)
    return meta, tensors


def _read_container(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The safetensors ``__metadata__`` (checked to be a trpts delta's) and all tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT_NAME or not isinstance(header.get("trpts"), str):
                raise DeltaFormatError(f"{path} is a safetensors file but not a trpts delta (no "
                                       f"'format: {FORMAT_NAME}' in its metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except DeltaFormatError:
        raise
    except Exception as err:  # safetensors' own errors for a bad header length, offsets, dtype, ...
        raise DeltaFormatError(f"cannot read {path}: truncated or corrupted ({type(err).__name__}: {err})") from None
    return header, tensors


def _parse_metadata(text: str, path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except ValueError as err:  # JSONDecodeError, or a lone surrogate
        raise DeltaFormatError(f"{path}: the trpts metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DeltaFormatError(f"{path}: the trpts metadata must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if not _is_int(version):
        raise DeltaFormatError(f"{path}: the trpts metadata has no integer 'format_version' (got {version!r})")
    if version > FORMAT_VERSION:
        raise DeltaFormatError(f"{path} uses delta format {version}; this trpts ({_version()}) reads format "
                               f"<= {FORMAT_VERSION}: upgrade trpts")
    if version not in READABLE_VERSIONS:
        raise DeltaFormatError(f"{path}: unknown delta format version {version} (known: {list(READABLE_VERSIONS)})")
    return meta


# ---- validation -------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and all(_is_int(d) and d >= 0 for d in x)


def rows_fan_in(info: Mapping[str, Any]) -> tuple[int, int]:
    """Rows (output neurons) and fan-in of a weight of ``info["shape"]``."""
    shape = [int(d) for d in info["shape"]]
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return shape[0], fan_in


_REQUIRED = {  # key: (accepted types, description)
    "matrices": (dict, "an object"),
    "full": (dict, "an object"),
    "heads": (list, "an array"),
    "fingerprint": (str, "a string"),
    "tokens": ((dict, type(None)), "an object or null"),
}
_OPTIONAL = {
    "name": ((str, type(None)), "a string or null"),
    "family": ((str, type(None)), "a string or null"),
    "architecture": ((str, type(None)), "a string"),
    "identity": ((dict, type(None)), "an object"),
    "labels": ((list, type(None)), "an array of strings or null"),
    "trpts_version": ((str, type(None)), "a string"),
    "selection": ((dict, type(None)), "an object or null"),
    "user": ((dict, type(None)), "an object"),
    "gate": ((dict, type(None)), "an object or null"),
}
_TOKEN_FIELDS = {"layers": "an array of block indices", "rho": "a number", "num_prefix_tokens": "an integer",
                 "placement": "a string", "family": "a string"}


def validate(meta: Mapping[str, Any], tensors: Mapping[str, Tensor], path: PathLike) -> None:
    """Check that ``meta`` is well-formed trpts metadata describing exactly ``tensors``;
    raise :class:`~trpts.errors.DeltaFormatError` naming ``path`` and the problem otherwise."""
    _check_header(meta, path)
    _check_tokens(meta["tokens"], path)
    expected: set[str] = set()
    for m, info in meta["matrices"].items():
        expected.update(_check_matrix(m, info, tensors, path))
    for n, shape in meta["full"].items():
        expected.add(_check_full(n, shape, tensors, path))
    expected.update(_check_gate(meta, tensors, path))
    extra = sorted(set(tensors) - expected)
    if extra:
        _bad(path, f"it holds tensors its metadata does not describe: {extra[:5]}")


def _bad(path: PathLike, problem: str) -> NoReturn:
    raise DeltaFormatError(f"{path}: {problem}")


def _check_header(meta: Mapping[str, Any], path: PathLike) -> None:
    """Required keys present, every known field of its JSON type, a hex fingerprint, string heads."""
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        _bad(path, f"the trpts metadata lacks {missing}")
    for key, (types, what) in (_REQUIRED | _OPTIONAL).items():
        if key in meta and not isinstance(meta[key], types):
            _bad(path, f"the metadata field {key!r} must be {what}, got {type(meta[key]).__name__}")
    fp = meta["fingerprint"]
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        _bad(path, f"the fingerprint must be 64 lowercase hex digits, got {fp[:70]!r}")
    if not all(isinstance(h, str) for h in meta["heads"]):
        _bad(path, "the metadata field 'heads' must be an array of strings")
    if not all(isinstance(n, str) for n in meta.get("labels") or []):
        _bad(path, "the metadata field 'labels' must be an array of strings")


def _check_tokens(tokens: Mapping[str, Any] | None, path: PathLike) -> None:
    """The token-selection settings (``None``: no token selection) have every field, well typed."""
    if tokens is None:
        return
    for key, what in _TOKEN_FIELDS.items():
        value = tokens.get(key)
        ok = {"layers": isinstance(value, list) and all(_is_int(i) for i in value), "rho": _is_number(value),
              "num_prefix_tokens": _is_int(value)}.get(key, isinstance(value, str))
        if not ok:
            _bad(path, f"tokens[{key!r}] must be {what}, got {value!r}")


def _check_matrix(m: str, info: Any, tensors: Mapping[str, Tensor], path: PathLike) -> tuple[str, str]:
    """One ``matrices`` entry and its ``values:``/``columns:`` tensors (both ``[rows, C]``, the
    columns in ``0..fan_in-1`` and strictly increasing per row). Returns the two tensor names."""
    if not isinstance(info, dict) or not _is_shape(info.get("shape")) or len(info["shape"]) < 2 \
            or not _is_int(info.get("connections")):
        _bad(path, f"matrices[{m!r}] must be {{'shape': [rows, in, ...], 'connections': C}}, got {info!r}"[:300])
    if not (isinstance(info.get("layer", ""), str) and (info.get("block") is None or _is_int(info["block"]))
            and isinstance(info.get("share", 0.0), (int, float)) and not isinstance(info.get("share"), bool)):
        _bad(path, f"matrices[{m!r}] has a malformed report (layer: str, block: int or null, share: number)")
    rows, fan_in = rows_fan_in(info)
    if not 0 <= info["connections"] <= fan_in:
        _bad(path, f"matrices[{m!r}] has {info['connections']} connections per row, outside 0..{fan_in}")
    shape = (rows, info["connections"])
    keys = (f"values:{m}", f"columns:{m}")
    for key, dtypes in zip(keys, (VALUE_DTYPES, COLUMN_DTYPES), strict=True):
        _check_tensor(tensors, key, shape, dtypes, f"one of {[str(d) for d in dtypes]}", path)
    cols = tensors[keys[1]].to(torch.int64)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= fan_in):
        _bad(path, f"columns of {m!r} fall outside 0..{fan_in - 1}")
    if cols.shape[1] > 1 and not bool((cols[:, 1:] > cols[:, :-1]).all()):
        _bad(path, f"columns of {m!r} are not strictly increasing in every row")
    return keys


def _check_gate(meta: Mapping[str, Any], tensors: Mapping[str, Tensor], path: PathLike) -> list[str]:
    """The token gate (format 3; ``None``: none): settings, and a finite ``>= 0`` float32 scalar
    ``threshold:`` tensor per gated matrix, each one of ``matrices``. Returns the tensor names."""
    gate = meta.get("gate")
    if gate is None:
        return []
    if meta["format_version"] < 3:
        _bad(path, f"a format-{meta['format_version']} delta cannot have a token gate (format 3 added it)")
    names = gate.get("matrices")
    if not (isinstance(names, list) and all(isinstance(n, str) and n in meta["matrices"] for n in names)):
        _bad(path, f"gate['matrices'] must list names of 'matrices', got {names!r}"[:300])
    if not all(_is_number(gate.get(k)) for k in ("skip", "temperature", "step")):
        _bad(path, "gate must hold the numbers 'skip', 'temperature' and 'step'")
    keys = [f"threshold:{n}" for n in names]
    for key in keys:
        _check_tensor(tensors, key, (), (torch.float32,), "torch.float32", path)
        tau = float(tensors[key])
        if not (tau >= 0 and tau != float("inf")):
            _bad(path, f"{key!r} must be a finite threshold >= 0, got {tau}")
    return keys


def _check_full(n: str, shape: Any, tensors: Mapping[str, Tensor], path: PathLike) -> str:
    """One ``full`` entry (a tensor stored whole, e.g. a head weight) and its floating ``full:``
    tensor of exactly that shape. Returns the tensor name."""
    key = f"full:{n}"
    if not _is_shape(shape):
        _bad(path, f"full[{n!r}] must be a shape (an array of sizes), got {shape!r}"[:300])
    _check_tensor(tensors, key, shape, VALUE_DTYPES, "a floating dtype", path)
    return key


def _check_tensor(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...] | list[int],
                  dtypes: Any, dtype_text: str, path: PathLike) -> None:
    """``tensors[key]`` exists, has ``shape`` (a tuple or list, as it is reported) and a dtype in ``dtypes``."""
    if key not in tensors:
        _bad(path, f"it lacks the tensor {key!r}")
    got = type(shape)(tensors[key].shape)
    if got != shape:
        _bad(path, f"{key!r} has shape {got}, expected {shape}")
    if tensors[key].dtype not in dtypes:
        _bad(path, f"{key!r} has dtype {tensors[key].dtype}, expected {dtype_text}")
