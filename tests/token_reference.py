"""Reference implementations of token selection for the tests: eq. 8-11 one sample at a time in
float64, and a hand-written timm ViT forward that reduces tokens and tracks what each stands for."""

from __future__ import annotations

import math

import torch


def loop_select_merge(x, scores, rho, p, sizes=None, positions=None):
    """Eq. 9-11 one sample at a time, in float64, ties to the lower index. With ``sizes``
    (``(B, N - P)``), also the sizes after the reduction (kept sizes, then the merged total);
    with ``positions`` (lists of original patch indices, -1: merged) too, the new positions."""
    b, n_tokens, _ = x.shape
    n = n_tokens - p
    k = max(1, math.floor(rho * n))
    if k >= n:
        return x.double() if sizes is None else (x.double(), sizes) if positions is None else (x.double(), sizes,
                                                                                            positions)
    outs, new_sizes, new_positions = [], [], []
    for i in range(b):
        s = scores[i].tolist()
        ranked = sorted(range(n), key=lambda j: (-s[j], j))
        kept, merged = sorted(ranked[:k]), ranked[k:]
        total = sum(s[j] for j in merged)
        merged_tok = sum(s[j] * x[i, p + j].double() for j in merged) / max(total, torch.finfo(torch.float32).tiny)
        outs.append(torch.cat([x[i, :p].double(), x[i, [p + j for j in kept]].double(), merged_tok[None]]))
        if sizes is not None:
            new_sizes.append([float(sizes[i, j]) for j in kept] + [sum(float(sizes[i, j]) for j in merged)])
        if positions is not None:
            new_positions.append([positions[i][j] for j in kept] + [-1])
    out = torch.stack(outs)
    if sizes is None:
        return out
    sizes = torch.tensor(new_sizes, dtype=torch.float64)
    return (out, sizes) if positions is None else (out, sizes, new_positions)


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


def _rope_rows(rope, positions):
    """Per sample, the rotary rows of the original positions (identity rotation for -1), looped."""
    d = rope.shape[-1]
    identity = torch.cat([torch.zeros(d // 2), torch.ones(d - d // 2)]).to(rope.dtype)
    return torch.stack([torch.stack([rope[j] if j >= 0 else identity for j in row]) for row in positions])[:, None]


def eva_hand_forward(model, x, layers, rho, score="cls", return_tokens=False):
    """A timm ``Eva`` forward written out (pre- or post-norm blocks, fused or separate q/k/v), reducing
    before the MLP of ``layers``; RoPE rows follow each kept token's original patch, merged tokens are
    not rotated."""
    from timm.layers import apply_rot_embed_cat
    from timm.models.eva import EvaBlockPostNorm

    p = model.num_prefix_tokens
    x, rope = model._pos_embed(model.patch_embed(x))
    x = model.norm_pre(x)
    b = x.shape[0]
    sizes = torch.ones(b, x.shape[1] - p, dtype=torch.float64)
    positions = [list(range(x.shape[1] - p)) for _ in range(b)]
    for i, blk in enumerate(model.blocks):
        a, post = blk.attn, isinstance(blk, EvaBlockPostNorm)
        h = x if post else blk.norm1(x)
        n = h.shape[1]
        if a.qkv is not None:
            bias = torch.cat((a.q_bias, a.k_bias, a.v_bias)) if a.q_bias is not None else None
            q, k, v = torch.nn.functional.linear(h, a.qkv.weight, bias).reshape(b, n, 3, a.num_heads, -1).permute(
                2, 0, 3, 1, 4)
        else:
            q, k, v = (m(h).reshape(b, n, a.num_heads, -1).transpose(1, 2) for m in (a.q_proj, a.k_proj, a.v_proj))
        q, k = a.q_norm(q), a.k_norm(k)
        if rope is not None:
            rows = _rope_rows(rope, positions)
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rows)], dim=2)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rows)], dim=2)
        attn = ((q * a.scale) @ k.transpose(-1, -2)).softmax(-1)
        y = a.proj(a.norm((attn @ v).transpose(1, 2).reshape(b, n, -1)))
        if post:
            x = x + blk.norm1(y)
        else:
            x = x + (blk.gamma_1 * y if blk.gamma_1 is not None else y)
        if i in layers:
            scores = reference_scores(q, k, a.scale, p, score)
            x, sizes, positions = loop_select_merge(x, scores, rho, p, sizes, positions)
            x = x.float()
        if post:
            x = x + blk.norm2(blk.mlp(x))
        else:
            m = blk.mlp(blk.norm2(x))
            x = x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
    x = model.norm(x)
    return (x, sizes) if return_tokens else model.forward_head(x)


def beit_hand_forward(model, x, layers, rho, score="cls", return_tokens=False):
    """A timm ``Beit`` forward written out, reducing before the MLP of ``layers``; each token's
    relative position bias is that of its original patch (looped per sample), 0 for merged tokens."""
    p = model.num_prefix_tokens
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = model.pos_drop(x if model.pos_embed is None else x + model.pos_embed)
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    b = x.shape[0]
    sizes = torch.ones(b, x.shape[1] - p, dtype=torch.float64)
    positions = [list(range(x.shape[1] - p)) for _ in range(b)]
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        h = blk.norm1(x)
        n = h.shape[1]
        bias = torch.cat((a.q_bias, a.k_bias, a.v_bias)) if a.q_bias is not None else None
        q, k, v = torch.nn.functional.linear(h, a.qkv.weight, bias).reshape(b, n, 3, a.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        full = torch.zeros(a.num_heads, 1, 1)
        if a.relative_position_bias_table is not None:
            full = full + a._get_rel_pos_bias()[0]
        if shared is not None:
            full = full + shared
        rel = pair_bias_loop(full, positions, p)
        attn = ((q * a.scale) @ k.transpose(-1, -2) + rel).softmax(-1)
        y = a.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        x = x + (blk.gamma_1 * y if blk.gamma_1 is not None else y)
        if i in layers:
            scores = reference_scores(q, k, a.scale, p, score)
            x, sizes, positions = loop_select_merge(x, scores, rho, p, sizes, positions)
            x = x.float()
        m = blk.mlp(blk.norm2(x))
        x = x + (blk.gamma_2 * m if blk.gamma_2 is not None else m)
    x = model.norm(x)
    return (x, sizes) if return_tokens else model.forward_head(x)


def pair_bias_loop(full, positions, p):
    """``(B, H, n, n)`` bias of each sample's tokens, looped: entry (a, b) of ``full`` ``(H, M, M)``
    at the tokens' original places, 0 where either token is merged (or ``full`` is a zero scalar)."""
    heads = full.shape[0]
    tokens = [list(range(p)) + [p + j if j >= 0 else None for j in row] for row in positions]
    return torch.stack([torch.stack([torch.stack([
        full[:, r, c] if r is not None and c is not None and full.shape[1] > 1 else torch.zeros(heads)
        for c in row]) for r in row]) for row in tokens]).permute(0, 3, 1, 2)


def hf_beit_hand_forward(model, x, layers, rho, score="cls"):
    """A Hugging Face ``BeitModel`` / ``BeitForImageClassification`` forward written out (eager
    attention), reducing before the MLP of ``layers``, each token's relative position bias that of
    its original patch (0 for merged tokens); the pooler's mean over the patches each token stands
    for. Returns the pooled output (``BeitModel``) or the logits."""
    backbone = getattr(model, "beit", model)
    x_emb = backbone.embeddings(x)
    window = (x.shape[2] // backbone.config.patch_size, x.shape[3] // backbone.config.patch_size)
    n0 = x_emb.shape[1]
    shared = (backbone.shared_position_bias(window, False, dim_size=n0)[0]
              if backbone.shared_position_bias is not None else torch.zeros(1, 1, 1))
    h_all, b, p = x_emb, x_emb.shape[0], 1
    sizes = torch.ones(b, n0 - p, dtype=torch.float64)
    positions = [list(range(n0 - p)) for _ in range(b)]
    for i, layer in enumerate(backbone.layers):
        a = layer.attention
        full = shared + (layer.relative_position_bias(window, False, dim_size=n0)[0]
                         if layer.relative_position_bias is not None else 0)
        h = layer.layernorm_before(h_all)
        n = h.shape[1]
        q, k, v = (m(h).view(b, n, -1, a.head_dim).transpose(1, 2) for m in (a.q_proj, a.k_proj, a.v_proj))
        logits = (q @ k.transpose(-1, -2)) * a.scaling
        if full.shape[-1] > 1:
            logits = logits + pair_bias_loop(full, positions, p)
        y = a.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))
        h_all = h_all + layer.lambda_1 * y
        if i in layers:
            h_all, sizes, positions = loop_select_merge(h_all, reference_scores(q, k, a.scaling, p, score), rho, p,
                                                        sizes, positions)
            h_all = h_all.float()
        h_all = h_all + layer.lambda_2 * layer.mlp(layer.layernorm_after(h_all))
    seq = backbone.layernorm(h_all)
    pooler = backbone.pooler
    if pooler.layernorm is not None:
        weights = (sizes / sizes.sum(1, keepdim=True)).float()
        pooled = pooler.layernorm((weights.unsqueeze(-1) * seq[:, 1:]).sum(1))
    else:
        pooled = seq[:, 0]
    return pooled if backbone is model else model.classifier(pooled)
