"""Hugging Face DINOv2 (with and without registers): parameter selection in both storages, deltas,
token selection (registers are prefix tokens; the classifiers read the size-weighted patch mean)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_timm_vit
from family_checks import batches, check_family, check_tokens, feature_loss
from test_family_hf_deit import _select_merge
from token_reference import expand_by_sizes
from torch.utils.flop_counter import FlopCounterMode

import trpts
from trpts.models import get_adapter

KINDS = ["bare", "cls", "reg-bare", "reg-cls"]


def make_dinov2(kind: str = "bare", depth: int = 2, **kwargs):
    import transformers as tf

    torch.manual_seed(0)
    options = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=depth, num_attention_heads=2,
                   mlp_ratio=2, layerscale_value=0.5, num_labels=5)
    options.update(kwargs)
    if kind.startswith("reg"):
        config = tf.Dinov2WithRegistersConfig(num_register_tokens=2, **options)
        cls = tf.Dinov2WithRegistersModel if kind == "reg-bare" else tf.Dinov2WithRegistersForImageClassification
    else:
        config = tf.Dinov2Config(**options)
        cls = tf.Dinov2Model if kind == "bare" else tf.Dinov2ForImageClassification
    model = cls(config)
    if kind.startswith("reg"):  # zero-initialized: make the register tokens distinct
        with torch.no_grad():
            get_adapter(model).backbone(model).embeddings.register_tokens.normal_()
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_dinov2_trains_saves_and_loads(kind, tmp_path):
    bare = kind.endswith("bare")
    check_family(lambda: make_dinov2(kind), "hf-dinov2", tmp_path=tmp_path, loss_fn=feature_loss if bare else None,
                 train_head=not bare, other=make_timm_vit)


@pytest.mark.parametrize("kind, kwargs", [("bare", {}), ("reg-bare", {}), ("bare", {"use_swiglu_ffn": True})],
                         ids=["dinov2", "registers", "swiglu"])
def test_dinov2_token_selection(kind, kwargs):
    check_tokens(lambda: make_dinov2(kind, **kwargs))


@pytest.mark.parametrize("kind", ["cls", "reg-cls"])
def test_dinov2_classifiers_read_the_size_weighted_patch_mean(kind):
    """The classifier's [CLS] + patch-mean input: the mean is over the patches each token stands
    for (the tokens repeated by their sizes, then Hugging Face's own plain mean)."""
    check_tokens(lambda: make_dinov2(kind))
    model = make_dinov2(kind, depth=3).eval()
    p = get_adapter(model).num_prefix_tokens(model)
    x = batches(n=1, batch_size=3)[0][0]
    trpts.wrap_vit(model, rho=0.5, layers=[0, 2])
    with torch.no_grad():
        out = model(pixel_values=x)
        tokens = get_adapter(model).backbone(model)(pixel_values=x).last_hidden_state
        sizes = trpts.token_sizes(model)
        pooled = torch.stack([torch.cat([t[0], expand_by_sizes(t, s, p)[p:].mean(0)])
                              for t, s in zip(tokens, sizes, strict=True)])
        expected = torch.nn.functional.linear(pooled, model.classifier.weight, model.classifier.bias)
    assert tokens.shape[1] == p + 4 + 1 and bool((sizes[:, -1] > 1).all())
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    trpts.unwrap_vit(model)
    assert not model.classifier._forward_pre_hooks and not get_adapter(model).backbone(model)._forward_hooks


def test_dinov2_names_heads_and_prefix_tokens():
    layer = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    for kind, prefix, prefix_tokens in [("bare", "", 1), ("cls", "dinov2.", 1), ("reg-bare", "", 3),
                                        ("reg-cls", "dinov2_with_registers.", 3)]:
        model = make_dinov2(kind)
        adapter = get_adapter(model)
        assert adapter.family == "hf-dinov2" and adapter.num_prefix_tokens(model) == prefix_tokens
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embeddings.projection.weight",
            *(f"{prefix}encoder.layer.{i}.{m}.weight" for i in range(2) for m in layer)]
        assert adapter.head_parameters(model) == ([] if kind.endswith("bare") else ["classifier.weight",
                                                                                    "classifier.bias"])
    swiglu = make_dinov2("bare", use_swiglu_ffn=True)
    assert [n for n in trpts.default_scored_parameters(swiglu) if n.startswith("encoder.layer.0.mlp.")] == [
        f"encoder.layer.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]


def _reference(model, x, layers, rho):
    """Dinov2WithRegistersModel written out block by block (explicit attention, LayerScale)."""
    p = get_adapter(model).num_prefix_tokens(model)
    h = model.embeddings(x)
    for i, layer in enumerate(model.encoder.layer):
        a = layer.attention
        y = layer.norm1(h)
        b, n, _ = y.shape
        q, k, v = (proj(y).view(b, n, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        attn = (q @ k.transpose(-1, -2) * a.scaling).softmax(-1)
        h = h + layer.layer_scale1.lambda1 * a.o_proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        if i in layers:
            scores = (q[:, :, :1] @ k[:, :, p:].transpose(-1, -2) * a.scaling).softmax(-1).mean(1)[:, 0]
            h = _select_merge(h, scores, rho, p)
        h = h + layer.layer_scale2.lambda1 * layer.mlp(layer.norm2(h))
    return model.layernorm(h)


def test_wrapped_dinov2_with_registers_matches_hand_written_forward():
    model = make_dinov2("reg-bare", depth=3).eval()
    x = batches(n=1, batch_size=3)[0][0]
    layers, rho = [0, 2], 0.5
    with torch.no_grad():
        expected = _reference(model, x, layers, rho)
        trpts.wrap_vit(model, rho=rho, layers=layers)
        out = model(x)
    assert out.last_hidden_state.shape == (3, 3 + 4 + 1, 32)  # 2 registers + [CLS]; 16 -> 8 + 1 -> 4 + 1
    torch.testing.assert_close(out.last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, expected[:, 0], rtol=1e-4, atol=1e-5)


def test_dinov2_analytic_flops_match_flop_counter():
    model = make_dinov2("reg-bare").eval()
    model.set_attn_implementation("eager")  # FlopCounterMode does not count CPU SDPA
    trpts.wrap_vit(model, rho=0.3, layers=[0, 1])
    assert trpts.token_counts(model, (3, 16, 16)) == [(19, 8), (8, 5)]  # 3 prefix + 4 kept + 1 merged
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert trpts.count_flops(model, (2, 3, 16, 16)) == counter.get_total_flops()
