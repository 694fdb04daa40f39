"""Hugging Face DeiT (DeiTModel, DeiTForImageClassification, ...WithTeacher): parameter selection in
both storages, deltas, and token selection with 2 prefix tokens ([CLS], distillation)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_hf_vit
from family_checks import batches, check_family, check_tokens, feature_loss
from torch.utils.flop_counter import FlopCounterMode

import trpts
from trpts.models import block_index_from_name, get_adapter


def make_deit(kind: str = "cls", depth: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.DeiTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=depth, num_attention_heads=2,
                           intermediate_size=64, num_labels=5)
    cls = {"bare": tf.DeiTModel, "cls": tf.DeiTForImageClassification,
           "teacher": tf.DeiTForImageClassificationWithTeacher}
    model = cls[kind](config)
    with torch.no_grad():  # DeiT zero-initializes these; make the prefix tokens distinct
        embeddings = model.embeddings if kind == "bare" else model.deit.embeddings
        for p in (embeddings.cls_token, embeddings.distillation_token, embeddings.position_embeddings):
            p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("kind", ["bare", "cls", "teacher"])
def test_deit_trains_saves_and_loads(kind, tmp_path):
    bare = kind == "bare"
    check_family(lambda: make_deit(kind), "hf-deit", tmp_path=tmp_path, loss_fn=feature_loss if bare else None,
                 train_head=not bare, other=make_hf_vit)


@pytest.mark.parametrize("kind", ["bare", "cls", "teacher"])
def test_deit_token_selection(kind):
    check_tokens(lambda: make_deit(kind))


def test_deit_names_heads_and_blocks():
    layer = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    for kind, prefix, heads in [("bare", "", []), ("cls", "deit.", ["classifier"]),
                                ("teacher", "deit.", ["cls_classifier", "distillation_classifier"])]:
        model = make_deit(kind)
        adapter = get_adapter(model)
        assert adapter.family == "hf-deit" and adapter.num_prefix_tokens(model) == 2
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embeddings.projection.weight",
            *(f"{prefix}layers.{i}.{m}.weight" for i in range(2) for m in layer)]
        assert adapter.head_parameters(model) == [f"{h}.{p}" for h in heads for p in ("weight", "bias")]
        assert adapter.block_index(model)[f"{prefix}layers.1.mlp.fc2.bias"] == 1
    assert block_index_from_name("deit.layers.1.attention.q_proj.weight") == 1


def _select_merge(x, scores, rho, p):
    """Eq. 9-11 sample by sample: keep the top k patch tokens (ties to the lower index), in order,
    and append the score-weighted mean of the others."""
    n = x.shape[1] - p
    k = max(1, math.floor(rho * n))
    if k >= n:
        return x
    out = []
    for xi, si in zip(x, scores, strict=True):
        ranked = sorted(range(n), key=lambda j: (-float(si[j]), j))
        kept, rest = sorted(ranked[:k]), ranked[k:]
        w = si[rest] / si[rest].sum()
        out.append(torch.cat([xi[:p], xi[p:][kept], (w[:, None] * xi[p:][rest]).sum(0, keepdim=True)]))
    return torch.stack(out)


def _reference_logits(model, x, layers, rho):
    """DeiTForImageClassificationWithTeacher, written out block by block with explicit attention."""
    deit = model.deit
    h = deit.embeddings(x)
    for i, layer in enumerate(deit.layers):
        a = layer.attention
        y = layer.layernorm_before(h)
        b, n, _ = y.shape
        q, k, v = (proj(y).view(b, n, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        attn = (q @ k.transpose(-1, -2) * a.scaling).softmax(-1)
        h = h + a.o_proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        if i in layers:
            scores = (q[:, :, :1] @ k[:, :, 2:].transpose(-1, -2) * a.scaling).softmax(-1).mean(1)[:, 0]
            h = _select_merge(h, scores, rho, 2)
        h = h + layer.mlp(layer.layernorm_after(h))
    h = deit.layernorm(h)
    return (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2


def test_wrapped_deit_matches_hand_written_forward():
    model = make_deit("teacher", depth=3).eval()
    x = batches(n=1, batch_size=3)[0][0]
    layers, rho = [0, 2], 0.5
    with torch.no_grad():
        expected = _reference_logits(model, x, layers, rho)
        trpts.wrap_vit(model, rho=rho, layers=layers)
        with trpts.record_kept_tokens(model) as kept:
            out = model(x).logits
    assert kept[0][0].shape == (3, 8) and kept[2][0].shape == (3, 4)  # 16 -> 8 + 1 -> 4 + 1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bare", "teacher"])
def test_deit_analytic_flops_match_flop_counter(kind):
    model = make_deit(kind).eval()
    model.set_attn_implementation("eager")  # FlopCounterMode does not count CPU SDPA
    trpts.wrap_vit(model, rho=0.5, layers=[0])
    assert trpts.token_counts(model, (3, 16, 16)) == [(18, 11), (11, 11)]  # 2 prefix + 8 kept + 1 merged
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert trpts.count_flops(model, (2, 3, 16, 16)) == counter.get_total_flops()


def test_deit_refuses_attention_masks_in_reducing_blocks():
    model = make_deit("cls").eval()
    trpts.wrap_vit(model, rho=0.5, layers=[1])
    mask = torch.ones(2, 18, dtype=torch.long)
    mask[:, -1] = 0  # a padding mask: materialized for the full token count
    with pytest.raises(trpts.TrptsValueError, match="attention mask"):
        model(torch.randn(2, 3, 16, 16), attention_mask=mask)


def test_deit_delta_carries_token_selection(tmp_path):
    model = make_deit("teacher")
    data = batches()
    selection = trpts.allocate_connections(trpts.compute_fisher(model, data, progress=False), budget=0.05, model=model)
    trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
    handle = trpts.apply_masks(model, selection)
    optimizer = torch.optim.AdamW(handle.param_groups(), lr=1e-2)
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(model(x).logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trpts.save_delta(model, tmp_path / "deit.safetensors", handle=handle)
    fresh = make_deit("teacher")
    trpts.load_delta(fresh, tmp_path / "deit.safetensors")
    assert trpts.get_token_config(fresh) == trpts.get_token_config(model)
    assert trpts.get_token_config(fresh).num_prefix_tokens == 2 and trpts.get_token_config(fresh).family == "hf-deit"
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x).logits, model.eval()(x).logits)


def test_deit_refuses_blocks_it_cannot_patch_before_patching_any():
    model = make_deit("cls").eval()
    layers = model.deit.layers
    layers[1].__class__ = type("MyDeiTLayer", (type(layers[1]),), {})
    with pytest.raises(trpts.TrptsValueError, match="DeiTLayer blocks only; got MyDeiTLayer"):
        trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    model = make_deit("cls").eval()
    del model.deit.layers[1].layernorm_after  # a layout the reducing forward does not replicate
    with pytest.raises(trpts.TrptsValueError, match=r"5\.x DeiTLayer layout"):
        trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    assert trpts.get_token_config(model) is None and "forward" not in vars(model.deit.layers[0])
