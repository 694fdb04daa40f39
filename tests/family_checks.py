"""The checks every model family passes (one ``tests/test_family_<name>.py`` per family calls
them with a tiny real model): scores, selection, masks in both storages, AdamW steps with weight
decay on the head and frozen entries bit-identical, a delta round trip onto a fresh backbone with
``torch.equal`` outputs, refusal of another family's delta, and token selection where supported.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trpts
from trpts._utils import unwrap_model

Factory = Callable[[], nn.Module]
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]

#: What the tests of this session verified: ``{family: {model class: {feature, ...}}}``. The
#: compatibility matrix in docs/models.md and the README is generated from it (see conftest.py).
COVERED: dict[str, dict[str, set[str]]] = {}
FEATURES = ("Fisher", "allocation", "hooks", "sparse storage", "deltas", "token selection", "torch.compile", "DDP")


def record(model: nn.Module, *features: str) -> None:
    """Note that a test verified ``features`` on ``model``'s family and class."""
    assert set(features) <= set(FEATURES), features
    family = trpts.models.get_adapter(model).family
    COVERED.setdefault(family, {}).setdefault(type(unwrap_model(model)).__name__, set()).update(features)


def matrix_markdown() -> str:
    """The compatibility matrix of :data:`COVERED`: one row per family, its tested classes."""
    lines = ["| family | classes tested | " + " | ".join(FEATURES) + " |", "|---|---|" + "---|" * len(FEATURES)]
    for family in sorted(COVERED):
        classes = COVERED[family]
        cells = []
        for f in FEATURES:
            having = sorted(c for c, feats in classes.items() if f in feats)
            cells.append("yes" if len(having) == len(classes) else ", ".join(having) if having else "-")
        lines.append(f"| `{family}` | {', '.join(f'`{c}`' for c in sorted(classes))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor to compare of a model output: logits, else the last hidden state / pooled output."""
    if torch.is_tensor(out):
        return out
    for key in ("logits", "pooler_output", "image_embeds", "last_hidden_state"):
        value = getattr(out, key, None)
        if torch.is_tensor(value):
            return value
    return out[0]


def batches(n: int = 2, batch_size: int = 4, img: int = 16, classes: int = 5, seed: int = 1
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, img, img, generator=g),
             torch.randint(0, classes, (batch_size,), generator=g)) for _ in range(n)]


def feature_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """A loss for bare backbones: a fixed projection of the output's features to class logits."""
    feats = output_tensor(out)
    feats = feats[:, 0] if feats.ndim == 3 else feats
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(feats.shape[-1], int(targets.max()) + 1, generator=g).to(feats)
    return F.cross_entropy(feats @ proj, targets)


def _frozen_entries(model: nn.Module, selection: trpts.Selection) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n].detach()[~selection[n]].clone() for n in selection}


def check_family(make: Factory, family: str, *, tmp_path: Path, loss_fn: LossFn | None = None,
                 train_head: bool = True, img: int = 16, other: Factory | None = None) -> None:
    """The parameter-selection life of a task on ``make()`` (adapter ``family``), in both storages."""
    data = batches(img=img)
    model = make()
    assert trpts.models.get_adapter(model).family == family
    names = trpts.default_scored_parameters(model)
    assert names, "nothing scored"
    fisher = trpts.compute_fisher(model, data, loss_fn=loss_fn, progress=False)
    assert list(fisher) == names
    assert all(f.dtype == torch.float32 and bool((f >= 0).all()) for f in fisher.values())
    assert any(bool((f > 0).any()) for f in fisher.values())
    selection = trpts.allocate_connections(fisher, budget=0.05, model=model)
    x = data[0][0]
    for storage in ("hooks", "sparse"):
        tuned = copy.deepcopy(model)
        before = _frozen_entries(tuned, selection)
        others = {n: p.detach().clone() for n, p in tuned.named_parameters() if n not in selection}
        handle = trpts.apply_masks(tuned, selection, train_head=train_head, storage=storage)
        groups = handle.param_groups(weight_decay=0.05, head_lr=1e-2) if train_head else handle.param_groups()
        optimizer = torch.optim.AdamW(groups, lr=1e-2)
        tuned.train()
        for xb, yb in data:
            out = tuned(xb)
            loss = (loss_fn or (lambda o, t: F.cross_entropy(output_tensor(o), t)))(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        after = _frozen_entries(tuned, selection)
        assert all(torch.equal(before[n], after[n]) for n in before), storage
        named = dict(tuned.named_parameters())  # (sparse storage adds its value vectors)
        for n, value in others.items():
            if n not in handle.full:
                assert torch.equal(named[n].detach(), value), (storage, n)
        changed = [n for n in selection if not torch.equal(handle.selected_values(n),
                                                           model.get_parameter(n).detach()[selection[n]])]
        assert changed, f"{storage}: no selected entry moved"
        path = tmp_path / f"{family}-{storage}.safetensors"
        trpts.save_delta(tuned, path, handle=handle)
        fresh = make()
        trpts.load_delta(fresh, path)
        with torch.no_grad():
            assert torch.equal(output_tensor(fresh.eval()(x)), output_tensor(tuned.eval()(x))), storage
        handle.merge_and_unload()
    record(model, "Fisher", "allocation", "hooks", "sparse storage", "deltas")
    if other is not None:  # another family's delta is refused before anything changes
        alien = other()
        alien_fisher = trpts.compute_fisher(alien, batches(n=1, img=img), progress=False,
                                            loss_fn=None if trpts.models.get_adapter(alien).heads(alien) else
                                            feature_loss)
        alien_handle = trpts.apply_masks(alien, trpts.allocate_connections(alien_fisher, budget=0.05),
                                         train_head=bool(trpts.models.get_adapter(alien).heads(alien)))
        alien_path = tmp_path / "alien.safetensors"
        trpts.save_delta(alien, alien_path, handle=alien_handle)
        target = make()
        state = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(trpts.TrptsError):
            trpts.load_delta(target, alien_path)
        assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())


def check_tokens(make: Factory, *, img: int = 16) -> None:
    """Token selection on a [CLS] family: rho = 1 is exact, and a sample's output does not
    depend on the rest of the batch at rho < 1."""
    x = batches(n=1, batch_size=3, img=img)[0][0]
    model = make().eval()
    with torch.no_grad():
        dense = output_tensor(model(x))
    selection = trpts.allocate_connections(trpts.compute_fisher(model, batches(n=1, img=img), progress=False,
                                                                loss_fn=None if trpts.models.get_adapter(
                                                                    model).heads(model) else feature_loss))
    trpts.wrap_vit(model, selection, rho=1.0, num_layers=1)
    with torch.no_grad():
        assert torch.equal(output_tensor(model(x)), dense)
    trpts.unwrap_vit(model)
    trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
    with torch.no_grad():
        together = output_tensor(model(x))
        alone = torch.cat([output_tensor(model(x[i:i + 1])) for i in range(len(x))])
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    record(model, "token selection")
