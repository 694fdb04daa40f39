"""Deterministic, offline stand-ins for VTAB-1k tasks: small image-classification problems.

VTAB-1k fine-tunes a pretrained backbone on 1,000 labelled images per task, across three groups:
*natural* photos, *specialized* (remote sensing, medical) images and *structured* scenes whose
label is a geometric property (position, orientation, count). Every generator here returns
``{"train", "val", "test"}`` splits of uint8 RGB images ``[N, 3, S, S]`` and int64 labels ``[N]``,
bit-identical for the same arguments, with no downloads and no global random state.

- ``digits`` (natural, 10 classes): real handwritten digits (scikit-learn's bundled 8x8
  ``load_digits``) upscaled, pasted at a random place with random colours and light noise. Like
  SVHN/natural images, the label is the identity of a real-world object under nuisance variation;
  the test split uses source digits never seen in train/val (new writers' strokes, not new crops).
- ``location`` (structured, 16 classes): one white-ish sprite (square, ellipse or heart, random
  scale and rotation) on a dark background; label = x-position bin of its centre (dSprites/location).
- ``orientation`` (structured, 16 classes): one sprite without rotational symmetry (arrow, 'L',
  narrow isosceles triangle) at a random place and scale; label = rotation-angle bin
  (dSprites/orientation).
- ``count`` (structured, 8 classes): 3..10 non-overlapping coloured circles, squares and
  triangles on a grey, softly shaded background; label = number of objects - 3 (Clevr/count).
- ``texture`` (specialized, 8 classes): band-pass random fields (random phase) mapped between two
  random colours; label = frequency band (low/high) x dominant stripe orientation (0/45/90/135
  deg). Like remote-sensing or pathology tiles, classes differ in local texture statistics, not
  in any object's shape, and a linear model on raw pixels cannot see them (the phase is random).

Randomness: each split draws from its own ``numpy.random.Generator(PCG64)`` stream derived from
``(seed, task, split)``, so changing ``n_test`` leaves the train and val images unchanged.
Labels cycle through the classes and are then shuffled, so class counts differ by at most one.
Shapes are rasterised at 4x with PIL and box-downsampled (anti-aliased).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

Split = tuple[torch.Tensor, torch.Tensor]
_Render = Callable[[int, np.ndarray, np.random.Generator], np.ndarray]

_SPLITS = ("train", "val", "test")
_TASK_KEYS = {"digits": 1, "location": 2, "orientation": 3, "count": 4, "texture": 5}
_SS = 4  # supersampling factor for polygon rasterisation
_CHUNK = 128  # images rendered per float32 batch

# digits: per-class source digits in the train / val pools (the rest, ~1,197, is the test pool)
_DIGITS_TRAIN_PER_CLASS = 48
_DIGITS_VAL_PER_CLASS = 12

# location: sprite side as a fraction of the canvas; centres lie in [margin, size - margin]
_LOC_SCALE = (0.10, 0.20)
_LOC_BINS = 16


# ----------------------------------------------------------------------------- shared helpers


def _rng(seed: int, task: str, split: int) -> np.random.Generator:
    """An independent stream for one (seed, task, split)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _TASK_KEYS[task], split])))


def _balanced_labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels cycling through ``classes`` then shuffled: counts differ by at most one."""
    return rng.permutation(np.arange(n, dtype=np.int64) % classes)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Cheap zero-mean uniform noise with the given standard deviation (float32)."""
    raw = np.frombuffer(rng.bytes(math.prod(shape)), np.int8).reshape(shape)
    noise = raw.astype(np.float32)
    noise += np.float32(0.5)
    noise *= np.float32(std / math.sqrt((256**2 - 1) / 12))
    return noise


def _make(task: str, render: _Render, classes: int, size: int, counts: Sequence[int],
          seed: int) -> dict[str, Split]:
    """Build the three splits of ``task``; ``render(size, labels, rng)`` -> float [N, S, S, 3].

    ``render`` is called on chunks of at most ``_CHUNK`` labels to keep the float arrays small.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if any(n < 0 for n in counts):
        raise ValueError(f"split sizes must be >= 0, got {tuple(counts)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out: dict[str, Split] = {}
    for index, (name, n) in enumerate(zip(_SPLITS, counts, strict=True)):
        rng = _rng(seed, task, index)
        labels = _balanced_labels(n, classes, rng)
        images = np.empty((n, 3, size, size), np.uint8)
        for lo in range(0, n, _CHUNK):
            chunk = render(size, labels[lo:lo + _CHUNK], rng)
            chunk *= np.float32(255)
            chunk += np.float32(0.5)
            np.clip(chunk, 0, 255, out=chunk)
            images[lo:lo + _CHUNK] = chunk.astype(np.uint8).transpose(0, 3, 1, 2)
        out[name] = (torch.from_numpy(images), torch.from_numpy(labels))
    return out


def _normalise(poly: np.ndarray) -> np.ndarray:
    """Centre a polygon on its area centroid and scale it so that max(|x|, |y|) == 1."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    centroid = np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)
    poly = poly - centroid
    return poly / np.abs(poly).max()


def _ring(k: int, ry: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.linspace(0, 2 * np.pi, k, endpoint=False)
    return np.stack([np.cos(t), ry * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y], axis=1)


# Shapes in math coordinates (y up), centred on their centroid, max(|x|, |y|) == 1.
_SHAPES: dict[str, np.ndarray] = {
    name: _normalise(np.asarray(poly, dtype=np.float64)) for name, poly in {
        "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
        "ellipse": _ring(64, ry=0.55),
        "heart": _heart(),
        "circle": _ring(48),
        "triangle": _ring(3, phase=np.pi / 2),
        # orientation shapes all "point" along +x at angle 0; none is symmetric under rotation
        "arrow": [(-1, -0.18), (0.25, -0.18), (0.25, -0.55), (1, 0), (0.25, 0.55), (0.25, 0.18),
                  (-1, 0.18)],
        "ell": [(-0.55, 1), (-0.55, -1), (0.6, -1), (0.6, -0.55), (-0.1, -0.55), (-0.1, 1)],
        "wedge": [(-0.8, -0.4), (1, 0), (-0.8, 0.4)],
    }.items()
}
_RADIUS = {name: float(np.hypot(p[:, 0], p[:, 1]).max()) for name, p in _SHAPES.items()}
_LOC_SHAPES = ("square", "ellipse", "heart")
_ORI_SHAPES = ("arrow", "ell", "wedge")
_COUNT_SHAPES = ("circle", "square", "triangle")


def _place(shape: str, unit: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """Shape vertices in pixel coordinates (pixel j spans [j, j+1), y down), rotated CCW."""
    p = _SHAPES[shape]
    c, s = math.cos(angle), math.sin(angle)
    x = cx + unit * (c * p[:, 0] - s * p[:, 1])
    y = cy - unit * (s * p[:, 0] + c * p[:, 1])
    return np.stack([x, y], axis=1)


def _paint(cover: np.ndarray, poly: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    """Add the anti-aliased coverage of ``poly`` (pixel coordinates) to ``cover`` [S, S] in place.

    Rasterises only the polygon's bounding box, at ``_SS``x, then box-downsamples it. Returns the
    patch and where it went, so that a caller can paint colour with the same coverage.
    """
    size = cover.shape[0]
    x0, y0 = np.clip(np.floor(poly.min(axis=0)).astype(int), 0, size)
    x1, y1 = np.clip(np.ceil(poly.max(axis=0)).astype(int), 0, size)
    w, h = int(x1 - x0), int(y1 - y0)
    rows, cols = slice(y0, y1), slice(x0, x1)
    if w == 0 or h == 0:
        return rows, cols, np.zeros((h, w), np.float32)
    hi = Image.new("L", (w * _SS, h * _SS), 0)
    xy = ((poly - [x0, y0]) * _SS - 0.5).ravel().tolist()  # PIL puts pixel centres on integers
    ImageDraw.Draw(hi).polygon(xy, fill=255)
    patch = np.asarray(hi.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
    cover[rows, cols] += patch
    return rows, cols, patch


def _sprite_on_dark(cover: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Compose coverage masks [N, S, S] as white-ish sprites on dark backgrounds, light noise."""
    n = len(cover)
    bg = rng.uniform(0.0, 0.15, (n, 1, 1, 1)).astype(np.float32)
    fg = rng.uniform(0.8, 1.0, (n, 1, 1, 1)) + rng.uniform(-0.05, 0.05, (n, 1, 1, 3))
    out = _noise(rng, (*cover.shape, 3), 0.015)
    out += bg
    out += (fg.astype(np.float32) - bg) * cover[..., None]
    return out


# ----------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def digits_source_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into ``load_digits()`` of the train, val and test source pools (disjoint, sorted).

    Stratified: 48 train and 12 val source digits per class; the remaining ~1,197 are the test pool.
    """
    _, target = _digits_source()
    rng = _rng(seed, "digits", 3)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(target == c))
        a, b = _DIGITS_TRAIN_PER_CLASS, _DIGITS_TRAIN_PER_CLASS + _DIGITS_VAL_PER_CLASS
        parts[0].append(idx[:a])
        parts[1].append(idx[a:b])
        parts[2].append(idx[b:])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def _digit_images(size: int, labels: np.ndarray, pool: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    images8, target = _digits_source()
    n = len(labels)
    # source digit per image: cycle through a shuffled per-class pool (even reuse)
    source = np.empty(n, np.int64)
    for c in range(10):
        where = np.flatnonzero(labels == c)
        if not len(where):
            continue
        pool_c = pool[target[pool] == c]
        reps = -(-len(where) // len(pool_c))
        source[where] = np.concatenate([rng.permutation(pool_c) for _ in range(reps)])[:len(where)]
    sides = np.rint(rng.uniform(0.45, 0.65, n) * size).astype(int)
    corner = rng.uniform(0, 1, (n, 2))
    ink = np.zeros((n, size, size), np.float32)
    bicubic = Image.Resampling.BICUBIC
    for i in range(n):
        d = int(sides[i])
        glyph = Image.fromarray(images8[source[i]]).resize((d, d), bicubic)
        x0, y0 = (np.floor(corner[i] * (size - d + 1))).astype(int)
        ink[i, y0:y0 + d, x0:x0 + d] = np.clip(np.asarray(glyph), 0.0, 1.0)
    # colours: resample pairs until the luminance contrast is at least 0.35
    luma = np.array([0.299, 0.587, 0.114])
    fg, bg = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    bad = np.abs((fg - bg) @ luma) < 0.35
    while bad.any():
        fg[bad], bg[bad] = rng.uniform(0, 1, (bad.sum(), 3)), rng.uniform(0, 1, (bad.sum(), 3))
        bad = np.abs((fg - bg) @ luma) < 0.35
    fg, bg = fg[:, None, None, :].astype(np.float32), bg[:, None, None, :].astype(np.float32)
    out = _noise(rng, (*ink.shape, 3), 0.03)
    out += bg
    out += (fg - bg) * ink[..., None]
    return out


def digits(size: int, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Split]:
    """Real handwritten digits, randomly scaled, placed and coloured (10 classes, natural)."""
    pools = dict(zip(_SPLITS, digits_source_split(seed), strict=True))
    counts = (n_train, n_val, n_test)
    out: dict[str, Split] = {}
    for index, name in enumerate(_SPLITS):  # render each split from its own source pool
        def render(s: int, labels: np.ndarray, rng: np.random.Generator,
                   pool: np.ndarray = pools[name]) -> np.ndarray:
            return _digit_images(s, labels, pool, rng)

        one = [0, 0, 0]
        one[index] = counts[index]
        out[name] = _make("digits", render, 10, size, one, seed)[name]
    return out


# ----------------------------------------------------------------------------- location


def location_bin_edges(size: int) -> np.ndarray:
    """The 17 x-coordinate edges (pixels, pixel j spans [j, j+1)) of ``location``'s 16 bins."""
    margin = _LOC_SCALE[1] * size / 2 * max(_RADIUS[s] for s in _LOC_SHAPES)
    return np.linspace(margin, size - margin, _LOC_BINS + 1)


def _location_images(size: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    edges = location_bin_edges(size)
    cx = edges[labels] + rng.uniform(0, 1, n) * (edges[1] - edges[0])
    cy = rng.uniform(edges[0], edges[-1], n)
    units = rng.uniform(*_LOC_SCALE, n) * size / 2
    angles = rng.uniform(0, 2 * np.pi, n)
    shapes = rng.integers(0, len(_LOC_SHAPES), n)
    cover = np.zeros((n, size, size), np.float32)
    for i in range(n):
        _paint(cover[i], _place(_LOC_SHAPES[shapes[i]], units[i], angles[i], cx[i], cy[i]))
    return _sprite_on_dark(cover, rng)


def location(size: int, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Split]:
    """One sprite on a dark background; label = x-bin of its centre (16 classes, structured)."""
    return _make("location", _location_images, _LOC_BINS, size, (n_train, n_val, n_test), seed)


# ----------------------------------------------------------------------------- orientation


def _orientation_images(size: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    angles = (labels + rng.uniform(0, 1, n)) * (2 * np.pi / 16)
    units = rng.uniform(0.35, 0.55, n) * size / 2
    shapes = rng.integers(0, len(_ORI_SHAPES), n)
    pos = rng.uniform(0, 1, (n, 2))
    cover = np.zeros((n, size, size), np.float32)
    for i in range(n):
        shape = _ORI_SHAPES[shapes[i]]
        r = units[i] * _RADIUS[shape] + 0.5
        cx, cy = r + pos[i] * (size - 2 * r)
        _paint(cover[i], _place(shape, units[i], angles[i], cx, cy))
    return _sprite_on_dark(cover, rng)


def orientation(size: int, n_train: int, n_val: int, n_test: int,
                seed: int = 0) -> dict[str, Split]:
    """One asymmetric sprite; label = bin of its CCW rotation angle (16 classes, structured)."""
    return _make("orientation", _orientation_images, 16, size, (n_train, n_val, n_test), seed)


# ----------------------------------------------------------------------------- count


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _scatter(n: int, radii: np.ndarray, size: int, gap: float,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres of ``n`` discs that keep ``gap`` pixels apart; shrinks the discs if it gets stuck."""
    for _ in range(12):
        centres: list[np.ndarray] = []
        for k in range(n):
            cand = rng.uniform(radii[k], size - radii[k], (64, 2))
            if centres:
                placed = np.array(centres)
                dist = np.hypot(*(cand[:, None, :] - placed[None, :, :]).transpose(2, 0, 1))
                ok = (dist >= radii[k] + radii[:k][None, :] + gap).all(axis=1)
                if not ok.any():
                    break
                cand = cand[ok]
            centres.append(cand[0])
        if len(centres) == n:
            return np.array(centres), radii
        radii = radii * 0.85
    # fallback (not reached in practice): a regular grid always fits
    side = math.ceil(math.sqrt(n))
    cell = size / side
    radii = np.minimum(radii, (cell - gap) / 2)
    grid = (np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1] + 0.5) * cell
    return grid, radii


def _count_images(size: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    cover = np.zeros((n, size, size), np.float32)
    colour = np.zeros((n, size, size, 3), np.float32)  # premultiplied by coverage
    gap = max(0.03 * size, 1.5)
    for i in range(n):
        m = int(labels[i]) + 3
        centres, radii = _scatter(m, rng.uniform(0.055, 0.09, m) * size, size, gap, rng)
        shapes = rng.integers(0, len(_COUNT_SHAPES), m)
        angles = rng.uniform(0, 2 * np.pi, m)
        rgb = _hsv_to_rgb(rng.uniform(0, 1, m), rng.uniform(0.55, 1, m), rng.uniform(0.55, 1, m))
        for k in range(m):
            shape = _COUNT_SHAPES[shapes[k]]
            poly = _place(shape, radii[k] / _RADIUS[shape], angles[k], *centres[k])
            rows, cols, patch = _paint(cover[i], poly)  # objects never share a pixel
            colour[i, rows, cols] += patch[..., None] * rgb[k].astype(np.float32)
    # background: mid grey with a linear gradient in a random direction and a vignette
    yy, xx = ((np.mgrid[0:size, 0:size] + 0.5) / size - 0.5).astype(np.float32)
    grey, slope = rng.uniform(0.4, 0.6, (n, 1, 1)), rng.uniform(0.0, 0.15, (n, 1, 1))
    direction, vignette = rng.uniform(0, 2 * np.pi, (n, 1, 1)), rng.uniform(0.0, 0.4, (n, 1, 1))
    bg = grey + slope * (np.cos(direction) * xx + np.sin(direction) * yy) - vignette * (xx**2 + yy**2)
    colour += (bg.astype(np.float32) * (1 - cover))[..., None]
    colour += _noise(rng, colour.shape, 0.01)
    return colour


def count(size: int, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Split]:
    """3..10 non-overlapping coloured objects; label = count - 3 (8 classes, structured)."""
    return _make("count", _count_images, 8, size, (n_train, n_val, n_test), seed)


# ----------------------------------------------------------------------------- texture

# band centres as a fraction of the Nyquist frequency (size / 2 cycles per image)
_TEX_BANDS = (0.25, 0.7)
_TEX_LOG_WIDTH = 0.2  # radial std of log frequency
_TEX_ANGLE_WIDTH = np.deg2rad(12.0)  # angular std of the spectral wedge


def _texture_images(size: int, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    fy, fx = np.meshgrid(np.fft.fftfreq(size) * size, np.fft.rfftfreq(size) * size, indexing="ij")
    radius = np.hypot(fx, fy)  # cycles per image
    phi = np.arctan2(-fy, fx)  # wave-vector angle, CCW with the image's y axis pointing down
    log_r = np.log(np.where(radius > 0, radius, 1.0))
    centre = np.array(_TEX_BANDS)[labels // 4] * (size / 2) * np.exp(rng.uniform(-0.1, 0.1, n))
    # stripes at angle a have their wave vector at a + 90 deg
    theta = np.deg2rad((labels % 4) * 45.0 + 90.0 + rng.uniform(-5, 5, n))
    contrast = rng.uniform(0.6, 1.5, (n, 1, 1))
    a, b = rng.uniform(0, 1, (n, 3)), rng.uniform(0, 1, (n, 3))
    bad = np.linalg.norm(a - b, axis=1) < 0.4
    while bad.any():
        a[bad], b[bad] = rng.uniform(0, 1, (bad.sum(), 3)), rng.uniform(0, 1, (bad.sum(), 3))
        bad = np.linalg.norm(a - b, axis=1) < 0.4
    radial = np.exp(-((log_r - np.log(centre)[:, None, None]) ** 2) / (2 * _TEX_LOG_WIDTH**2))
    dphi = (phi - theta[:, None, None] + np.pi / 2) % np.pi - np.pi / 2
    spectrum = (radial * np.exp(-(dphi**2) / (2 * _TEX_ANGLE_WIDTH**2)) * (radius > 0))
    white = rng.random((n, size, size), dtype=np.float32)  # random phase
    field = np.fft.irfft2(np.fft.rfft2(white) * spectrum.astype(np.float32), s=(size, size))
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= field.std(axis=(1, 2), keepdims=True) + 1e-8
    w = (0.5 + 0.5 * np.tanh(contrast * field)).astype(np.float32)[..., None]
    a, b = a.astype(np.float32)[:, None, None, :], b.astype(np.float32)[:, None, None, :]
    out = _noise(rng, (*w.shape[:3], 3), 0.04)
    out += a
    out += (b - a) * w
    return out


def texture(size: int, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, Split]:
    """Oriented band-pass textures; label = band x orientation (8 classes, specialized)."""
    return _make("texture", _texture_images, 8, size, (n_train, n_val, n_test), seed)


# name -> (generator, number of classes, VTAB group, one-line description)
TASKS: dict[str, tuple[Callable[..., dict[str, Split]], int, str, str]] = {
    "digits": (digits, 10, "natural", "handwritten digit identity under scale/position/colour"),
    "location": (location, 16, "structured", "x-position bin of a single sprite (dSprites/loc)"),
    "orientation": (orientation, 16, "structured", "rotation-angle bin of an asymmetric sprite"),
    "count": (count, 8, "structured", "number of objects (3..10) in a cluttered scene"),
    "texture": (texture, 8, "specialized", "frequency band x orientation of a random texture"),
}
