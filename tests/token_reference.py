"""Reference implementations of token selection for the tests: eq. 8-11 one sample at a time in
float64, and a hand-written timm ViT forward that reduces tokens and tracks what each stands for."""

from __future__ import annotations

import math

import torch


def loop_select_merge(x, scores, rho, p, sizes=None):
    """Eq. 9-11 one sample at a time, in float64, ties to the lower index. With ``sizes``
    (``(B, N - P)``), also the sizes after the reduction (kept sizes, then the merged total)."""
    b, n_tokens, _ = x.shape
    n = n_tokens - p
    k = max(1, math.floor(rho * n))
    if k >= n:
        return x.double() if sizes is None else (x.double(), sizes)
    outs, new_sizes = [], []
    for i in range(b):
        s = scores[i].tolist()
        ranked = sorted(range(n), key=lambda j: (-s[j], j))
        kept, merged = sorted(ranked[:k]), ranked[k:]
        total = sum(s[j] for j in merged)
        merged_tok = sum(s[j] * x[i, p + j].double() for j in merged) / max(total, torch.finfo(torch.float32).tiny)
        outs.append(torch.cat([x[i, :p].double(), x[i, [p + j for j in kept]].double(), merged_tok[None]]))
        if sizes is not None:
            new_sizes.append([float(sizes[i, j]) for j in kept] + [sum(float(sizes[i, j]) for j in merged)])
    out = torch.stack(outs)
    return out if sizes is None else (out, torch.tensor(new_sizes, dtype=torch.float64))


def reference_scores(q, k, scale, p, score):
    """Eq. 8 ([CLS] row) or the mean over every query, per head in float64, then averaged."""
    q, k = q.double(), k.double()
    logits = (q @ k[:, :, p:].transpose(-1, -2)) * scale  # (B, H, N, N - P)
    attn = logits.softmax(-1)
    return attn[:, :, 0].mean(1) if score == "cls" else attn.mean(dim=(1, 2))


def hand_forward(model, x, layers, rho, score="cls", return_tokens=False):
    """A timm ``VisionTransformer`` forward written out, reducing before the MLP of ``layers``.
    Returns the logits, or with ``return_tokens`` the final normed tokens and their sizes."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    sizes = torch.ones(x.shape[0], x.shape[1] - p, dtype=torch.float64)
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        b, n, _ = h.shape
        qkv = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        attn = ((q * a.scale) @ k.transpose(-1, -2)).softmax(-1)
        y = a.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        x = x + blk.ls1(y)
        if i in layers:
            scores = reference_scores(q, k, a.scale, p, score)
            x, sizes = loop_select_merge(x, scores, rho, p, sizes)
            x = x.float()
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    return (x, sizes) if return_tokens else model.forward_head(x)


def expand_by_sizes(x, sizes, p):
    """Each non-prefix token repeated ``size`` times (integer sizes): the patches it stands for,
    were they all equal to it. One sample: ``x`` is ``(N, D)``, ``sizes`` ``(N - P,)``."""
    return torch.cat([x[:p], x[p:].repeat_interleave(sizes.round().long(), dim=0)])
