from __future__ import annotations

import copy
import json
import os
import random
import stat

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, make_hf_vit, make_timm_vit, run_cli
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import trpts
from trpts.delta_format import checksum

FACTORIES = {"timm": make_timm_vit, "hf": make_hf_vit}


def _out(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out if torch.is_tensor(out) else out.logits


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def train_task(backbone, *, seed=0, budget=0.05, num_classes=None, tokens=False, train_biases=False, steps=2,
               img=16):
    """A fine-tuned copy of ``backbone``: random-score selection, masks, a few AdamW steps."""
    model = copy.deepcopy(backbone)
    g = torch.Generator().manual_seed(seed)
    if num_classes is not None:
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(num_classes)
        else:
            model.classifier = torch.nn.Linear(model.classifier.in_features, num_classes)
    names = trpts.default_scored_parameters(model)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in names}
    selection = trpts.allocate_connections(fisher, budget=budget, model=model)
    if tokens:
        trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
    handle = trpts.apply_masks(model, selection, train_biases=train_biases)
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=1e-2)
    classes = num_classes or 5
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, img, img, generator=g)
        y = torch.randint(0, classes, (4,), generator=g)
        out = model(x)
        out = out if torch.is_tensor(out) else out.logits
        optimizer.zero_grad()
        F.cross_entropy(out, y).backward()
        optimizer.step()
    return model.eval(), handle


X = make_batches(1, 3, seed=42)[0][0]


@given(family=st.sampled_from(sorted(FACTORIES)), seed=st.integers(0, 1000),
       budget=st.sampled_from([0.04, 0.1, 0.3]), dtype=st.sampled_from([None, torch.float16, torch.bfloat16]),
       tokens=st.booleans(), biases=st.booleans())
def test_round_trip(tmp_path_factory, family, seed, budget, dtype, tokens, biases):
    backbone = FACTORIES[family]().eval()
    original = _state(backbone)
    trained, handle = train_task(backbone, seed=seed, budget=budget, tokens=tokens, train_biases=biases)
    path = tmp_path_factory.mktemp("d") / "task.safetensors"
    trpts.save_delta(trained, path, dtype=dtype)
    model = copy.deepcopy(backbone)
    delta = trpts.load_delta(model, path)
    assert trpts.get_token_config(model) == trpts.get_token_config(trained)
    if dtype is None:
        assert torch.equal(_out(model, X), _out(trained, X))
    else:
        params = dict(model.named_parameters())
        for n, p in trained.named_parameters():
            if n in handle.selection:
                keep = handle.selection[n]
                assert torch.equal(params[n][keep], p.detach()[keep].to(dtype).to(p.dtype))
    delta.remove()
    assert _same_state(model, original) and trpts.get_token_config(model) is None
    assert torch.equal(_out(model, X), _out(backbone, X))


def test_columns_are_uint16_and_file_holds_only_the_delta(tmp_path):
    trained, handle = train_task(make_timm_vit(), budget=0.05)
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")
    tensors = load_file(path)
    sel = handle.selection
    assert {k for k in tensors if k.startswith("columns:")} == {f"columns:{m}" for m in sel}
    assert all(tensors[f"columns:{m}"].dtype == torch.uint16 for m in sel)
    assert {k for k in tensors if k.startswith("full:")} == {"full:head.weight", "full:head.bias"}
    assert sum(v.numel() for k, v in tensors.items() if k.startswith("values:")) == sel.num_selected
    assert not list(tmp_path.glob("*.tmp"))
    umask = os.umask(0o022)  # the file's mode is open()'s (0o666 less the umask), not mkstemp's 0o600
    try:
        path = trpts.save_delta(trained, tmp_path / "shared.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_many_tasks_switch_exactly():
    backbone = make_timm_vit(depth=3).eval()
    original = _state(backbone)
    plain = _out(backbone, X)
    model = copy.deepcopy(backbone)
    specs = {"a": dict(seed=1, num_classes=5), "b": dict(seed=2, num_classes=3, tokens=True),
             "c": dict(seed=3, num_classes=7, budget=0.2, train_biases=True)}
    handles, first, paths = {}, {}, {}
    import tempfile
    tmp = tempfile.mkdtemp()
    for name, spec in specs.items():
        trained, _ = train_task(backbone, **spec)
        paths[name] = trpts.save_delta(trained, f"{tmp}/{name}.safetensors")
        handles[name] = trpts.load_delta(model, paths[name])
        first[name] = _out(model, X)
        assert torch.equal(first[name], _out(trained, X))
    assert trpts.loaded_deltas(model) == ["a", "b", "c"]
    rng = random.Random(0)
    for _ in range(25):
        name = rng.choice([*handles, None])
        trpts.activate_delta(model, name)
        expected = plain if name is None else first[name]
        assert torch.equal(_out(model, X), expected), name
        if name is None:
            assert _same_state(model, original)
    handles["b"].remove()  # remove one, reload it under a new name
    again = trpts.load_delta(model, paths["b"], name="b2")
    assert torch.equal(_out(model, X), first["b"])
    trpts.activate_delta(model, "c")
    assert torch.equal(_out(model, X), first["c"])
    for h in (handles["a"], handles["c"], again):
        h.remove()
    assert _same_state(model, original) and torch.equal(_out(model, X), plain)
    assert not hasattr(model, "_trpts_state")  # nothing of trpts is left on the model


def test_merge_gives_a_plain_checkpoint(tmp_path):
    backbone = make_hf_vit().eval()
    trained, _ = train_task(backbone, num_classes=4)
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")
    model = copy.deepcopy(backbone)
    before = _state(model)
    state = trpts.merge_delta(model, path, tmp_path / "merged.safetensors")
    assert _same_state(model, before)  # the model is left as it was
    from transformers import ViTForImageClassification

    plain = ViTForImageClassification(copy.deepcopy(backbone.config))
    plain.classifier = torch.nn.Linear(plain.classifier.in_features, 4)
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    assert torch.equal(_out(plain, X), _out(trained, X))
    assert set(state) == set(plain.state_dict())


@pytest.fixture
def saved(tmp_path):
    backbone = make_timm_vit().eval()
    trained, _ = train_task(backbone, tokens=True)
    return backbone, trpts.save_delta(trained, tmp_path / "task.safetensors")


def _rewrite(path, out, *, drop=None, add=None, reshape=None, meta=None):
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1].contiguous()
    if meta:
        m = json.loads(header["trpts"])
        m.update(meta)
        header["trpts"] = json.dumps(m)
    return _resave(tensors, out, header)


def _resave(tensors, out, header):
    """Write a deliberately malformed delta with a matching checksum, so that validation (not the
    checksum) is what refuses it."""
    header = dict(header, checksum=checksum(header["trpts"], tensors))
    save_file(tensors, out, metadata=header)
    return out


def test_bad_input_leaves_the_model_untouched(saved, tmp_path):
    backbone, path = saved
    model = copy.deepcopy(backbone)
    other, _ = train_task(backbone, seed=9)
    loaded = trpts.load_delta(model, trpts.save_delta(other, tmp_path / "other.safetensors"))
    state, tokens, names = _state(model), trpts.get_token_config(model), trpts.loaded_deltas(model)
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"x" * 64)
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    cases = [
        (copy.deepcopy(make_timm_vit(depth=2)), None, {}),  # placeholder replaced below
        (tmp_path / "trunc.safetensors", trpts.DeltaFormatError, "truncated or corrupted"),
        (tmp_path / "garbage.safetensors", trpts.DeltaFormatError, "truncated or corrupted"),
        (tmp_path / "plain.safetensors", trpts.DeltaFormatError, "not a trpts delta"),
        (_rewrite(path, tmp_path / "v9.safetensors", meta={"format_version": 9}), trpts.DeltaFormatError, "upgrade"),
        (_rewrite(path, tmp_path / "miss.safetensors", drop="full:head.bias"), trpts.DeltaFormatError, "lacks"),
        (_rewrite(path, tmp_path / "extra.safetensors", add="full:ghost"), trpts.DeltaFormatError, "does not describe"),
        (_rewrite(path, tmp_path / "shape.safetensors", reshape="values:blocks.0.attn.qkv.weight"),
         trpts.DeltaFormatError, "shape"),
    ][1:]
    for bad, exc, match in cases:
        with pytest.raises(exc, match=match) as info:
            trpts.load_delta(model, bad)
        assert isinstance(info.value, ValueError)
        assert _same_state(model, state) and trpts.get_token_config(model) == tokens
        assert trpts.loaded_deltas(model) == names
    with pytest.raises(FileNotFoundError):
        trpts.load_delta(model, tmp_path / "missing.safetensors")
    # a name already loaded; an unknown name
    with pytest.raises(ValueError, match="already loaded"):
        trpts.load_delta(model, tmp_path / "other.safetensors")
    with pytest.raises(KeyError, match="no delta named"):
        trpts.activate_delta(model, "nope")
    assert _same_state(model, state)
    loaded.remove()


def test_wrong_backbone_and_architecture(saved):
    backbone, path = saved
    other_weights = make_timm_vit()
    with torch.no_grad():
        for p in other_weights.parameters():
            p.add_(0.01)
    before = _state(other_weights)
    with pytest.raises(trpts.FingerprintMismatchError, match="another backbone"):
        trpts.load_delta(other_weights, path)
    assert _same_state(other_weights, before) and trpts.get_token_config(other_weights) is None
    trpts.load_delta(other_weights, path, ignore_fingerprint=True).remove()  # explicit override
    assert _same_state(other_weights, before)
    wider = make_timm_vit(embed_dim=48, num_heads=2)
    with pytest.raises(ValueError, match="different architecture"):
        trpts.load_delta(wider, path)
    with pytest.raises(ValueError, match="timm-vit"):
        trpts.load_delta(make_hf_vit(), path)
    with pytest.raises(trpts.TrptsRuntimeError, match="apply_masks"):
        trpts.save_delta(backbone, path.parent / "x.safetensors")


def test_cli_info_merge_and_errors(tmp_path):
    import timm

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    trained, _ = train_task(base, budget=0.005, steps=1, img=224)
    x = torch.randn(1, 3, 224, 224)
    delta = trpts.save_delta(trained, tmp_path / "task.safetensors")
    run = run_cli

    helped = run("--help")
    assert helped.returncode == 0 and "info" in helped.stdout and "merge" in helped.stdout
    info = run("info", str(delta))
    assert info.returncode == 0, info.stderr
    for text in ("fingerprint", "format version  3", "timm-vit", "blocks.0.attn.qkv.weight", "head"):
        assert text in info.stdout
    merged = run("merge", str(delta), "--model", "vit_tiny_patch16_224", "--num-classes", "10",
                 "--weights", str(tmp_path / "base.safetensors"), "--out", str(tmp_path / "merged.safetensors"))
    assert merged.returncode == 0, merged.stderr
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    with torch.no_grad():
        assert torch.equal(plain(x), trained(x))
    wrong = run("merge", str(delta), "--model", "vit_tiny_patch16_224", "--num-classes", "10",
                "--out", str(tmp_path / "m2.safetensors"))  # random base weights: wrong backbone
    assert wrong.returncode == 1 and "another backbone" in wrong.stderr
    bad = run("info", str(tmp_path / "base.safetensors"))
    assert bad.returncode == 1 and "not a trpts delta" in bad.stderr
    assert run("frobnicate").returncode == 2


def test_format_spec_is_enough_to_read_a_delta(tmp_path):
    """A reader written from docs/format.md alone (raw bytes + JSON + numpy) applies a delta
    and recomputes its fingerprint."""
    import hashlib
    import struct

    import numpy as np

    backbone = make_timm_vit().eval()
    trained, _ = train_task(backbone, budget=0.1)
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    meta = json.loads(header["__metadata__"]["trpts"])
    assert header["__metadata__"]["format"] == "trpts-delta" and meta["format_version"] == 3

    def tensor(key):
        info = header[key]
        dtype = {"U16": "<u2", "I32": "<i4", "F32": "<f4"}[info["dtype"]]
        begin, end = info["data_offsets"]
        return np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])

    weights = {k: v.detach().numpy().copy() for k, v in backbone.state_dict().items()}
    digest = hashlib.sha256()
    for name in sorted(meta["matrices"]):
        shape = meta["matrices"][name]["shape"]
        rows, fan_in = shape[0], int(np.prod(shape[1:]))
        cols = tensor(f"columns:{name}").astype(np.int64)
        flat = (np.arange(rows)[:, None] * fan_in + cols).reshape(-1)
        w = weights[name].reshape(-1)
        digest.update(name.encode() + json.dumps(shape).encode() + w[flat].astype("<f4").tobytes())
        w[flat] = tensor(f"values:{name}").reshape(-1)
    assert digest.hexdigest() == meta["fingerprint"]

    def field(b):
        return len(b).to_bytes(8, "little") + b

    blob = field(header["__metadata__"]["trpts"].encode())
    for key in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[key]["data_offsets"]
        blob += field(key.encode()) + field(header[key]["dtype"].encode())
        blob += field(json.dumps(header[key]["shape"], separators=(",", ":")).encode()) + field(data[begin:end])
    assert hashlib.sha256(blob).hexdigest() == header["__metadata__"]["checksum"]
    for name in meta["full"]:
        weights[name] = tensor(f"full:{name}")
    expected = trained.state_dict()
    for k in expected:
        assert np.array_equal(weights[k].reshape(expected[k].shape), expected[k].numpy()), k


def test_metadata_without_required_keys_is_refused(saved, tmp_path):
    _, path = saved
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["trpts"])
    del meta["fingerprint"]
    header["trpts"] = json.dumps(meta)
    _resave(load_file(path), tmp_path / "nofp.safetensors", header)
    with pytest.raises(trpts.DeltaFormatError, match="lacks"):
        trpts.read_delta(tmp_path / "nofp.safetensors")
