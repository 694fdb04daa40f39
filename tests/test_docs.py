"""Docs that cannot drift: the Python examples in README.md and docs/*.md run on tiny real models,
and docs/api.md documents exactly what `trpts` exports, with the signatures it has.

Which examples run. Every fenced ```python block must say, in one of two ways:

- an HTML comment on the line before the fence: ``<!-- doctest: tiny -->`` (run it) or
  ``<!-- doctest: skip: why -->``; ``<!-- doctest: tiny model=generic -->`` gives the block a
  plain ``nn.Module`` trpts has no adapter for as ``model`` instead of a tiny timm ViT;
- for files whose text this test does not own (README.md, docs/getting-started.md), an entry in
  ``UNMARKED`` below, keyed by the block's first line, with the same spec.

A block without either, or an ``UNMARKED`` entry that matches no block, fails the test.

How they run. The blocks of one file run in order in one namespace, in a temporary working
directory, as a reader would follow them. The namespace starts with ``torch``, ``timm``,
``trpts``, a tiny timm ViT as ``model`` and 3 random batches of ``(x [4, 3, 32, 32], y [4] int64)``
(5 classes) as ``train_loader`` / ``loader``. ``timm.create_model`` is patched: any name, never
pretrained, seeded (so two calls give the same "pretrained" backbone, as real weights would),
with the tiny sizes of ``TINY`` (the block's other arguments, e.g. ``num_classes``, are kept).
A delta file a block loads that no earlier block saved (``load_delta(m, "flowers.safetensors")``)
is made first: one optimizer step of a masked copy of the backbone the block creates.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from torch import nn

import trpts
import trpts.errors

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API_MD = ROOT / "docs" / "api.md"

IMG, NUM_CLASSES = 32, 5
#: Tiny sizes that replace a pretrained ViT's (depth 3: the examples reduce tokens in 3 blocks).
TINY: dict[str, Any] = dict(img_size=IMG, patch_size=8, embed_dim=32, depth=3, num_heads=2)

#: Blocks in files this test does not edit, by (file, start of the first line): their spec.
UNMARKED: dict[tuple[str, str], str] = {
    # "Use it in your own loop": Fisher, allocation, masks, optimizer, the training loop.
    ("README.md", "import timm, torch, trpts"): "tiny",
    # Token selection on the model trained above.
    ("README.md", "trpts.wrap_vit(model, selection"): "tiny",
    # Deltas: saves the model above, loads it and a prepared "flowers" delta, switches.
    ("README.md", "trpts.save_delta(model, "): "tiny",
    # "Your own training loop (timm)": the five additions, then save_delta.
    ("docs/getting-started.md", "import timm, torch, trpts"): "tiny",
    # "Serving many tasks": both deltas prepared on the same (seeded) backbone.
    ("docs/getting-started.md", "backbone = timm.create_model("): "tiny",
    # "Continue training, unload, serve": PEFT verbs, resume from a delta, merge (see REWRITES).
    ("docs/getting-started.md", "handle.print_trainable_parameters()"): "tiny",
}

#: Lines of UNMARKED blocks replaced before running, by (file, start of the first line).
REWRITES: dict[tuple[str, str], list[tuple[str, str]]] = {
    # the optimizer state "if you saved it": no earlier example saves it
    ("docs/getting-started.md", "handle.print_trainable_parameters()"): [
        ('optimizer.load_state_dict(torch.load("stage1-optimizer.pt"))', "pass"),
    ],
}

MARKER = re.compile(r"^\s*<!--\s*doctest:\s*(?P<spec>.*?)\s*-->\s*$")
FENCE = re.compile(r"^\s*```\s*python\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block of a Markdown file."""

    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None  # spec of a ``<!-- doctest: ... -->`` comment right before the fence

    @property
    def first_line(self) -> str:
        return next((s for s in self.code.splitlines() if s.strip()), "")


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of ``path``, each with the doctest marker preceding it, if any."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                i += 1
            prev = next((s for s in reversed(lines[:start]) if s.strip()), "")
            marker = MARKER.match(prev)
            blocks.append(Block(path.relative_to(ROOT).as_posix(), start + 1,
                                "\n".join(lines[start + 1:i]) + "\n",
                                marker["spec"] if marker else None))
        i += 1
    return blocks


def unmarked_key(block: Block, table: dict[tuple[str, str], Any]) -> tuple[str, str] | None:
    """The key of ``table`` (``UNMARKED`` or ``REWRITES``) for an unmarked block, if any."""
    if block.marker is not None:
        return None
    return next((key for key in table
                 if key[0] == block.file and block.first_line.startswith(key[1])), None)


def spec_of(block: Block) -> str | None:
    """The block's spec: its marker, else its ``UNMARKED`` entry, else None."""
    key = unmarked_key(block, UNMARKED)
    return block.marker if key is None else UNMARKED[key]


def runnable_code(block: Block) -> str:
    """The block's code with its ``REWRITES`` applied (each must match)."""
    code = block.code
    key = unmarked_key(block, REWRITES)
    for old, new in REWRITES[key] if key else []:
        assert old in code, f"{block.file}:{block.line}: REWRITES entry {old!r} is stale"
        code = code.replace(old, new)
    return code


ALL_BLOCKS = [block for path in DOC_FILES for block in python_blocks(path)]


def test_every_python_block_says_whether_it_runs() -> None:
    unknown = [f"{b.file}:{b.line}" for b in ALL_BLOCKS if spec_of(b) is None]
    assert not unknown, ("python blocks without '<!-- doctest: tiny -->' / "
                         f"'<!-- doctest: skip: why -->' (or an UNMARKED entry): {unknown}")
    bad = [f"{b.file}:{b.line}: {spec_of(b)!r}" for b in ALL_BLOCKS
           if not re.fullmatch(r"tiny( model=(vit|generic))?|skip: .+", spec_of(b) or "")]
    assert not bad, f"unknown doctest specs: {bad}"
    stale = [key for key in UNMARKED
             if not any(b.file == key[0] and b.marker is None and b.first_line.startswith(key[1])
                        for b in ALL_BLOCKS)]
    assert not stale, f"UNMARKED entries that match no unmarked block: {stale}"


# ---- running the examples ---------------------------------------------------------------------
class PlainNet(nn.Module):
    """A model trpts has no adapter for: linears on the flattened image, head ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(3 * IMG * IMG, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU())
                                    for _ in range(2))
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.flatten(1))
        for layer in self.layers:
            h = h + layer(h)
        return self.fc(h)


def tiny_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, IMG, IMG, generator=g),
             torch.randint(0, NUM_CLASSES, (4,), generator=g)) for _ in range(n)]


def tiny_create_model(real: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``timm.create_model`` for the examples: tiny, never downloads, and every call gets the
    same backbone weights whatever the head (as pretrained weights would give)."""

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        torch.manual_seed(1)
        model = real(name, pretrained=False, **{**TINY, **kwargs})
        torch.manual_seed(0)
        backbone = real(name, pretrained=False, **{**TINY, **kwargs, "num_classes": 0})
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected and all(key.startswith("head") for key in missing), missing
        return model

    return create_model


def make_delta(path: Path, model_name: str) -> None:
    """A delta file for the backbone ``timm.create_model(model_name)`` (the patched one)."""
    model = timm.create_model(model_name, num_classes=NUM_CLASSES)
    fisher = trpts.compute_fisher(model, tiny_batches(), progress=False)
    handle = trpts.apply_masks(model, trpts.allocate_connections(fisher, budget=0.05, model=model))
    optimizer = torch.optim.SGD(handle.param_groups(lr=0.1))
    x, y = tiny_batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    trpts.save_delta(model, path)


def prepare_deltas(block: Block, cwd: Path) -> None:
    """Make the delta files the block loads but nobody has saved, on the backbone it creates."""
    names = re.findall(r"create_model\(\s*[\"']([^\"']+)[\"']", block.code)
    for file in re.findall(r"load_delta\(\s*\w+\s*,\s*[\"']([^\"']+)[\"']", block.code):
        if not (cwd / file).exists():
            assert names, f"{block.file}:{block.line} loads {file} but creates no backbone"
            make_delta(cwd / file, names[0])


def run_blocks(blocks: list[Block], cwd: Path) -> None:
    namespace: dict[str, Any] = {"torch": torch, "timm": timm, "trpts": trpts,
                                 "train_loader": tiny_batches(), "loader": tiny_batches()}
    for block in blocks:
        spec = spec_of(block) or ""
        if "model=generic" in spec:
            namespace["model"] = PlainNet()
        elif "model" not in namespace:
            namespace["model"] = timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES)
        prepare_deltas(block, cwd)
        try:
            exec(compile(runnable_code(block), f"{block.file}:{block.line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the example at {block.file}:{block.line} fails: "
                                 f"{type(error).__name__}: {error}") from error


RUN_FILES = sorted({b.file for b in ALL_BLOCKS if (spec_of(b) or "").startswith("tiny")})


@pytest.mark.parametrize("file", RUN_FILES)
def test_examples_run(file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(timm, "create_model", tiny_create_model(timm.create_model))
    blocks = [b for b in ALL_BLOCKS if b.file == file and (spec_of(b) or "").startswith("tiny")]
    with warnings.catch_warnings():
        # the README's loop uses torch.autocast("cuda"), a no-op with a warning on the CPU
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        # budget=0.005 is below one connection per neuron on the tiny models
        warnings.filterwarnings("ignore", message=r"budget=.* is below what eq\. 4 allows")
        run_blocks(blocks, tmp_path)


# ---- docs/api.md against the package -----------------------------------------------------------
CODE_SPAN = re.compile(r"`([^`]+)`")
CALL = re.compile(r"^(?P<cls>class\s+)?(?P<name>[A-Za-z_][\w.]*)\((?P<args>[^()]*(?:\(\)[^()]*)*)\)")


def api_text() -> str:
    """docs/api.md without its fenced blocks (whose backticks would pair with the prose's)."""
    return re.sub(r"^```.*?^```[ \t]*$", "", API_MD.read_text(encoding="utf-8"),
                  flags=re.MULTILINE | re.DOTALL)


def sections() -> Iterator[tuple[str, list[str]]]:
    """``(heading line, body lines)`` for every ``##`` / ``###`` section of docs/api.md."""
    heading, body = "", []
    for line in api_text().splitlines():
        if re.match(r"#{2,3} ", line):
            yield heading, body
            heading, body = line, []
        else:
            body.append(line)
    yield heading, body


def resolve(dotted: str) -> Any:
    """``trpts.a.b`` or ``a.b`` (relative to trpts) as an object; AttributeError if absent."""
    parts = dotted.removeprefix("trpts.").split(".")
    obj: Any = trpts
    for i, part in enumerate(parts):
        if not hasattr(obj, part) and inspect.ismodule(obj):
            __import__(".".join(["trpts", *parts[:i + 1]]))  # a submodule not imported yet
        obj = getattr(obj, part)
    return obj


def split_args(args: str) -> list[str]:
    """Top-level comma-separated items of a documented argument list."""
    items, depth, current = [], 0, ""
    for char in args:
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [item for item in [*items, current.strip()] if item]


def documented_signature(args: str) -> list[tuple[str, inspect._ParameterKind, str | None]]:
    """``[(name, kind, default source or None)]`` of a documented argument list."""
    result, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for item in split_args(args):
        if item == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
        elif item.startswith("**"):
            result.append((item[2:], inspect.Parameter.VAR_KEYWORD, None))
        elif item.startswith("*"):
            result.append((item[1:], inspect.Parameter.VAR_POSITIONAL, None))
            kind = inspect.Parameter.KEYWORD_ONLY
        else:
            name, _, default = item.partition("=")
            result.append((name.strip(), kind, default.strip() or None))
    return result


def actual_signature(obj: Any) -> list[tuple[str, inspect._ParameterKind, Any]]:
    """``[(name, kind, default)]`` of ``obj``'s signature (positional-only counted as positional)."""
    result = []
    for p in inspect.signature(obj).parameters.values():
        kind = (inspect.Parameter.POSITIONAL_OR_KEYWORD
                if p.kind is inspect.Parameter.POSITIONAL_ONLY else p.kind)
        result.append((p.name, kind, p.default))  # inspect.Parameter.empty: no default
    return result


def same_default(documented: str | None, actual: Any) -> bool:
    if documented is None or actual is inspect.Parameter.empty:
        return documented is None and actual is inspect.Parameter.empty
    try:
        return ast.literal_eval(documented) == actual
    except (ValueError, SyntaxError):
        return documented == repr(actual)


def heading_signatures() -> list[tuple[str, str | None, str]]:
    """``(name, args or None for a class header, base list or "")`` from the api.md headings."""
    found = []
    for heading, _ in sections():
        for span in CODE_SPAN.findall(heading):
            match = CALL.match(span.strip())
            if match and match["cls"]:
                found.append((match["name"], None, match["args"]))
            elif match:
                found.append((match["name"], match["args"], ""))
            elif re.fullmatch(r"class\s+[A-Za-z_]\w*", span.strip()):
                found.append((span.split()[-1], None, ""))
    return found


def test_every_public_name_is_documented() -> None:
    spans = " ".join(CODE_SPAN.findall(api_text()))
    missing = [name for name in trpts.__all__ if not re.search(rf"(?<![\w.]){re.escape(name)}\b"
                                                                 rf"|trpts\.{re.escape(name)}\b", spans)]
    assert not missing, f"in trpts.__all__ but not in docs/api.md: {missing}"


def test_documented_names_exist() -> None:
    text = api_text()
    absent = []
    for dotted in sorted(set(re.findall(r"\btrpts\.[A-Za-z_][\w.]*[A-Za-z_\d]", text))):
        try:
            resolve(dotted)
        except (AttributeError, ImportError):
            absent.append(dotted)
    for name in sorted(set(re.findall(r"\b[A-Z]\w*(?:Error|Warning)\b", text))):
        if not hasattr(trpts.errors, name) and not hasattr(builtins, name):
            absent.append(name)
    for name, _, _ in heading_signatures():
        try:
            resolve(name)
        except AttributeError:
            absent.append(name)
    assert not absent, f"named in docs/api.md but not in trpts: {absent}"


def test_documented_error_bases() -> None:
    wrong = []
    for name, base in re.findall(r"`(\w+(?:Error|Warning))\((\w+)\)`", api_text()):
        cls, parent = getattr(trpts.errors, name), getattr(builtins, base, None)
        if not (isinstance(parent, type) and issubclass(cls, parent)):
            wrong.append(f"{name}({base})")
    assert not wrong, f"docs/api.md gives these errors the wrong base class: {wrong}"
    exported = {n for n in trpts.__all__ if n.endswith(("Error", "Warning"))}
    assert {n for n in dir(trpts.errors) if n.endswith(("Error", "Warning"))
            and getattr(trpts.errors, n).__module__ == "trpts.errors"} == exported


def test_documented_signatures_match() -> None:
    """The argument lists in api.md's headings: names, order, keyword-only and defaults."""
    wrong = []
    for name, args, bases in heading_signatures():
        obj = resolve(name)
        if args is None:  # `class X(Base)`
            for base in filter(None, (b.strip() for b in bases.split(","))):
                if not issubclass(obj, resolve(base)):
                    wrong.append(f"{name} is not a subclass of {base}")
            continue
        documented, actual = documented_signature(args), actual_signature(obj)
        if ([(n, k) for n, k, _ in documented] != [(n, k) for n, k, _ in actual]
                or not all(same_default(d, a) for (_, _, d), (_, _, a) in zip(documented, actual, strict=False))):
            wrong.append(f"{name}({args}) vs the code's {name}{inspect.signature(obj)}")
    assert not wrong, "docs/api.md headings differ from the code:\n" + "\n".join(wrong)


def test_documented_arguments_and_members_exist() -> None:
    """The first column of api.md's tables: arguments of the section's function, members of
    ``Selection`` / ``MaskHandle`` / ``SparseMaskHandle``."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                              **TINY)
    fisher = trpts.compute_fisher(model, tiny_batches(1), progress=False)
    selection = trpts.allocate_connections(fisher, budget=0.05, model=model)
    with trpts.apply_masks(model, selection) as hooks:
        instances = {"Selection": [selection], "MaskHandle": [hooks]}
    with trpts.apply_masks(model, selection, storage="sparse") as sparse:
        instances["MaskHandle"].append(sparse)
    wrong = []
    for heading, body in sections():
        rows = [line for line in body if line.startswith("| `")]
        match = CALL.match(next(iter(CODE_SPAN.findall(heading)), "").strip())
        owner = next((k for k in instances if f"class {k}" in heading), None)
        for row in rows:
            cell = row.split("|")[1]
            for span in CODE_SPAN.findall(cell):
                member = re.match(r"(?:\w+\.)?([A-Za-z_]\w*)", span)
                if member is None or span.startswith(("'", '"')):
                    continue  # `==`, string values
                if owner is not None:
                    objects = instances[owner]
                    if "sparse only" in cell:
                        objects = objects[-1:]
                    if not all(hasattr(o, member[1]) for o in objects):
                        wrong.append(f"{owner}.{member[1]}")
                elif match and not match["cls"]:
                    if member[1] not in inspect.signature(resolve(match["name"])).parameters:
                        wrong.append(f"{match['name']}(... {member[1]} ...)")
    assert not wrong, f"documented in docs/api.md's tables but absent: {wrong}"
