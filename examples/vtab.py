"""VTAB-1k with TR-PTS: the paper's protocol, for users who have the data and a GPU.

Data layout (the public VTAB-1k release used by NOAH, SPT and GPS; nothing is downloaded):

    <data-root>/<dataset>/train800.txt, val200.txt, train800val200.txt, test.txt
    <data-root>/<dataset>/images/...        lines of the .txt files: "images/xxx.jpg <label>"

Tuning: ``--split val`` trains on train800 and reports val200. Final: ``--split test`` (default)
trains on train800val200 and reports test. Images are resized to 224x224 (bicubic), no
augmentation, normalized with the checkpoint's mean/std. Per-dataset settings and how to read
the results: docs/reproduce.md. This is a harness to reproduce the paper's Table 2, not a
claim of its numbers.

    python examples/vtab.py --data-root /data/vtab-1k --dataset dsprites_loc [--dataset all]
"""

from __future__ import annotations

import sys
from pathlib import Path

from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

# dataset folder -> (classes, group)
DATASETS: dict[str, tuple[int, str]] = {
    "cifar": (100, "natural"), "caltech101": (102, "natural"), "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"), "oxford_iiit_pet": (37, "natural"), "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"), "eurosat": (10, "specialized"), "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"), "clevr_dist": (6, "structured"), "dmlab": (6, "structured"),
    "kitti": (4, "structured"), "dsprites_loc": (16, "structured"), "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"), "smallnorb_ele": (9, "structured"),
}
SPLITS = {"val": ("train800.txt", "val200.txt"), "test": ("train800val200.txt", "test.txt")}


def read_list(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """``"relative/path label"`` lines -> pairs; labels checked against the class count."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the VTAB-1k split files (see --help)")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel, label = line.rsplit(maxsplit=1)
        if not 0 <= int(label) < num_classes:
            raise ValueError(f"{path}:{n}: label {label} outside 0..{num_classes - 1}")
        items.append((rel, int(label)))
    return items


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args, names = protocol.parse(__doc__, list(DATASETS), list(SPLITS), argv, lr=1e-3, batch_size=32)
    results = []
    for name in names:
        classes, _ = DATASETS[name]
        model = protocol.build_model(args, classes)
        tf = transforms.Compose([
            transforms.Resize((args.img_size, args.img_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), protocol.normalization(model)])
        root = args.data_root / name
        train_file, eval_file = SPLITS[args.split]
        train_set = protocol.ImageList(root, read_list(root / train_file, classes), tf)
        eval_set = protocol.ImageList(root, read_list(root / eval_file, classes), tf)
        results.append(protocol.run(args, name, model, train_set, eval_set, eval_file.removesuffix(".txt")))
    return results


if __name__ == "__main__":
    main()
