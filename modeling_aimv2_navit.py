# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""AIMv2 NaViT vision encoder: transformers' `Aimv2VisionModel` over images of any size packed into one sequence.

Only what is AIMv2's lives here; the packed layout, validation, attention backends and the encoder loop are the shared
core (`navit_core.py`). Parameter names are those of transformers' `Aimv2VisionModel`, so its checkpoints load
unchanged. One forward (N packed patch rows, K kept tokens, K == N unless `keep_indices` drops some):

    pixel_values [N, C·p·p], grid_thws [n_images, 3]
      -> plan (host, once)   validation, PackedLayout (`cu_seqlens` per frame); learned-table grids checked
      -> embeddings          patch linear -> RMSNorm -> + 2D sin-cos PE of (row, col) (or the learned table)  [K, D]
      -> encoder layers      pre-norm RMSNorm blocks, SwiGLU MLP; attention per frame of the packed batch
      -> rms_norm            -> last_hidden_state [K, D], input order; attention-pooling head -> [n_images, D]
"""

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_aimv2_navit import Aimv2NavitConfig
from .navit_core import (
    AttentionPartition,
    PackedEncoder,
    PackedEncoderLayer,
    PackedLayout,
    PackedPatchEmbedding,
    PackedPreTrainedModel,
    PackedSelfAttention,
    per_image_groups,
    never_specialize,
)

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


RotaryPair = Optional[tuple[torch.Tensor, torch.Tensor]]  # AIMv2 has no RoPE: always None, kept for the core's API


# ----------------------------------------------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------------------------------------------


def sincos_table(size: int, dim: int, device: torch.device, temperature: float = 10000.0) -> torch.Tensor:
    """`[sin(x·ω), cos(x·ω)]` for every integer coordinate x < `size`: [size, dim/2], ω_k = temperature^(−k/(dim/4)).

    Computed on the host in float64 (float32 for MPS, which has none), as transformers does, once per forward for the
    batch's longest side; every token then gathers its rows (no [K, dim] float64 temporary, no per-token sin/cos).
    """
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    angles = torch.arange(size, dtype=torch.float64)[:, None] * omega  # [size, dim/4]
    table = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [size, dim/2]
    return table.to(device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)


def sincos_position_embeddings(positions: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """AIMv2's fixed 2D sin-cos embedding of the patches at `positions` [K, 2] = (row, col): [K, dim], `table`'s dtype.

    Laid out `[sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)]`: the column half comes first (transformers builds the
    row-first layout and swaps its halves; AIMv2 was trained that way). `table`: `sincos_table`, already in the dtype
    the embedding is added in (cast before the gather: the same values as casting each token's embedding).
    """
    return torch.cat([table[positions[:, 1]], table[positions[:, 0]]], dim=-1)


def learned_table_rows(positions: torch.Tensor, side: int) -> torch.Tensor:
    """Row of each patch (`positions` [K, 2] = (row, col)) in a raster `side × side` learned table: [K]."""
    return positions[:, 0] * side + positions[:, 1]


def check_learned_table_grids(frame_grids: Sequence[tuple[int, int]], side: int, patch_size: int) -> None:
    """A learned position table (non-native AIMv2 checkpoint) fits its trained grid only: refuse every other grid."""
    wrong = [i for i, grid in enumerate(frame_grids) if tuple(grid) != (side, side)]
    if wrong:
        raise ValueError(
            f"This AIMv2 checkpoint has a learned position table for a {side}×{side} patch grid "
            f"({side * patch_size}×{side * patch_size} px, `is_native=False`), but frames {wrong} have grids "
            f"{[tuple(frame_grids[i]) for i in wrong]}. Resize those images to {side * patch_size}×{side * patch_size} "
            "px, or use a native-resolution checkpoint (`is_native=True`, e.g. apple/aimv2-large-patch14-native)."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Modules (names and parameters as in transformers' Aimv2VisionModel)
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2NavitRMSNorm(nn.Module):
    """RMSNorm as transformers' `Aimv2RMSNorm`: normalised in float32, cast back, then scaled by `weight`."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_float = hidden_states.to(torch.float32)
        inv_rms = torch.rsqrt(hidden_float.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * (hidden_float * inv_rms).to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Aimv2NavitEmbeddings(nn.Module):
    """Patch linear -> RMSNorm -> + position embedding (2D sin-cos when `is_native`, else the learned table)."""

    def __init__(self, config: Aimv2NavitConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PackedPatchEmbedding(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.rms_norm = Aimv2NavitRMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.is_native:
            self.position_embedding = nn.Embedding(config.position_grid**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        patches = self.patch_embed.patch_rows(pixel_values, layout)  # [K, C·p·p], working order
        hidden_states = self.rms_norm(self.patch_embed(patches))  # [K, D]
        if self.config.is_native:
            table = layout.family.to(hidden_states.dtype)  # the batch's sincos_table [longest side, D/2]
            position = sincos_position_embeddings(layout.positions, table)  # [K, D]
        else:
            position = self.position_embedding(learned_table_rows(layout.positions, self.config.position_grid))
        return hidden_states + position.to(hidden_states.dtype)


class Aimv2NavitAttention(PackedSelfAttention):
    """Multi-head self-attention within each frame of the packed batch (no RoPE); all projections biased as
    `qkv_bias`."""

    def __init__(self, config: Aimv2NavitConfig):
        bias = config.qkv_bias
        super().__init__(config.hidden_size, config.num_attention_heads, config.attention_dropout, (bias, bias, bias))
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attn_output)  # [S, D]


class Aimv2NavitMLP(nn.Module):
    """SwiGLU: down_proj(act(gate_proj(x)) · up_proj(x))."""

    def __init__(self, config: Aimv2NavitConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gated = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)  # [S, intermediate]
        return self.down_proj(gated)


class Aimv2NavitEncoderLayer(PackedEncoderLayer):
    """Pre-norm block: x + attention(rms_norm1(x)), then x + ffn(rms_norm2(x))."""

    def __init__(self, config: Aimv2NavitConfig):
        super().__init__()
        self.mlp_width = 2 * config.intermediate_size  # gate and up activations are alive together
        self.attention = Aimv2NavitAttention(config)
        self.ffn = Aimv2NavitMLP(config)
        self.rms_norm1 = Aimv2NavitRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rms_norm2 = Aimv2NavitRMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_branch(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: RotaryPair,
        partition: AttentionPartition,
        attention_interface: Callable,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        normed = self.rms_norm1(hidden_states)
        return self.attention(normed, None, partition, attention_interface, output_attentions)

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.rms_norm2(hidden_states))


class Aimv2NavitEncoder(PackedEncoder):
    """The core's layer loop over AIMv2 blocks (no rotary embedding)."""

    def __init__(self, config: Aimv2NavitConfig):
        super().__init__(config, [Aimv2NavitEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class Aimv2NavitAttentionPoolingHead(nn.Module):
    """AIMv2's attention pooling: a learned query (`cls_token`, one slice per head, not projected) attends over the
    k/v projections of all tokens of an image; `output_proj` of the result: one vector per image."""

    def __init__(self, config: Aimv2NavitConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.output_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, L, D] -> [n, heads, L, D / heads]."""
        n, length, dim = tokens.shape
        return tokens.view(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, token_counts: Sequence[int]) -> torch.Tensor:
        """Pool `hidden_states` [K, D] (images back to back, `token_counts` tokens each) to [n_images, D]; images of
        equal length are pooled in one batched attention call."""
        keys, values = self.k_proj(hidden_states), self.v_proj(hidden_states)  # [K, D] each
        per_image = list(zip(keys.split(list(token_counts)), values.split(list(token_counts))))
        pooled = hidden_states.new_empty(len(token_counts), hidden_states.shape[-1])  # [n_images, D]
        for image_ids in per_image_groups(token_counts).values():
            key = self._heads(torch.stack([per_image[i][0] for i in image_ids]))  # [n, heads, L, D/heads]
            value = self._heads(torch.stack([per_image[i][1] for i in image_ids]))
            query = self._heads(self.cls_token.to(key.dtype)).expand(len(image_ids), -1, -1, -1)  # [n, heads, 1, ·]
            attended = F.scaled_dot_product_attention(query, key, value)  # [n, heads, 1, D/heads]
            pooled[image_ids] = attended.transpose(1, 2).flatten(1)  # [n, D]
        return self.output_proj(pooled)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model
# ----------------------------------------------------------------------------------------------------------------------


class Aimv2NavitPreTrainedModel(PackedPreTrainedModel):
    config_class = Aimv2NavitConfig
    base_model_prefix = "aimv2_navit"
    _no_split_modules = ["Aimv2NavitEmbeddings", "Aimv2NavitEncoderLayer", "Aimv2NavitAttentionPoolingHead"]

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) projections and tables, zero biases, unit norms (transformers' AIMv2 init).
        Dispatches on modules that own parameters directly (transformers skips remote-code containers)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Aimv2NavitRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Aimv2NavitAttentionPoolingHead):
            nn.init.normal_(module.cls_token, std=std)


class Aimv2NavitModel(Aimv2NavitPreTrainedModel):
    """AIMv2 vision encoder over packed images: `model(pixel_values, grid_thws)`.

    Inputs: `pixel_values` [Σ h·w, C·p·p] patch rows, each flattened (channel, row-in-patch, col-in-patch), per
    frame in raster order (hidden_stride 1) or in s × s blocks (blocks in raster order, patches in raster order), and
    `grid_thws` [n_images, 3] (t, h, w) in patches. Outputs: `last_hidden_state` [N, D] after the final RMSNorm, input
    order; `pooler_output` [n_images, D] from the attention-pooling head when `use_head`.
    """

    def __init__(self, config: Aimv2NavitConfig):
        config._validate()  # fields may have changed since the config's __init__ (from_pretrained overrides)
        super().__init__(config)
        self.embeddings = Aimv2NavitEmbeddings(config)
        self.encoder = Aimv2NavitEncoder(config)
        self.rms_norm = Aimv2NavitRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.use_head:
            self.head = Aimv2NavitAttentionPoolingHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embed

    # -- planning hooks of the shared core --
    def _plan_family(self, layout: PackedLayout, grids: Sequence[tuple[int, int, int]]) -> Optional[torch.Tensor]:
        """Native checkpoints: the sin-cos table up to the batch's longest side (`layout.family`). Learned tables:
        every grid checked against the trained one (a ValueError before any compute)."""
        if not self.config.is_native:
            check_learned_table_grids(layout.frame_grids, self.config.position_grid, self.config.patch_size)
            return None
        longest = max(max(grid) for grid in layout.frame_grids)
        table = sincos_table(longest, self.config.hidden_size, layout.positions.device)  # [longest, D/2]
        never_specialize(table)  # its length varies per batch: never a guard of a compiled graph
        return table

    def _pools_per_image(self) -> bool:
        return self.config.use_head

    def encode(
        self, pixel_values: torch.Tensor, layout: PackedLayout, output_attentions: bool, output_hidden_states: bool
    ) -> BaseModelOutput:
        """Embeddings, encoder layers and the final RMSNorm for a planned batch; outputs in input order."""
        hidden_states = self.embeddings(pixel_values, layout)  # [K, D], working order
        encoded, _ = self.encoder.encode_and_restore(
            hidden_states, layout, self.rms_norm, output_attentions, output_hidden_states
        )
        return encoded

    def wrap_outputs(
        self, encoded: BaseModelOutput, layout: PackedLayout, return_dict: bool
    ) -> Union[BaseModelOutputWithPooling, tuple]:
        """`encoded` plus the attention-pooling head over each image's tokens (all its frames, kept tokens only)."""
        pooled = self.head(encoded.last_hidden_state, layout.image_token_counts) if self.config.use_head else None
        outputs = BaseModelOutputWithPooling(pooler_output=pooled, **encoded)  # [n_images, D] pooled
        return outputs if return_dict else outputs.to_tuple()


Aimv2NavitModel.register_for_auto_class("AutoModel")  # save_pretrained then writes auto_map + the .py files

__all__ = ["Aimv2NavitPreTrainedModel", "Aimv2NavitModel"]
