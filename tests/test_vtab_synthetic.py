"""The synthetic VTAB-like task generators: the split contract, determinism and label semantics."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import vtab_synthetic as vs

NAMES = sorted(vs.TASKS)
SPLITS = ("train", "val", "test")


def _check_split(images: torch.Tensor, labels: torch.Tensor, n: int, size: int,
                 classes: int) -> None:
    assert images.shape == (n, 3, size, size)
    assert labels.shape == (n,)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert images.is_contiguous() and labels.is_contiguous()
    if n:
        assert 0 <= int(labels.min()) and int(labels.max()) < classes
        counts = torch.bincount(labels, minlength=classes)
        assert int(counts.max() - counts.min()) <= 1, counts.tolist()


def test_task_table() -> None:
    assert set(NAMES) == {"digits", "location", "orientation", "count", "texture"}
    expected = {"digits": (10, "natural"), "location": (16, "structured"),
                "orientation": (16, "structured"), "count": (8, "structured"),
                "texture": (8, "specialized")}
    for name, (fn, classes, group, description) in vs.TASKS.items():
        assert callable(fn) and (classes, group) == expected[name]
        assert isinstance(description, str) and description


@pytest.mark.parametrize("name", NAMES)
def test_contract_and_determinism(name: str) -> None:
    fn, classes, _, _ = vs.TASKS[name]
    size, counts = 28, (2 * classes + 3, 8, 12)
    out = fn(size, *counts, seed=0)
    assert list(out) == list(SPLITS)
    for split, n in zip(SPLITS, counts, strict=True):
        _check_split(*out[split], n, size, classes)
    train_x, train_y = out["train"]
    assert set(train_y.tolist()) == set(range(classes))
    assert train_x.float().std() > 5  # not blank
    assert not torch.equal(train_x[0], train_x[1])

    again = fn(size, *counts, seed=0)
    other = fn(size, *counts, seed=1)
    more_test = fn(size, counts[0], counts[1], counts[2] + 7, seed=0)
    for split in SPLITS:
        assert torch.equal(out[split][0], again[split][0])
        assert torch.equal(out[split][1], again[split][1])
        assert not torch.equal(out[split][0], other[split][0])
    for split in ("train", "val"):
        assert torch.equal(out[split][0], more_test[split][0])
        assert torch.equal(out[split][1], more_test[split][1])
    assert more_test["test"][0].shape[0] == counts[2] + 7


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5)
@given(size=st.integers(24, 40), counts=st.tuples(*[st.integers(0, 20)] * 3),
       seed=st.integers(0, 2**32 - 1))
def test_counts_and_balance(name: str, size: int, counts: tuple[int, int, int], seed: int) -> None:
    fn, classes, _, _ = vs.TASKS[name]
    out = fn(size, *counts, seed=seed)
    for split, n in zip(SPLITS, counts, strict=True):
        _check_split(*out[split], n, size, classes)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        vs.location(8, 1, 1, 1)
    with pytest.raises(ValueError):
        vs.count(28, -1, 1, 1)


def test_digits_source_pools_are_disjoint() -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, val, test = vs.digits_source_split(0)
    assert len(train) == 480 and len(val) == 120 and len(train) + len(val) + len(test) == 1797
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    for pool in (train, val, test):
        assert set(target[pool]) == set(range(10))
    again = vs.digits_source_split(0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(train, vs.digits_source_split(1)[0])


def _mean_x(image: np.ndarray) -> float:
    """Centre of mass in x (pixel j spans [j, j+1)) of the bright sprite on a dark background."""
    grey = image.astype(np.float64).mean(axis=0)
    weight = np.clip(grey - np.median(grey) - 12, 0, None)
    return float((weight.sum(axis=0) * (np.arange(grey.shape[1]) + 0.5)).sum() / weight.sum())


def test_location_label_is_the_x_bin_of_the_sprite() -> None:
    size = 112
    images, labels = vs.location(size, 48, 0, 0, seed=5)["train"]
    edges = vs.location_bin_edges(size)
    assert len(edges) == 17 and edges[0] > 0 and edges[-1] < size
    bins = [int(np.clip(np.searchsorted(edges, _mean_x(x), side="right") - 1, 0, 15))
            for x in images.numpy()]
    diff = np.abs(np.array(bins) - labels.numpy())
    assert diff.max() <= 1, diff
    assert (diff == 0).mean() >= 0.9


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean mask (label propagation)."""
    big = mask.size + 1
    lab = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        padded = np.pad(lab, 1, constant_values=big)
        nbr = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                 padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, nbr, big)
        if np.array_equal(new, lab):
            return len(np.unique(lab[mask]))
        lab = new


def test_count_label_is_the_number_of_objects() -> None:
    images, labels = vs.count(112, 16, 0, 0, seed=2)["train"]
    assert set(labels.tolist()) == set(range(8))
    for x, y in zip(images.numpy().astype(np.int16), labels.tolist(), strict=True):
        chroma = x.max(axis=0) - x.min(axis=0)  # the background is grey, objects are saturated
        assert _components(chroma > 30) == y + 3


def test_count_fits_ten_objects_at_small_sizes() -> None:
    _, labels = vs.count(24, 16, 0, 0, seed=0)["train"]
    assert (labels == 7).sum() == 2


@pytest.mark.parametrize("size", [28, 112])
def test_texture_band_and_orientation_are_visible_in_the_spectrum(size: int) -> None:
    images, labels = vs.texture(size, 48, 0, 0, seed=3)["train"]
    x = images.numpy().astype(np.float64)
    x -= x.mean(axis=(2, 3), keepdims=True)
    power = (np.abs(np.fft.fft2(x)) ** 2).sum(axis=1)
    freq = np.fft.fftfreq(size) * size
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    radius, phi = np.hypot(fx, fy), np.arctan2(-fy, fx)
    mean_radius = (power * radius).sum(axis=(1, 2)) / power.sum(axis=(1, 2))
    high = mean_radius > np.sqrt(np.prod(vs._TEX_BANDS)) * size / 2
    wave = np.angle((power * np.exp(2j * phi)).sum(axis=(1, 2))) / 2  # dominant wave-vector angle
    stripes = np.rint(np.degrees((wave - np.pi / 2) % np.pi) / 45).astype(int) % 4
    y = labels.numpy()
    assert (high == (y // 4 == 1)).mean() >= 0.95
    assert (stripes == y % 4).mean() >= 0.9
