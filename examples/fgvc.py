"""FGVC (five fine-grained datasets) with TR-PTS: the paper's protocol, for users who have the
data and a GPU.

Data layout (VPT's json splits; nothing is downloaded):

    <data-root>/<dataset>/train.json, val.json, test.json    {"relative/image/path.jpg": label, ...}
    <data-root>/<dataset>/<image dir>/...                      image dir per dataset: see DATASETS

Labels may be any integers (CUB's are 1-based); they are mapped to 0..C-1 in sorted order,
from the union of the three files. Tuning: ``--split val`` trains on train and reports val.
Final: ``--split test`` (default) trains on train + val and reports test. Training images:
resize to 256x256, random 224 crop, horizontal flip; evaluation: resize 256, center crop 224
(VPT's transforms), normalized with the checkpoint's mean/std. Per-dataset settings:
docs/reproduce.md. A harness to reproduce the paper's Table 3, not a claim of its numbers.

    python examples/fgvc.py --data-root /data/fgvc --dataset CUB_200_2011
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol

# dataset folder -> (classes, folder the json paths are relative to)
DATASETS: dict[str, tuple[int, str]] = {
    "CUB_200_2011": (200, "images"), "nabirds": (555, "images"), "OxfordFlower": (102, ""),
    "Stanford-dogs": (120, "Images"), "Stanford-cars": (196, ""),
}


def read_json(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected VPT's FGVC json splits (see --help)")
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args, names = protocol.parse(__doc__, list(DATASETS), ["val", "test"], argv, lr=1e-3, batch_size=32)
    results = []
    for name in names:
        classes, image_dir = DATASETS[name]
        root = args.data_root / name
        splits = {s: read_json(root / f"{s}.json") for s in ("train", "val", "test")}
        ids = sorted({v for split in splits.values() for v in split.values()})
        if len(ids) > classes:
            raise ValueError(f"{name}: {len(ids)} distinct labels in the json files, expected at most {classes}")
        to_class = {v: i for i, v in enumerate(ids)}
        model = protocol.build_model(args, classes)
        norm = protocol.normalization(model)
        resize = int(args.img_size * 256 / 224)
        train_tf = transforms.Compose([transforms.Resize((resize, resize)), transforms.RandomCrop(args.img_size),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
        eval_tf = transforms.Compose([transforms.Resize((resize, resize)), transforms.CenterCrop(args.img_size),
                                      transforms.ToTensor(), norm])
        train_names = ["train"] if args.split == "val" else ["train", "val"]
        train_items = [(str(Path(image_dir) / k), to_class[v]) for s in train_names for k, v in splits[s].items()]
        eval_items = [(str(Path(image_dir) / k), to_class[v]) for k, v in splits[args.split].items()]
        results.append(protocol.run(args, name, model, protocol.ImageList(root, train_items, train_tf),
                                    protocol.ImageList(root, eval_items, eval_tf), args.split))
    return results


if __name__ == "__main__":
    main()
