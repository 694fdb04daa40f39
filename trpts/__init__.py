"""trpts: Task-Relevant Parameter and Token Selection for fine-tuning Vision Transformers.

Typical use in your own training loop::

    fisher = trpts.compute_fisher(model, loader, num_batches=8)
    selection = trpts.allocate_connections(fisher, budget=0.005)
    handle = trpts.apply_masks(model, selection)
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05), lr=1e-3)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .allocation import MatrixAllocation, Selection, allocate_connections
from .delta import (
    DeltaHandle,
    activate_delta,
    load_delta,
    loaded_deltas,
    merge_delta,
    read_delta,
    remove_delta,
    save_delta,
)
from .errors import (
    DeltaFormatError,
    FingerprintMismatchError,
    TrptsError,
    TrptsKeyError,
    TrptsRuntimeError,
    TrptsTypeError,
    TrptsValueError,
    TrptsWarning,
    UnsupportedModelError,
    WeightDecayError,
)
from .fisher import compute_fisher, default_scored_parameters
from .flops import count_flops, token_counts
from .gate import TokenGate, token_gate_stats
from .masking import MaskHandle, SparseMaskHandle, apply_masks, get_mask_handle
from .mixed import forward_tasks
from .token_scores import mean_attention
from .tokens import (
    TokenConfig,
    TokenSelectMerge,
    cls_attention,
    get_token_config,
    record_kept_tokens,
    token_sizes,
    unwrap_vit,
    wrap_vit,
)
from .viz import (
    block_distribution,
    kept_patches,
    plot_block_distribution,
    plot_kept_tokens,
    plot_selection_overlap,
    selection_overlap,
)

try:
    __version__ = version("trpts")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "DeltaFormatError",
    "DeltaHandle",
    "FingerprintMismatchError",
    "MaskHandle",
    "MatrixAllocation",
    "Selection",
    "SparseMaskHandle",
    "TokenConfig",
    "TokenGate",
    "TokenSelectMerge",
    "TrptsError",
    "TrptsKeyError",
    "TrptsRuntimeError",
    "TrptsTypeError",
    "TrptsValueError",
    "TrptsWarning",
    "UnsupportedModelError",
    "WeightDecayError",
    "__version__",
    "activate_delta",
    "allocate_connections",
    "apply_masks",
    "block_distribution",
    "cls_attention",
    "compute_fisher",
    "count_flops",
    "default_scored_parameters",
    "forward_tasks",
    "get_mask_handle",
    "get_token_config",
    "kept_patches",
    "load_delta",
    "loaded_deltas",
    "mean_attention",
    "merge_delta",
    "plot_block_distribution",
    "plot_kept_tokens",
    "plot_selection_overlap",
    "read_delta",
    "record_kept_tokens",
    "remove_delta",
    "save_delta",
    "selection_overlap",
    "token_counts",
    "token_gate_stats",
    "token_sizes",
    "unwrap_vit",
    "wrap_vit",
]
