# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""SigLIP2 NaViT vision encoder: images of any size packed into one sequence (the Ovis2.5 vision tower).

Only what is SigLIP2's lives here; the packed layout, validation, attention backends and the encoder loop are the
shared core (`navit_core.py`). One forward (N packed patch rows, K kept tokens, K == N unless `keep_indices` drops):

    pixel_values [N, C·T·p·p], grid_thws [n_images, 3]
      -> plan (host, once)    validation, PackedLayout (`cu_seqlens`, windows) + this family's resized-PE indices
      -> embeddings           patch embedding (one matmul) + learned PE resized to each image's grid       [K, hidden]
      -> encoder layers       pre-norm blocks with 2D RoPE; attention per frame (or window) of the packed batch
      -> post_layernorm       -> last_hidden_state [K, hidden], optional MAP pooling per image
"""

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_siglip2_navit import Siglip2NavitConfig
from .navit_core import (
    AttentionContext,
    FamilyPlan,
    PackedEncoder,
    PackedEncoderLayer,
    PackedLayout,
    PackedPatchEmbedding,
    PackedPreTrainedModel,
    PackedSelfAttention,
    cpu_block_tokens,
    fused_linear,
    has_hooks,
    linear,
    per_image_groups,
)

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------------
# Planning: the learned position embedding resized to every grid of the batch
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PositionEmbeddingPlan(FamilyPlan):
    """SigLIP2's plan (`layout.family`): which resized PE tables a batch needs and where each token reads its row."""

    pe_index: torch.Tensor  # [K] row of the concatenated resized tables, working order, on device
    pe_sizes: tuple[tuple[int, int], ...]  # the (h, w) of each resized table, in concatenation order
    pe_resize: tuple[Optional[tuple[torch.Tensor, torch.Tensor]], ...]  # per table ([h, P], [w, P]); None: interpolate


Siglip2Layout = PackedLayout[PositionEmbeddingPlan]  # a layout planned by Siglip2NavitModel.plan

@functools.lru_cache(maxsize=512)
def _resize_matrix(size: int, side: int, mode: str, antialias: bool) -> torch.Tensor:
    """[size, side] matrix of the 1-D resampling `F.interpolate` applies along one axis (align_corners=False).

    Bilinear and bicubic resizing, antialiased or not, are separable and linear, so the resized PE table is
    `A_h @ table @ A_w.T`; the matrices depend only on sizes, so they are cached while the weights stay live (and
    differentiable). They are read off `F.interpolate` itself: channel k of the basis is row k set to ones, resized to
    `(size, side)`; its first column is `A[:, k]` (each row of the width resampling sums to 1). The basis keeps its
    full width because PyTorch's antialiased kernel is not separable for a 1-wide output.
    """
    with torch.inference_mode(False):  # cached for the process: must stay usable by autograd after an inference call
        basis = torch.eye(side, dtype=torch.float64)[:, :, None].expand(side, side, side)  # [k, row, col]
        resized = F.interpolate(basis[None], size=(size, side), mode=mode, align_corners=False, antialias=antialias)
        return resized[0, :, :, 0].T.to(torch.float32).contiguous()  # [size, side]


def plan_position_embeddings(
    layout: PackedLayout, grids: Sequence[tuple[int, int, int]], config: Siglip2NavitConfig
) -> PositionEmbeddingPlan:
    """One resized PE table per distinct (h, w); each token indexes its row/col in its frame's table."""
    pe_sizes: list[tuple[int, int]] = []
    table_offset: dict[tuple[int, int], int] = {}
    offset = 0
    frame_table_offset, frame_width = [], []
    for t, h, w in grids:
        if (h, w) not in table_offset:
            table_offset[(h, w)] = offset
            pe_sizes.append((h, w))
            offset += h * w
        frame_table_offset += [table_offset[(h, w)]] * t
        frame_width += [w] * t
    rows, cols = layout.host_positions.unbind(-1)
    frame_ids = layout.host_frame_ids
    pe_index = torch.tensor(frame_table_offset)[frame_ids] + rows * torch.tensor(frame_width)[frame_ids] + cols

    # Resizing is separable and linear: each table is two cached per-axis matrix products (~7x faster than the
    # antialiased kernel). PyTorch's antialiased kernels are not separable for a 1-wide output, so such a table keeps
    # F.interpolate on the live weight (exact naflex parity).
    side = config.image_size // config.patch_size
    device = layout.positions.device
    mode, antialias = config.pe_interpolation, config.pe_antialias
    pe_resize: tuple = ()
    if config.preserve_original_pe:
        pe_resize = tuple(
            None
            if antialias and 1 in (h, w)
            else tuple(_resize_matrix(n, side, mode, antialias).to(device) for n in (h, w))
            for h, w in pe_sizes
        )
    return PositionEmbeddingPlan(pe_index=pe_index.to(device), pe_sizes=tuple(pe_sizes), pe_resize=pe_resize)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [K, head_dim] (float32) of the 2D RoPE for tokens at `positions` [K, 2] = (row, col)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(quarter, device=positions.device, dtype=torch.float32) * 4 / head_dim))
    angles = positions.to(torch.float32)[:, :, None] * inv_freq  # [K, 2, head_dim/4]
    angles = angles.flatten(1)  # [K, head_dim/2] = concat(row·inv_freq, col·inv_freq)
    emb = torch.cat([angles, angles], dim=-1)  # [K, head_dim]
    return emb.cos(), emb.sin()


# ----------------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------------

class Siglip2NavitEmbeddings(nn.Module):
    """Patch embedding (stored in Conv2d layout, computed as one matmul) plus the resized learned PE."""

    def __init__(self, config: Siglip2NavitConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_embedding = PackedPatchEmbedding(
            in_channels=config.num_channels * config.temporal_patch_size,
            out_channels=config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )
        self.position_embedding_size = config.image_size // config.patch_size
        if config.preserve_original_pe:
            self.position_embedding = nn.Embedding(self.position_embedding_size**2, config.hidden_size)

    def resized_position_embeddings(self, layout: Siglip2Layout) -> torch.Tensor:
        """The learned PE table resized to each of the batch's grid sizes, raster order, concatenated: [Σ h·w, hidden]."""
        weight = self.position_embedding.weight
        side = self.position_embedding_size
        table = weight.view(side, side, -1).to(torch.promote_types(weight.dtype, torch.float32))  # [P, P, hidden]
        grid = table.permute(2, 0, 1).unsqueeze(0)  # [1, hidden, P, P]
        tables = []
        for (height, width), matrices in zip(layout.family.pe_sizes, layout.family.pe_resize):
            if matrices is not None:
                resize_h, resize_w = (m.to(table.dtype) for m in matrices)  # [h, P], [w, P]
                resized = torch.einsum("wq,pqd->pwd", resize_w, table)  # [P, w, hidden]
                tables.append(torch.einsum("hp,pwd->hwd", resize_h, resized).flatten(0, 1))  # [h·w, hidden]
            else:
                resized = F.interpolate(
                    grid,
                    size=(height, width),
                    mode=self.config.pe_interpolation,
                    align_corners=False,
                    antialias=self.config.pe_antialias,
                )
                tables.append(resized[0].flatten(1).T)  # [h·w, hidden]
        return (tables[0] if len(tables) == 1 else torch.cat(tables, dim=0)).to(weight.dtype)

    @torch.compiler.disable  # loops over the batch's image sizes: eager, so that torch.compile does not specialize on them
    def token_position_embeddings(self, layout: Siglip2Layout) -> torch.Tensor:
        """Each token's row of its frame's resized PE table: [K, hidden], working order."""
        return self.resized_position_embeddings(layout).index_select(0, layout.family.pe_index)

    def forward(self, pixel_values: torch.Tensor, layout: Siglip2Layout) -> torch.Tensor:
        weight = self.patch_embedding.weight
        piece = cpu_block_tokens(self.config, weight)
        if piece is not None and not has_hooks(self.patch_embedding):
            return self._forward_in_pieces(pixel_values, layout, piece)
        embeddings = self.patch_embedding(self.patch_embedding.patch_rows(pixel_values, layout))  # [K, hidden]
        if self.config.preserve_original_pe:
            embeddings = embeddings + self.token_position_embeddings(layout)
        return embeddings

    def _forward_in_pieces(self, pixel_values: torch.Tensor, layout: Siglip2Layout, piece: int) -> torch.Tensor:
        """`forward` for CPU inference, `piece` rows at a time into one [K, hidden] output (no [K, ·] temporaries)."""
        weight = self.patch_embedding.weight
        flat_weight = weight.reshape(self.embed_dim, -1)  # [hidden, C·T·p²]
        table = self.resized_position_embeddings(layout) if self.config.preserve_original_pe else None
        num_tokens = layout.token_rows.shape[0]
        embeddings = torch.empty(num_tokens, self.embed_dim, dtype=weight.dtype, device=weight.device)  # [K, hidden]
        pixel_values = pixel_values.to(weight.device)
        for out, rows, pe_index in zip(
            embeddings.split(piece), layout.token_rows.split(piece), layout.family.pe_index.split(piece)
        ):
            patches = pixel_values.index_select(0, rows).to(weight.dtype)  # [piece, C·T·p²]
            torch.addmm(self.patch_embedding.bias, patches, flat_weight.t(), out=out)
            if table is not None:
                out.add_(table.index_select(0, pe_index))
        return embeddings


class Siglip2NavitAttention(PackedSelfAttention):
    """Multi-head self-attention over packed sequences, with 2D RoPE on queries and keys."""

    def __init__(self, config: Siglip2NavitConfig):
        super().__init__(config.hidden_size, config.num_attention_heads, config.attention_dropout)
        self.config = config
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return linear(self.out_proj, attn_output)  # [K, hidden]


class Siglip2NavitMLP(nn.Module):
    def __init__(self, config: Siglip2NavitConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.hidden_act = config.hidden_act
        self.inplace_gelu_tanh = config.hidden_act == "gelu_pytorch_tanh"
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = fused_linear(self.fc1, hidden_states, self.hidden_act)  # CPU inference: GELU inside fc1's GEMM
        if fused is not None:
            return linear(self.fc2, fused)
        hidden_states = self.fc1(hidden_states)  # [K, intermediate]
        if (
            self.inplace_gelu_tanh
            and not (torch.is_grad_enabled() and hidden_states.requires_grad)
            and not has_hooks(self.fc1)
        ):
            # Inference: GELU in place on fc1's fresh output (same math as ACT2FN["gelu_pytorch_tanh"]): one [K, I]
            # buffer less at peak and ~half the activation's memory traffic. Skipped when autograd or a forward hook
            # (fc1's own or a global one) could still see that tensor.
            hidden_states = torch.ops.aten.gelu_(hidden_states, approximate="tanh")
        else:
            hidden_states = self.activation_fn(hidden_states)
        return self.fc2(hidden_states)


class Siglip2NavitEncoderLayer(PackedEncoderLayer):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: Siglip2NavitConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.full_attention = config.is_full_attention_layer(layer_idx)
        self.mlp_width = config.intermediate_size
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Siglip2NavitAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Siglip2NavitMLP(config)

    def attention_branch(
        self, hidden_states: torch.Tensor, context: AttentionContext
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        return self.self_attn(self.layer_norm1(hidden_states), context)

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.layer_norm2(hidden_states))


class Siglip2NavitEncoder(PackedEncoder):
    def __init__(self, config: Siglip2NavitConfig):
        super().__init__(config, [Siglip2NavitEncoderLayer(config, i) for i in range(config.num_hidden_layers)])

    def rotary_embeddings(self, layout: PackedLayout) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not self.config.use_rope:
            return None
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        return rope_cos_sin(layout.positions, head_dim, self.config.rope_theta)


class Siglip2NavitMultiheadAttentionPoolingHead(nn.Module):
    """SigLIP's MAP head: one learned probe attends over all tokens of an image (names as in transformers' Siglip2)."""

    def __init__(self, config: Siglip2NavitConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Siglip2NavitMLP(config)

    def forward(self, hidden_states: torch.Tensor, token_counts: Sequence[int]) -> torch.Tensor:
        """Pool `hidden_states` [K, hidden] (images back to back, `token_counts` each) to [n_images, hidden]."""
        per_image = torch.split(hidden_states, list(token_counts), dim=0)
        pooled: list[Optional[torch.Tensor]] = [None] * len(token_counts)
        for ids in per_image_groups(token_counts).values():
            batch = torch.stack([per_image[i] for i in ids])  # [n, L, hidden]
            probe = self.probe.expand(batch.shape[0], -1, -1)
            out = self.attention(probe, batch, batch, need_weights=False)[0]
            out = out + self.mlp(self.layernorm(out))
            for row, image_id in enumerate(ids):
                pooled[image_id] = out[row, 0]
        return torch.stack(pooled)


class Siglip2NavitVisionTransformer(nn.Module):
    def __init__(self, config: Siglip2NavitConfig):
        super().__init__()
        self.config = config
        self.embeddings = Siglip2NavitEmbeddings(config)
        self.encoder = Siglip2NavitEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.vision_use_head:
            self.head = Siglip2NavitMultiheadAttentionPoolingHead(config)

    def forward(
        self,
        pixel_values: torch.Tensor,
        layout: PackedLayout,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        """Embeddings, encoder and post_layernorm, outputs in input order. The MAP head runs in `pool`, which
        `Siglip2NavitModel.forward` calls outside the compiled region (it groups images by token count)."""
        hidden_states = self.embeddings(pixel_values, layout)  # [K, hidden], working order
        encoded, _ = self.encoder.encode_and_restore(
            hidden_states, layout, self.post_layernorm, output_attentions, output_hidden_states
        )
        return encoded

    @torch.compiler.disable  # groups images by token count: eager, so that torch.compile does not specialize on it
    def pool(self, last_hidden_state: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """The MAP head over each image's tokens: [n_images, hidden]."""
        return self.head(last_hidden_state, layout.image_token_counts)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model
# ----------------------------------------------------------------------------------------------------------------------


class Siglip2NavitPreTrainedModel(PackedPreTrainedModel):
    config_class = Siglip2NavitConfig
    base_model_prefix = "siglip2_navit"
    _no_split_modules = ["Siglip2NavitEmbeddings", "Siglip2NavitEncoderLayer", "Siglip2NavitMultiheadAttentionPoolingHead"]

    def _init_weights(self, module: nn.Module) -> None:
        """SigLIP initialisation through `nn.init` (guarded by transformers, so loaded weights are kept).

        Dispatches on modules that own parameters directly: transformers skips remote-code modules without direct
        parameters, so the init cannot live on containers such as the attention block.
        """
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # patch embedding: LeCun normal
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            nn.init.normal_(module.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # learned position embedding
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(self.config.hidden_size))
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, Siglip2NavitMultiheadAttentionPoolingHead):
            nn.init.xavier_uniform_(module.probe)


class Siglip2NavitModel(Siglip2NavitPreTrainedModel):
    """SigLIP2 NaViT vision encoder over packed images: `model(pixel_values, grid_thws)`.

    Inputs: `pixel_values` [Σ t·h·w, C·T·p·p] patch rows (each flattened (channel, frame, row-in-patch,
    col-in-patch); per frame, hidden_stride × hidden_stride blocks in raster order, each block's patches in raster
    order) and `grid_thws` [n_images, 3] (t, h, w) in patches. `keep_indices` (optional) encodes only those rows
    (NaViT token dropping).
    """

    def __init__(self, config: Siglip2NavitConfig):
        config._validate()  # fields may have changed since the config's __init__ (from_pretrained overrides)
        super().__init__(config)
        self.vision_model = Siglip2NavitVisionTransformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    # -- the surface Ovis2.5's visual tokenizer and training monitor use --
    def _get_block(self, layer_index: int) -> Siglip2NavitEncoderLayer:
        return self.vision_model.encoder.layers[layer_index]

    def _get_attn_weight(self, layer_index: int) -> torch.Tensor:
        attn = self._get_block(layer_index).self_attn
        return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)

    def _get_pose_embed(self) -> torch.Tensor:
        return self.vision_model.embeddings.position_embedding.weight

    # -- planning hooks of the shared core --
    def _layout_options(self) -> dict:
        """Windows when some layers attend within windows."""
        config = self.config
        has_windows = not all(config.is_full_attention_layer(i) for i in range(config.num_hidden_layers))
        return {"window_blocks": config.window_blocks if has_windows else None}

    def _plan_family(self, layout: PackedLayout, grids: Sequence[tuple[int, int, int]]) -> PositionEmbeddingPlan:
        return plan_position_embeddings(layout, grids, self.config)

    def _pools_per_image(self) -> bool:
        return self.config.vision_use_head

    def encode(
        self, pixel_values: torch.Tensor, layout: PackedLayout, output_attentions: bool, output_hidden_states: bool
    ) -> BaseModelOutput:
        return self.vision_model(
            pixel_values, layout, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )

    def build_outputs(
        self, encoded: BaseModelOutput, layout: PackedLayout, return_dict: bool
    ) -> Union[BaseModelOutputWithPooling, tuple]:
        """`encoded` plus the MAP head's pooled output per image when the model has the head."""
        pooler_output = None
        if self.config.vision_use_head:
            pooler_output = self.vision_model.pool(encoded.last_hidden_state, layout)  # [n_images, hidden]
        outputs = BaseModelOutputWithPooling(pooler_output=pooler_output, **encoded)
        return outputs if return_dict else outputs.to_tuple()


Siglip2NavitModel.register_for_auto_class("AutoModel")  # save_pretrained then writes auto_map + the .py files

__all__ = ["Siglip2NavitPreTrainedModel", "Siglip2NavitModel"]
