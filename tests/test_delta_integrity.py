"""A delta file never loads silently wrong: checksums (format 2), malformed metadata, old
(format-1) files, and the int32 column indices of weights with fan-in > 65,536."""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, make_timm_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import trpts
from trpts.delta_format import FORMAT_VERSION, checksum

X = make_batches(1, 3, seed=42)[0][0]


def _out(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def _train(backbone, *, seed=0, budget=0.1, tokens=True, train_biases=True, steps=2):
    model = copy.deepcopy(backbone)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in trpts.default_scored_parameters(model)}
    selection = trpts.allocate_connections(fisher, budget=budget, model=model)
    if tokens:
        trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
    handle = trpts.apply_masks(model, selection, train_biases=train_biases)
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=1e-2)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One real small delta (token selection, trained biases), saved once for the module."""
    backbone = make_timm_vit().eval()
    trained = _train(backbone)
    path = trpts.save_delta(trained, tmp_path_factory.mktemp("delta") / "task.safetensors")
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    model = copy.deepcopy(backbone)
    trpts.load_delta(model, path)
    expected = _out(model)
    assert torch.equal(expected, _out(trained))
    return SimpleNamespace(backbone=backbone, path=path, raw=raw, header_end=header_end, expected=expected,
                           original=_state(backbone), dir=path.parent)


def _header(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _write(saved, name, *, text=None, meta=None, drop_checksum=False, rechecksum=True):
    """A copy of the saved delta with its trpts metadata replaced (``text``) or updated (``meta``)."""
    tensors, header = load_file(saved.path), _header(saved.path)
    if meta is not None:
        m = json.loads(header["trpts"])
        for key, value in meta.items():
            if value is _DROP:
                m.pop(key, None)
            else:
                m[key] = value(m) if callable(value) else value
        header["trpts"] = json.dumps(m, separators=(",", ":"))
    if text is not None:
        header["trpts"] = text
    if drop_checksum:
        header.pop("checksum")
    elif rechecksum:
        header["checksum"] = checksum(header["trpts"], tensors)
    out = saved.dir / name
    save_file(tensors, out, metadata=header)
    return out


_DROP = object()


def _refused_untouched(saved, path, match=None):
    """load_delta raises a DeltaFormatError naming the file; a fresh model is left exactly as it was."""
    model = copy.deepcopy(saved.backbone)
    with pytest.raises(trpts.DeltaFormatError, match=match) as info:
        trpts.load_delta(model, path)
    assert isinstance(info.value, ValueError) and path.name in str(info.value)
    assert _same_state(model, saved.original) and trpts.loaded_deltas(model) == []
    assert trpts.get_token_config(model) is None
    return info.value


# ---- every single-bit flip is refused or harmless ------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_single_bit_flip_is_refused_or_harmless(saved, data):
    raw = saved.raw
    # half of the flips in the safetensors header (lengths, JSON, offsets, metadata), half anywhere
    in_header = data.draw(st.booleans(), label="in_header")
    pos = data.draw(st.integers(0, (saved.header_end if in_header else len(raw)) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << bit
    path = saved.dir / "flipped.safetensors"
    path.write_bytes(bytes(flipped))
    model = copy.deepcopy(saved.backbone)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", trpts.TrptsWarning)  # a flip must not make an "unchecked" file
            trpts.load_delta(model, path)
    except trpts.TrptsError:
        assert _same_state(model, saved.original) and trpts.loaded_deltas(model) == []
        assert trpts.get_token_config(model) is None
        return
    assert torch.equal(_out(model), saved.expected), (pos, bit)


def test_a_flipped_value_is_refused_by_read_load_and_merge(saved):
    data_start = saved.header_end
    flipped = bytearray(saved.raw)
    flipped[data_start + (len(flipped) - data_start) // 2] ^= 0x10
    path = saved.dir / "value.safetensors"
    path.write_bytes(bytes(flipped))
    with pytest.raises(trpts.DeltaFormatError, match="checksum"):
        trpts.read_delta(path)
    _refused_untouched(saved, path, match="corrupted")
    model = copy.deepcopy(saved.backbone)
    with pytest.raises(trpts.DeltaFormatError, match="checksum"):
        trpts.merge_delta(model, path)
    assert _same_state(model, saved.original)


def test_saved_files_carry_the_current_version_and_a_checksum(saved):
    header = _header(saved.path)
    assert json.loads(header["trpts"])["format_version"] == FORMAT_VERSION == 3
    assert header["checksum"] == checksum(header["trpts"], load_file(saved.path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trpts.read_delta(saved.path)


# ---- format-1 files (no checksum) -----------------------------------------------------------------


def test_a_format_1_file_loads_with_an_unchecked_warning(saved):
    old = _write(saved, "v1.safetensors", meta={"format_version": 1}, drop_checksum=True)
    assert "checksum" not in _header(old)
    model = copy.deepcopy(saved.backbone)
    with pytest.warns(trpts.TrptsWarning, match="unchecked"):
        trpts.load_delta(model, old)
    assert torch.equal(_out(model), saved.expected)
    with pytest.warns(trpts.TrptsWarning, match="without a checksum"):
        trpts.merge_delta(copy.deepcopy(saved.backbone), old)
    # a format-1 file is still validated
    broken = _write(saved, "v1bad.safetensors", meta={"format_version": 1, "matrices": "x"}, drop_checksum=True)
    with pytest.warns(trpts.TrptsWarning):
        _refused_untouched(saved, broken, match="'matrices' must be an object")


def test_a_format_2_file_without_its_checksum_is_refused(saved):
    _refused_untouched(saved, _write(saved, "nock.safetensors", drop_checksum=True), match="must carry a checksum")


# ---- malformed metadata: always a DeltaFormatError naming the file and the problem ---------------

_QKV = "blocks.0.attn.qkv.weight"
MALFORMED = {
    "not-json": (dict(text="{not json"), "not valid JSON"),
    "not-an-object": (dict(text="[1, 2]"), "must be a JSON object"),
    "no-version": (dict(meta={"format_version": _DROP}), "format_version"),
    "string-version": (dict(meta={"format_version": "2"}), "format_version"),
    "bool-version": (dict(meta={"format_version": True}), "format_version"),
    "version-0": (dict(meta={"format_version": 0}), "unknown delta format version 0"),
    "newer-version": (dict(meta={"format_version": 4}), "upgrade trpts"),
    "no-tokens": (dict(meta={"tokens": _DROP}), r"lacks \['tokens'\]"),
    "no-heads": (dict(meta={"heads": _DROP}), "lacks"),
    "matrices-string": (dict(meta={"matrices": "blocks"}), "'matrices' must be an object"),
    "full-list": (dict(meta={"full": []}), "'full' must be an object"),
    "heads-string": (dict(meta={"heads": "head"}), "'heads' must be an array"),
    "heads-ints": (dict(meta={"heads": [1]}), "array of strings"),
    "tokens-string": (dict(meta={"tokens": "yes"}), "'tokens' must be an object or null"),
    "tokens-layers": (dict(meta={"tokens": lambda m: dict(m["tokens"], layers="0")}), "layers"),
    "tokens-missing-rho": (dict(meta={"tokens": lambda m: {k: v for k, v in m["tokens"].items() if k != "rho"}}),
                           "rho"),
    "fingerprint-int": (dict(meta={"fingerprint": 5}), "'fingerprint' must be a string"),
    "fingerprint-short": (dict(meta={"fingerprint": "abc"}), "64 lowercase hex"),
    "name-int": (dict(meta={"name": 5}), "'name' must be"),
    "user-list": (dict(meta={"user": [1]}), "'user' must be"),
    "matrix-string": (dict(meta={"matrices": lambda m: dict(m["matrices"], **{_QKV: "shape"})}), _QKV),
    "shape-string": (dict(meta={"matrices": lambda m: dict(m["matrices"], **{_QKV: {
        "shape": "96,32", "connections": m["matrices"][_QKV]["connections"]}})}), _QKV),
    "connections-string": (dict(meta={"matrices": lambda m: dict(m["matrices"], **{_QKV: {
        "shape": m["matrices"][_QKV]["shape"], "connections": "3"}})}), _QKV),
    "connections-too-many": (dict(meta={"matrices": lambda m: dict(m["matrices"], **{_QKV: {
        "shape": m["matrices"][_QKV]["shape"], "connections": 10**6}})}), "outside"),
    "full-shape-dict": (dict(meta={"full": lambda m: dict(m["full"], **{"head.bias": {"a": 1}})}), "head.bias"),
    "full-shape-wrong": (dict(meta={"full": lambda m: dict(m["full"], **{"head.bias": [4]})}), "has shape"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_metadata_is_a_delta_format_error(saved, case):
    spec, match = MALFORMED[case]
    path = _write(saved, f"{case}.safetensors", **spec)
    with pytest.raises(trpts.DeltaFormatError, match=match):
        trpts.read_delta(path)
    _refused_untouched(saved, path, match=match)


def test_a_stale_checksum_is_refused(saved):
    path = _write(saved, "stale.safetensors", meta={"name": "renamed"}, rechecksum=False)
    _refused_untouched(saved, path, match="checksum does not match")


@pytest.mark.parametrize("length", [0, 7, 1 << 20, 1 << 40, (1 << 64) - 1])
def test_corrupted_safetensors_header_length_is_a_delta_format_error(saved, length):
    path = saved.dir / f"len{length}.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + saved.raw[8:])
    _refused_untouched(saved, path, match="truncated or corrupted")


def test_columns_must_be_strictly_increasing(saved):
    tensors, header = load_file(saved.path), _header(saved.path)
    cols = tensors[f"columns:{_QKV}"]
    if cols.shape[1] < 2:
        pytest.skip("one connection per row")
    cols[0, 1] = cols[0, 0]
    header["checksum"] = checksum(header["trpts"], tensors)
    path = saved.dir / "dup.safetensors"
    save_file(tensors, path, metadata=header)
    _refused_untouched(saved, path, match="strictly increasing")


# ---- fan-in > 65,536: int32 column indices -----------------------------------------------------------


class Wide(nn.Module):
    """A plain module whose first weight has fan-in 70,000 (> 65,536): int32 columns in a delta."""

    FAN_IN = 70_000

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(self.FAN_IN, 3)
        self.mid = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.mid(torch.tanh(self.stem(x)))))


def test_fan_in_above_65536_round_trips_with_int32_columns(tmp_path):
    backbone = Wide().eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, Wide.FAN_IN, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(2)]
    model = copy.deepcopy(backbone)
    fisher = trpts.compute_fisher(model, batches, progress=False)
    assert "stem.weight" in fisher
    selection = trpts.allocate_connections(fisher, budget=0.05, model=model)
    handle = trpts.apply_masks(model, selection)
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=1e-2)
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    path = trpts.save_delta(model, tmp_path / "wide.safetensors", handle=handle)
    tensors = load_file(path)
    cols = tensors["columns:stem.weight"]
    assert cols.dtype == torch.int32 and cols.shape == (3, selection.matrices["stem.weight"].connections)
    assert int(cols.max()) > 1 << 16  # the selection reaches beyond what uint16 could index
    assert tensors["columns:mid.weight"].dtype == torch.uint16
    x = batches[0][0]
    fresh = copy.deepcopy(backbone)
    delta = trpts.load_delta(fresh, path)
    assert torch.equal(_out(fresh, x), _out(model, x))
    assert not torch.equal(_out(fresh, x), _out(backbone, x))
    delta.remove()
    assert _same_state(fresh, _state(backbone))
    merged = trpts.merge_delta(copy.deepcopy(backbone), path)
    plain = copy.deepcopy(backbone)
    plain.load_state_dict(merged)
    assert torch.equal(_out(plain, x), _out(model, x))
