from __future__ import annotations

import torch
from conftest import make_hf_vit, make_timm_vit

import trpts
from trpts.models import block_index_from_name, find_adapter, get_adapter


def test_timm_default_scored_parameters_are_block_linears_and_patch_embed():
    model = make_timm_vit(depth=2)
    names = trpts.default_scored_parameters(model)
    assert names[0] == "patch_embed.proj.weight"
    expected = [f"blocks.{i}.{m}.weight" for i in range(2)
                for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names[1:] == expected
    assert get_adapter(model).head_parameters(model) == ["head.weight", "head.bias"]


def test_timm_layerscale_qknorm_registers_scores_linears_only():
    model = make_timm_vit(init_values=1e-2, reg_tokens=2, qk_norm=True)
    names = trpts.default_scored_parameters(model)
    assert all(n.endswith(".weight") for n in names)
    assert not any("ls1" in n or "norm" in n or "reg_token" in n for n in names)
    assert len(names) == 1 + 4 * 2


def test_deit_distilled_has_two_heads():
    model = make_timm_vit(model_name="deit_tiny_distilled_patch16_224")
    adapter = get_adapter(model)
    assert adapter.family == "timm-vit"
    assert adapter.head_parameters(model) == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]


def test_hf_vit_adapter_layout_and_blocks():
    model = make_hf_vit(depth=2)
    adapter = get_adapter(model)
    assert adapter.family == "hf-vit"
    names = trpts.default_scored_parameters(model)
    assert names[0] == "vit.embeddings.patch_embeddings.projection.weight"
    assert len(names) == 1 + 6 * 2  # q, k, v, o, fc1, fc2 per block
    index = adapter.block_index(model)
    for n in names[1:]:
        assert index[n] == block_index_from_name(n)
    assert adapter.head_parameters(model) == ["classifier.weight", "classifier.bias"]
    assert get_adapter(make_hf_vit(classifier=False)).head_parameters(make_hf_vit(classifier=False)) == []


def test_block_index_from_name_covers_the_families():
    assert block_index_from_name("blocks.3.attn.qkv.weight") == 3
    assert block_index_from_name("vit.layers.7.mlp.fc1.weight") == 7
    assert block_index_from_name("dinov2.encoder.layer.11.attention.attention.query.weight") == 11
    assert block_index_from_name("patch_embed.proj.weight") is None


def test_wrappers_are_unwrapped():
    model = make_timm_vit()
    compiled = torch.compile(model)
    assert find_adapter(compiled) is not None
    assert trpts.default_scored_parameters(compiled) == trpts.default_scored_parameters(model)


def test_every_family_file_is_discovered_once():
    """Adding a family is adding a file: each family module of trpts/models/ gives one adapter."""
    import pathlib

    import trpts.models as models

    files = {p.stem for p in pathlib.Path(models.__file__).parent.glob("*.py")
             if not p.stem.startswith("_") and p.stem not in ("base", "generic")}
    assert {type(a).__module__.rsplit(".", 1)[1] for a in models.ADAPTERS} == files
    assert len({a.family for a in models.ADAPTERS}) == len(models.ADAPTERS) == len(files)
    assert all(a.supports_tokens == isinstance(a, models.TokenAdapter) for a in models.ADAPTERS)
