"""Tasks of the VTAB-1k-style benchmark (``benchmarks/vtab_mini.py``): real images from an
ImageFolder tree or tarball (CIFAR-10 by default) and the procedural tasks of
``vtab_synthetic``, each as uint8 tensors at the model's resolution, cached on disk.

A task is ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with ``x`` uint8
``[N, 3, S, S]`` and ``y`` int64 ``[N]``. Splits are fixed by ``split_seed`` (as VTAB-1k's
are): the training seeds of the benchmark change the head's initialisation and the data order,
not the images. Real-image splits are class-balanced: train and validation come from the
source's training images, the test set from its test images (or from a disjoint part of a
single folder).
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trpts._utils import atomic_write

Split = tuple[torch.Tensor, torch.Tensor]
Task = dict[str, Split]
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRPTS_SHARED", REPO.parent / "shared"))
DEFAULT_DATA = SHARED / "data" / "cifar10-jpeg.tar.gz"
CACHE_VERSION = "vtab-mini-data-v1"  # bump when rendering or splitting changes
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class TaskInfo:
    """What the benchmark needs to know of a task before loading it."""

    name: str
    group: str  # VTAB group: natural / specialized / structured
    classes: int
    description: str


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trpts/vtab_mini`` (default ``~/.cache/trpts/vtab_mini``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trpts" / "vtab_mini"


def image_source_name(data: Path) -> str:
    """Task name of an ImageFolder directory or tarball: ``cifar10`` for CIFAR-10's tarball."""
    name = data.name.split(".")[0]
    return "cifar10" if name.startswith("cifar10") else name


def task_infos(data: Path | None) -> dict[str, TaskInfo]:
    """Every task the benchmark can run: the real-image one (when ``data`` exists) first."""
    infos = {}
    if data is not None and data.exists():
        classes = len(_folder_index(data)[0])
        name = image_source_name(data)
        infos[name] = TaskInfo(name, "natural", classes, f"{data.name}: real images, {classes} classes")
    import vtab_synthetic  # imported when needed: a real-image run never reads it

    for name, (_, classes, group, description) in vtab_synthetic.TASKS.items():
        infos[name] = TaskInfo(name, group, classes, description)
    return infos


def load_task(name: str, *, data: Path | None, size: int, sizes: tuple[int, int, int], split_seed: int = 0,
              cache_dir: Path | None = None) -> Task:
    """The task's three splits at ``size`` px (``sizes`` = train, val, test counts), from the
    cache when it holds them (keyed by everything that changes the pixels), else built and
    cached atomically."""
    real = data is not None and name == image_source_name(data)
    source = _source_key(data) if real else "synthetic"
    key = hashlib.sha256(f"{CACHE_VERSION}|{name}|{size}|{sizes}|{split_seed}|{source}".encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{size}px-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    if real:
        assert data is not None
        task = _image_folder_task(data, size, sizes, split_seed)
    else:
        import vtab_synthetic

        task = vtab_synthetic.TASKS[name][0](size, *sizes, seed=split_seed)
    atomic_write(path, lambda tmp: torch.save(task, tmp))
    return task


def _source_key(data: Path) -> str:
    stat = data.stat()
    return f"{data.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"


def _folder_index(data: Path) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """Class names and ``{split: {class: sorted member paths}}`` of a tarball or directory;
    split is ``train`` / ``test`` when the tree has them, else ``all``."""
    if data.is_dir():
        paths = [p.relative_to(data).as_posix() for p in data.rglob("*") if p.suffix.lower() in SUFFIXES]
    else:
        with tarfile.open(data) as tar:
            paths = [m.name for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(SUFFIXES)]
    index: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        parts = path.split("/")
        if len(parts) >= 3 and parts[-3] in ("train", "test"):
            index[parts[-3]][parts[-2]].append(path)
        elif len(parts) >= 2:
            index["all"][parts[-2]].append(path)
    if "train" in index and "test" in index:
        index.pop("all", None)
    classes = sorted({c for split in index.values() for c in split})
    if len(classes) < 2:
        raise ValueError(f"{data}: expected an ImageFolder tree (<split>/<class>/<image> or <class>/<image>) "
                         "with at least 2 classes")
    return classes, {s: {c: sorted(v) for c, v in split.items()} for s, split in index.items()}


def _balanced(paths: dict[str, list[str]], classes: list[str], n: int, rng: np.random.Generator,
              exclude: set[str] = frozenset()) -> list[tuple[str, int]]:  # type: ignore[assignment]
    """``n`` (path, label) pairs, as equal per class as possible, drawn without replacement."""
    out: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        want = n // len(classes) + (label < n % len(classes))
        pool = [p for p in paths.get(cls, []) if p not in exclude]
        if len(pool) < want:
            raise ValueError(f"class {cls!r} has {len(pool)} images left, {want} needed")
        out += [(pool[i], label) for i in sorted(rng.choice(len(pool), want, replace=False))]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _image_folder_task(data: Path, size: int, sizes: tuple[int, int, int], split_seed: int) -> Task:
    classes, index = _folder_index(data)
    rng = np.random.default_rng(split_seed)
    n_train, n_val, n_test = sizes
    fit_pool, test_pool = (index["train"], index["test"]) if "train" in index else (index["all"], index["all"])
    test = _balanced(test_pool, classes, n_test, rng)
    train = _balanced(fit_pool, classes, n_train, rng, exclude={p for p, _ in test})
    val = _balanced(fit_pool, classes, n_val, rng, exclude={p for p, _ in test + train})
    chosen = {"train": train, "val": val, "test": test}
    images = _read(data, {p for items in chosen.values() for p, _ in items}, size)
    return {split: (torch.stack([images[p] for p, _ in items]) if items else torch.empty(0, 3, size, size,
                                                                                         dtype=torch.uint8),
                    torch.tensor([y for _, y in items], dtype=torch.int64))
            for split, items in chosen.items()}


def _read(data: Path, wanted: set[str], size: int) -> dict[str, torch.Tensor]:
    """Decode and resize (bicubic) the wanted images to uint8 ``[3, size, size]``."""
    def convert(raw: bytes | Path) -> torch.Tensor:
        with Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw) as img:
            img = img.convert("RGB").resize((size, size), Image.BICUBIC)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()

    if data.is_dir():
        return {p: convert(data / p) for p in wanted}
    out = {}
    with tarfile.open(data) as tar:
        for member in tar:
            if member.name in wanted:
                fh = tar.extractfile(member)
                assert fh is not None
                out[member.name] = convert(fh.read())
    return out


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, normalize: Callable[[torch.Tensor], torch.Tensor],
            generator: torch.Generator | None = None):
    """Float batches ``(normalize(x / 255), y)``; shuffled when a generator is given."""
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield normalize(x[idx].float().div_(255)), y[idx]
