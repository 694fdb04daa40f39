"""The life of a task after the first day: resume from a delta, unload / merge, disable, PEFT's
verbs, removing a loaded delta, ``python -m trpts``. Tiny real timm and Hugging Face ViTs."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_vit, make_timm_vit, run_cli

import trpts

FACTORIES = {"timm": make_timm_vit, "hf": make_hf_vit}


def _out(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


def _selection(model, seed=0, budget=0.05):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in trpts.default_scored_parameters(model)}
    return trpts.allocate_connections(fisher, budget=budget, model=model)


def _data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(steps)]


def _step(model, optimizer, batch):
    model.train()
    x, y = batch
    optimizer.zero_grad()
    out = model(x)
    F.cross_entropy(out if torch.is_tensor(out) else out.logits, y).backward()
    optimizer.step()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("storage", ["hooks", "sparse"])
@pytest.mark.parametrize("family", ["timm", "hf"])
def test_resume_from_a_delta_equals_uninterrupted_training(tmp_path, family, storage):
    """4 AdamW steps == 2 steps, save_delta, a fresh pretrained model, load_delta +
    apply_masks(Selection.from_delta) + the optimizer's state restored, 2 more steps."""
    pretrained = FACTORIES[family]()
    selection = _selection(pretrained)
    data = _data(4)
    x = torch.randn(3, 3, 16, 16)

    straight = copy.deepcopy(pretrained)
    h = trpts.apply_masks(straight, selection, storage=storage)
    opt = torch.optim.AdamW(h.param_groups(weight_decay=0.01, lr=1e-2))
    for batch in data:
        _step(straight, opt, batch)

    first = copy.deepcopy(pretrained)
    h1 = trpts.apply_masks(first, selection, storage=storage)
    opt1 = torch.optim.AdamW(h1.param_groups(weight_decay=0.01, lr=1e-2))
    for batch in data[:2]:
        _step(first, opt1, batch)
    path = trpts.save_delta(first, tmp_path / "stage1.safetensors")
    saved_optimizer = copy.deepcopy(opt1.state_dict())
    stage1_out = _out(first, x)

    resumed = copy.deepcopy(pretrained)
    trpts.load_delta(resumed, path)
    assert torch.equal(_out(resumed, x), stage1_out)
    restored = trpts.Selection.from_delta(path)
    assert restored == selection  # indices and the per-weight report
    h2 = trpts.apply_masks(resumed, restored, storage=storage)
    opt2 = torch.optim.AdamW(h2.param_groups(weight_decay=0.01, lr=1e-2))
    opt2.load_state_dict(saved_optimizer)
    for batch in data[2:]:
        _step(resumed, opt2, batch)
    assert not torch.equal(_out(straight, x), stage1_out)  # steps 3-4 changed the model
    # float tolerance: the resumed run does the same float32 operations in the same order; only
    # the head is a new module (same values), so the results are expected to be bit-equal
    torch.testing.assert_close(_out(resumed, x), _out(straight, x), rtol=1e-6, atol=1e-6)

    # the re-saved delta describes the *pretrained* backbone and reproduces the resumed model
    path2 = trpts.save_delta(resumed, tmp_path / "stage2.safetensors")
    fresh = copy.deepcopy(pretrained)
    trpts.load_delta(fresh, path2)
    assert torch.equal(_out(fresh, x), _out(resumed, x))


@pytest.mark.parametrize("storage", ["hooks", "sparse"])
def test_loading_or_switching_while_training_is_a_clear_error(tmp_path, storage):
    pretrained = make_timm_vit()
    trained = copy.deepcopy(pretrained)
    h = trpts.apply_masks(trained, _selection(trained), storage=storage)
    _step(trained, torch.optim.AdamW(h.param_groups(lr=1e-2)), _data(1)[0])
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")

    model = copy.deepcopy(pretrained)
    handle = trpts.apply_masks(model, _selection(model, seed=3), storage=storage)
    before = _state(model)
    with pytest.raises(trpts.TrptsRuntimeError, match="load it first") as info:
        trpts.load_delta(model, path)
    assert isinstance(info.value, RuntimeError) and "Selection.from_delta" in str(info.value)
    assert _same(_state(model), before) and trpts.loaded_deltas(model) == []
    handle.unload()
    trpts.load_delta(model, path, name="t")
    handle = trpts.apply_masks(model, trpts.Selection.from_delta(path), storage=storage)
    with pytest.raises(trpts.TrptsRuntimeError, match="being trained"):
        trpts.activate_delta(model, None)
    with pytest.raises(trpts.TrptsRuntimeError, match="being trained"):
        trpts.remove_delta(model, "t")
    handle.merge_and_unload()
    trpts.remove_delta(model, "t")
    assert trpts.loaded_deltas(model) == []


@pytest.mark.parametrize("storage", ["hooks", "sparse"])
@pytest.mark.parametrize("family", ["timm", "hf"])
def test_unload_merge_and_disable_adapter(family, storage):
    x = torch.randn(3, 3, 16, 16)
    model = FACTORIES[family]()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original, original_out = _state(model), _out(model, x)
    handle = trpts.apply_masks(model, _selection(model), storage=storage, train_biases=True)
    opt = torch.optim.AdamW(handle.param_groups(weight_decay=0.01, lr=1e-2))
    for batch in _data(2):
        _step(model, opt, batch)
    trained_state, trained_out = _state(model), _out(model, x)
    assert not torch.equal(trained_out, original_out)

    with handle.disable_adapter():  # exactly the model before apply_masks, for a while
        assert torch.equal(_out(model, x), original_out)
    assert torch.equal(_out(model, x), trained_out) and _same(_state(model), trained_state)
    _step(model, opt, _data(1, seed=9)[0])  # training goes on after the block
    trained_state, trained_out = _state(model), _out(model, x)

    twin = copy.deepcopy(model)  # a copy carries no training handle; the original's is unaffected
    assert trpts.get_mask_handle(twin) is None and trpts.get_mask_handle(model) is handle

    assert handle.unload() is model  # everything back, bit-exactly
    assert _same(_state(model), original) and torch.equal(_out(model, x), original_out)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert trpts.get_mask_handle(model) is None and not handle.active
    handle.unload()  # idempotent
    with pytest.raises(trpts.TrptsRuntimeError, match="unloaded"), handle.disable_adapter():
        pass

    merged_model = FACTORIES[family]()
    h2 = trpts.apply_masks(merged_model, _selection(merged_model), storage=storage, train_biases=True)
    opt2 = torch.optim.AdamW(h2.param_groups(weight_decay=0.01, lr=1e-2))
    for batch in [*_data(2), _data(1, seed=9)[0]]:
        _step(merged_model, opt2, batch)
    assert h2.merge_and_unload() is merged_model  # the trained values stay, as plain weights
    assert _same(_state(merged_model), trained_state) and torch.equal(_out(merged_model, x), trained_out)
    assert all(not hasattr(m, "trpts_values") for m in merged_model.modules())


def test_remove_is_a_deprecated_alias_of_merge_and_unload():
    model = make_timm_vit()
    handle = trpts.apply_masks(model, _selection(model))
    _step(model, torch.optim.AdamW(handle.param_groups(lr=1e-2)), _data(1)[0])
    trained = _state(model)
    with pytest.warns(DeprecationWarning, match="merge_and_unload"):
        handle.remove()
    assert _same(_state(model), trained) and trpts.get_mask_handle(model) is None


def test_peft_style_counts(capsys):
    model = make_timm_vit()
    handle = trpts.apply_masks(model, _selection(model), storage="sparse")
    trainable, total = handle.get_nb_trainable_parameters()
    assert trainable == handle.num_trainable == sum(p.numel() for p in handle.parameters())
    assert total == sum(p.numel() for n, p in model.named_parameters() if not n.endswith("trpts_values"))
    handle.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")


def test_selection_from_delta_rejects_what_read_delta_rejects(tmp_path):
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a delta")
    with pytest.raises(trpts.DeltaFormatError):
        trpts.Selection.from_delta(bogus)


def test_python_dash_m_trpts_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "trpts", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "trpts" in done.stdout and "merge" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "trpts", "info", "/nonexistent.safetensors"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "error" in bad.stderr


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_a_delta_for_another_architecture_is_refused_before_anything_changes(tmp_path, family):
    make = FACTORIES[family]
    trained = make(depth=2)
    h = trpts.apply_masks(trained, _selection(trained))
    _step(trained, torch.optim.AdamW(h.param_groups(lr=1e-2)), _data(1)[0])
    path = trpts.save_delta(trained, tmp_path / "two_blocks.safetensors")
    assert trpts.read_delta(path)[0]["identity"]["depth"] == 2

    deeper = make(depth=3)  # shares the first two blocks' parameter names and shapes
    before = _state(deeper)
    with pytest.raises(trpts.TrptsValueError, match=r"depth 2 in the delta but 3 here") as info:
        trpts.load_delta(deeper, path)
    assert "ignore_architecture=True" in str(info.value)
    assert _same(_state(deeper), before) and trpts.loaded_deltas(deeper) == []
    # the documented opt-out (the deeper model's blocks were initialised differently: its
    # fingerprint differs too)
    trpts.load_delta(deeper, path, ignore_architecture=True, ignore_fingerprint=True).remove()
    assert _same(_state(deeper), before)


def test_timm_identity_covers_image_size_heads_and_prefix_tokens(tmp_path):
    trained = make_timm_vit()
    h = trpts.apply_masks(trained, _selection(trained))
    _step(trained, torch.optim.AdamW(h.param_groups(lr=1e-2)), _data(1)[0])
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")
    stored = trpts.read_delta(path)[0]["identity"]
    assert {k: stored[k] for k in ("width", "heads", "patch_size", "img_size", "prefix_tokens")} == {
        "width": 32, "heads": 2, "patch_size": [4, 4], "img_size": [16, 16], "prefix_tokens": 1}
    for changed, what in (({"img_size": 32}, "img_size"), ({"num_heads": 4}, "heads"),
                          ({"reg_tokens": 2}, "prefix_tokens")):
        other = make_timm_vit(**changed)
        with pytest.raises(trpts.TrptsValueError, match=what):
            trpts.load_delta(other, path)


def _cli(*args):
    return run_cli(*args)


def test_cli_merge_builds_the_stored_timm_architecture(tmp_path):
    from safetensors.torch import load_file, save_file

    pretrained = make_timm_vit()  # img 16, patch 4, width 32, depth 2, heads 2, mlp_ratio 2
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, tmp_path / "base.safetensors")
    trained = copy.deepcopy(pretrained)
    h = trpts.apply_masks(trained, _selection(trained))
    _step(trained, torch.optim.AdamW(h.param_groups(lr=1e-2)), _data(1)[0])
    delta = trpts.save_delta(trained, tmp_path / "t.safetensors", metadata={"dataset": "tiny"})
    info = _cli("info", str(delta))
    assert info.returncode == 0 and "'dataset': 'tiny'" in info.stdout and "'depth': 2" in info.stdout

    out = tmp_path / "merged.safetensors"
    common = [str(delta), "--weights", str(tmp_path / "base.safetensors"), "--num-classes", "5", "--out", str(out)]
    missing = _cli("merge", *common)  # mlp_ratio is not part of the stored architecture
    assert missing.returncode == 1 and "a different architecture" in missing.stderr
    done = _cli("merge", *common, "--model-kwargs", "mlp_ratio=2.0")  # model name, sizes: from the delta
    assert done.returncode == 0, done.stderr
    plain = make_timm_vit()
    plain.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_out(plain, x), _out(trained, x))

    wrong = _cli("merge", str(delta), "--model-kwargs", "mlp_ratio=2.0", "--num-classes", "5", "--out",
                 str(tmp_path / "m2.safetensors"))  # random base weights
    assert wrong.returncode == 1 and "--ignore-fingerprint" in wrong.stderr and "=True" not in wrong.stderr
    bad = _cli("merge", *common, "--model-kwargs", "mlp_ratio")
    assert bad.returncode == 1 and "--model-kwargs takes key=value" in bad.stderr


def test_cli_merge_builds_a_hugging_face_model_from_a_config_directory(tmp_path):
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification

    pretrained = make_hf_vit()
    pretrained.save_pretrained(tmp_path / "base")  # config.json + model.safetensors, local
    trained = copy.deepcopy(pretrained)
    h = trpts.apply_masks(trained, _selection(trained))
    _step(trained, torch.optim.AdamW(h.param_groups(lr=1e-2)), _data(1)[0])
    delta = trpts.save_delta(trained, tmp_path / "t.safetensors")
    out = tmp_path / "merged.safetensors"
    refused = _cli("merge", str(delta), "--out", str(out))
    assert refused.returncode == 1 and "--hf-config" in refused.stderr
    done = _cli("merge", str(delta), "--hf-config", str(tmp_path / "base"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    plain = ViTForImageClassification(pretrained.config)
    plain.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_out(plain, x), _out(trained, x))


def test_hugging_face_config_follows_the_active_head_and_save_pretrained_round_trips(tmp_path):
    from transformers import ViTForImageClassification

    pretrained = make_hf_vit()  # 5 labels, placeholder names
    original = (pretrained.config.num_labels, dict(pretrained.config.id2label))
    trained = copy.deepcopy(pretrained)
    trained.classifier = torch.nn.Linear(32, 3)  # a 3-class task
    h = trpts.apply_masks(trained, _selection(trained))
    opt = torch.optim.AdamW(h.param_groups(lr=1e-2))
    trained.train()
    out = trained(torch.randn(4, 3, 16, 16)).logits
    F.cross_entropy(out, torch.tensor([0, 1, 2, 1])).backward()
    opt.step()
    names = ["cat", "dog", "bird"]
    path = trpts.save_delta(trained, tmp_path / "animals.safetensors", labels=names)
    assert trpts.read_delta(path)[0]["labels"] == names
    with pytest.raises(trpts.TrptsValueError, match="3 outputs"):
        trpts.save_delta(trained, tmp_path / "bad.safetensors", labels=["a", "b"])

    model = copy.deepcopy(pretrained)
    trpts.load_delta(model, path)
    assert model.config.num_labels == 3 and model.config.id2label == dict(enumerate(names))
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
    x = torch.randn(2, 3, 16, 16)
    expected = _out(model, x)
    model.save_pretrained(tmp_path / "exported")  # the ecosystem's own format, then back
    again = ViTForImageClassification.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert torch.equal(_out(again, x), expected) and again.config.id2label == dict(enumerate(names))
    trpts.activate_delta(model, None)  # the original head and its metadata
    assert (model.config.num_labels, dict(model.config.id2label)) == original


def test_timm_num_classes_follows_the_active_head(tmp_path):
    pretrained = make_timm_vit()
    trained = copy.deepcopy(pretrained)
    trained.reset_classifier(3)
    h = trpts.apply_masks(trained, _selection(trained))
    _step(trained, torch.optim.AdamW(h.param_groups(lr=1e-2)), (torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])))
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")
    model = copy.deepcopy(pretrained)
    trpts.load_delta(model, path)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    trpts.activate_delta(model, None)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5


def test_from_tensors_on_a_delta_points_to_from_delta(tmp_path):
    trained = make_timm_vit()
    trpts.apply_masks(trained, _selection(trained))
    path = trpts.save_delta(trained, tmp_path / "t.safetensors")
    meta, tensors = trpts.read_delta(path)
    columns = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("columns:")}
    with pytest.raises(trpts.TrptsValueError, match=r"Selection\.from_delta"):
        trpts.Selection.from_tensors(columns, meta["selection"])
