"""An independent plain re-implementation of the packed layout, the forward math and token dropping, shared by the
modeling and NaViT tests.

float64, token coordinates straight from the packed layout (frames, s×s blocks in raster order, raster inside),
explicit loops over attention groups (frames or windows) of the *kept* tokens, explicit formulas for PE resizing, 2D
RoPE, attention and the MLP. It reads only the config values and the state dict, never the model's own helpers, so it
can disagree with the model.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def spec_tokens(grids: Sequence[tuple[int, int, int]], s: int, window_blocks: int) -> list[tuple]:
    """Per packed token: (image, frame key, row, col, window key), in the packed order (frames, then s×s blocks in
    row-major order, then rows and columns inside the block)."""
    tokens = []
    for image, (t, h, w) in enumerate(grids):
        for f in range(t):
            for bi in range(h // s):
                for bj in range(w // s):
                    for r in range(s):
                        for c in range(s):
                            window = (image, f, bi // window_blocks, bj // window_blocks)
                            tokens.append((image, (image, f), bi * s + r, bj * s + c, window))
    return tokens


def is_full_attention(cfg, layer: int) -> bool:
    """fullatt_block_indexes None = every layer full; otherwise the listed layers (negative from the end)."""
    indexes = cfg.fullatt_block_indexes
    return indexes is None or layer in [i % cfg.num_hidden_layers for i in indexes]


def reference_forward(model, pixel_values: torch.Tensor, grids, keep: Optional[Sequence[int]] = None, return_maps=False):
    """float64 `(last_hidden_state, hidden_states)` of the kept rows (all rows when `keep` is None), in keep order.

    `hidden_states` lists the embeddings and every layer's output (before post_layernorm). With `return_maps`, also
    the attention maps: per layer, one `[heads, n, n]` tensor per attention group, groups in frame order and windows in
    raster order inside a frame (empty groups, where dropping removed every token, are absent).
    """
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    p, s, D, H = cfg.patch_size, cfg.hidden_stride, cfg.hidden_size, cfg.num_attention_heads
    d = D // H
    grids = [tuple(int(v) for v in g) for g in grids]
    tokens = spec_tokens(grids, s, cfg.window_size // s // p)
    keep = list(range(len(tokens))) if keep is None else [int(i) for i in keep]
    kept = [tokens[i] for i in keep]
    K = len(keep)

    # Embeddings: the patch embedding as a convolution over each patch, plus the learned PE resized per image size.
    x = pixel_values.detach().double()[keep].view(K, cfg.num_channels * cfg.temporal_patch_size, p, p)
    pre = "vision_model.embeddings."
    x = F.conv2d(x, sd[pre + "patch_embedding.weight"], sd[pre + "patch_embedding.bias"]).view(K, D)
    if cfg.preserve_original_pe:
        side = cfg.image_size // p
        table = sd[pre + "position_embedding.weight"].view(side, side, D).permute(2, 0, 1)[None]
        resized = {}
        for t, h, w in grids:
            resized[(h, w)] = F.interpolate(
                table, size=(h, w), mode=cfg.pe_interpolation, align_corners=False, antialias=cfg.pe_antialias
            )[0]
        x = x + torch.stack([resized[grids[img][1:]][:, r, c] for img, _, r, c, _ in kept])

    # 2D RoPE: the first half of each rotated half uses the row, the second the column.
    inv = torch.tensor([1.0 / cfg.rope_theta ** (2 * k / (d / 2)) for k in range(d // 4)], dtype=torch.float64)
    rows = torch.tensor([r for _, _, r, _, _ in kept], dtype=torch.float64)
    cols = torch.tensor([c for _, _, _, c, _ in kept], dtype=torch.float64)
    half = torch.cat([rows[:, None] * inv, cols[:, None] * inv], dim=1)
    emb = torch.cat([half, half], dim=1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def groups(key_index: int) -> list[torch.Tensor]:
        """Kept tokens per frame (key (image, frame)) or window (key (image, frame, window row, window col)), in key
        order: frames in order, windows in raster order (not in order of first kept token)."""
        by_key = {}
        for i, token in enumerate(kept):
            by_key.setdefault(token[key_index], []).append(i)
        return [torch.tensor(by_key[key]) for key in sorted(by_key)]

    def rotate(v: torch.Tensor) -> torch.Tensor:
        return v * cos + torch.cat([-v[..., d // 2 :], v[..., : d // 2]], -1) * sin

    frame_groups, window_groups = groups(1), groups(4)
    hidden, maps = [x], []
    for layer in range(cfg.num_hidden_layers):
        lp = f"vision_model.encoder.layers.{layer}."

        def lin(name, v):
            return v @ sd[lp + name + ".weight"].T + sd[lp + name + ".bias"]

        def ln(name, v):
            return F.layer_norm(v, (D,), sd[lp + name + ".weight"], sd[lp + name + ".bias"], cfg.layer_norm_eps)

        y = ln("layer_norm1", x)
        q, k, v = (lin(f"self_attn.{n}_proj", y).view(K, H, d) for n in "qkv")
        if cfg.use_rope:
            q, k = rotate(q), rotate(k)
        out = torch.zeros_like(q)
        layer_maps = []
        for idx in frame_groups if is_full_attention(cfg, layer) else window_groups:
            probs = (torch.einsum("ihd,jhd->hij", q[idx], k[idx]) / math.sqrt(d)).softmax(-1)
            out[idx] = torch.einsum("hij,jhd->ihd", probs, v[idx])
            layer_maps.append(probs)
        x = x + lin("self_attn.out_proj", out.reshape(K, D))
        x = x + lin("mlp.fc2", F.gelu(lin("mlp.fc1", ln("layer_norm2", x)), approximate="tanh"))
        hidden.append(x)
        maps.append(layer_maps)
    post = "vision_model.post_layernorm."
    last = F.layer_norm(x, (D,), sd[post + "weight"], sd[post + "bias"], cfg.layer_norm_eps)
    return (last, hidden, maps) if return_maps else (last, hidden)
