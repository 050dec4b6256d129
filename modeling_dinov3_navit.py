# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""DINOv3 ViT over packed images of any size (NaViT): transformers' `DINOv3ViTModel` math on the shared packed core.

Only what is DINOv3's lives here; the packed layout, validation, attention backends and the encoder loop are the
shared core (`navit_core.py`). One forward (N packed patch rows, K kept patches, F frames, P = 1 + registers):

    pixel_values [N, C·p·p], grid_thws [n_images, 3]
      -> plan (host, once)   validation, PackedLayout: every frame's sequence is [CLS, registers, its patches]
      -> embeddings          patch embedding (one matmul) + the prefix tokens of every frame              [K + F·P, D]
      -> layers              pre-norm blocks, LayerScale; 2D RoPE on patches (each side normalised on its own),
                             none on prefix tokens; attention per frame of the packed batch
      -> norm                last_hidden_state [K, D] (patches, input order); pooler_output [F, D] (CLS);
                             prefix_tokens [F, P, D]

Parameter names are those of transformers' checkpoint files (`embeddings.*`, `layer.N.*`, `norm.*`), so a
`DINOv3ViTModel` folder loads unchanged (strictly).
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_dinov3_navit import Dinov3NavitConfig
from .navit_core import (
    AttentionPartition,
    PackedEncoder,
    PackedEncoderLayer,
    PackedLayout,
    PackedPatchEmbedding,
    PackedPreTrainedModel,
    PackedSelfAttention,
    assemble_sequence,
)

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


@dataclass
class Dinov3NavitModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus every frame's prefix tokens.

    Args:
        last_hidden_state (`[K, D]`): patch tokens after the final norm, input order (no prefix tokens).
        pooler_output (`[Σt, D]`): each frame's CLS token after the final norm (one per image when t = 1).
        hidden_states (tuple of `[K, D]`): patch tokens of the embeddings and of every layer, before the final norm.
        attentions (tuple of tuples of `[heads, L, L]`): per frame, tokens ordered [CLS, registers, patches] (eager).
        prefix_tokens (`[Σt, 1 + num_register_tokens, D]`): CLS and register tokens after the final norm.
    """

    prefix_tokens: Optional[torch.FloatTensor] = None


@dataclass
class Dinov3NavitEncoderOutput(BaseModelOutput):
    """`encode`'s output: the patch outputs plus the last sequence `[S, D]` (working order) that holds the prefix."""

    sequence: Optional[torch.FloatTensor] = None


# ----------------------------------------------------------------------------------------------------------------------
# 2D RoPE: patch centres in [-1, 1] per side, training-time augmentation per image
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Dinov3Plan:
    """What DINOv3 plans once per batch on top of the layout (for the training-time RoPE augmentation)."""

    image_ids: torch.Tensor  # [K] image of every patch, working order, on device
    num_images: int


def patch_coordinates(positions: torch.Tensor, grid_sizes: torch.Tensor) -> torch.Tensor:
    """(y, x) of every patch centre in [-1, 1], float32 [K, 2]: row r of h -> 2·(r + 0.5)/h − 1, and the column over
    its own width (each side normalised on its own, as transformers' `get_patches_center_coordinates`)."""
    coords = (positions.to(torch.float32) + 0.5) / grid_sizes.to(torch.float32)  # [K, 2] in [0, 1]
    return 2.0 * coords - 1.0


def _log_uniform(size: int, bound: float, device: torch.device) -> torch.Tensor:
    """`size` draws of exp(U(−log bound, log bound)): a factor in [1/bound, bound]."""
    log_bound = math.log(bound)
    return torch.empty(size, device=device, dtype=torch.float32).uniform_(-log_bound, log_bound).exp()


@torch.compiler.disable  # one draw per image: a host loop that torch.compile must not unroll per batch
def augment_coordinates(coords: torch.Tensor, plan: Dinov3Plan, config: Dinov3NavitConfig) -> torch.Tensor:
    """transformers' training-time augmentation of the RoPE coordinates `coords` [K, 2], drawn independently for
    every image (all frames of a video share a draw). transformers draws once per forward, and its forward sees one
    image when run image by image; the draws here come from the global RNG in the same order and shapes (per image:
    shift [2], jitter [2], rescale [1]), so a seeded run matches transformers' image-by-image train-mode forward."""
    device = coords.device
    shift = torch.zeros(plan.num_images, 2, device=device)
    scale = torch.ones(plan.num_images, 2, device=device)
    for image in range(plan.num_images):
        if config.pos_embed_shift is not None:
            bound = config.pos_embed_shift
            shift[image] = torch.empty(2, device=device).uniform_(-bound, bound)
        if config.pos_embed_jitter is not None:
            scale[image] = _log_uniform(2, config.pos_embed_jitter, device)
        if config.pos_embed_rescale is not None:
            scale[image] = scale[image] * _log_uniform(1, config.pos_embed_rescale, device)
    return (coords + shift[plan.image_ids]) * scale[plan.image_ids]


def rope_cos_sin(coords: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [K, head_dim] (float32) of patches at `coords` [K, 2] = (y, x): angles 2π·coord·inv_freq with
    inv_freq = 1/θ^(arange(0, 1, 4/head_dim)), laid out [y-freqs, x-freqs] and repeated twice (rotate_half)."""
    inv_freq = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32, device=coords.device)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq).flatten(1)  # [K, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # [K, head_dim]
    return angles.cos(), angles.sin()


def prefix_rotation(num_prefix: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows [P, head_dim] of the prefix tokens: the identity (CLS and registers are never rotated)."""
    return torch.ones(num_prefix, head_dim, device=device), torch.zeros(num_prefix, head_dim, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# Modules (names as transformers' DINOv3ViT modules)
# ----------------------------------------------------------------------------------------------------------------------


class Dinov3NavitEmbeddings(nn.Module):
    """Patch embeddings of the kept rows, and every frame's sequence opened by its CLS and register tokens."""

    def __init__(self, config: Dinov3NavitConfig):
        super().__init__()
        hidden = config.hidden_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden))  # masked-patch token (`bool_masked_pos`)
        self.register_tokens = nn.Parameter(torch.empty(1, config.num_register_tokens, hidden))
        self.patch_embeddings = PackedPatchEmbedding(
            config.num_channels, hidden, kernel_size=config.patch_size, stride=config.patch_size
        )

    def prefix_tokens(self) -> torch.Tensor:
        """The tokens every frame's sequence starts with: [P, D] = CLS, then the registers."""
        return torch.cat([self.cls_token[0], self.register_tokens[0]], dim=0)

    def forward(
        self, pixel_values: torch.Tensor, layout: PackedLayout, bool_masked_pos: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        weight = self.patch_embeddings.weight
        rows = self.patch_embeddings.patch_rows(pixel_values, layout)  # [K, C·p·p], working order
        patches = self.patch_embeddings(rows)  # [K, D]
        if bool_masked_pos is not None:
            masked = bool_masked_pos.to(weight.device)[layout.token_rows][:, None]  # [K, 1]
            patches = torch.where(masked, self.mask_token[0].to(patches.dtype), patches)
        return assemble_sequence(layout, patches, self.prefix_tokens())  # [S, D]


class Dinov3NavitAttention(PackedSelfAttention):
    """q/k/v (biases per config: k has none by default) and the output projection `o_proj`."""

    def __init__(self, config: Dinov3NavitConfig):
        biases = (config.query_bias, config.key_bias, config.value_bias)
        super().__init__(config.hidden_size, config.num_attention_heads, config.attention_dropout, bias=biases)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.proj_bias)

    def project_output(self, attn_output: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attn_output)  # [S, D]


class Dinov3NavitLayerScale(nn.Module):
    def __init__(self, config: Dinov3NavitConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(config.layerscale_value * torch.ones(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class Dinov3NavitMLP(nn.Module):
    """`down(act(up(x)))`, or with `use_gated_mlp` `down(act(gate(x)) · up(x))`."""

    def __init__(self, config: Dinov3NavitConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gated = config.use_gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:
            inner = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)  # [S, inner]
        else:
            inner = self.act_fn(self.up_proj(hidden_states))
        return self.down_proj(inner)


@torch.compiler.disable  # per-frame draws over host-known lengths
def _frame_drop_scale(partition: AttentionPartition, drop_rate: float, like: torch.Tensor) -> torch.Tensor:
    """Stochastic depth per frame (transformers drops per sample): [S, 1] of 0 or 1/(1 − rate), one draw per frame."""
    keep = 1.0 - drop_rate
    lengths = partition.cu_seqlens_host.diff().to(like.device)
    draws = torch.floor(torch.rand(lengths.shape[0], dtype=like.dtype, device=like.device) + keep) / keep
    return torch.repeat_interleave(draws, lengths)[:, None]


class Dinov3NavitLayer(PackedEncoderLayer):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); drop path per frame in training."""

    def __init__(self, config: Dinov3NavitConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Dinov3NavitAttention(config)
        self.layer_scale1 = Dinov3NavitLayerScale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Dinov3NavitMLP(config)
        self.layer_scale2 = Dinov3NavitLayerScale(config)
        self.drop_path_rate = config.drop_path_rate
        self.mlp_width = config.intermediate_size * (2 if config.use_gated_mlp else 1)

    def attention_branch(
        self, hidden_states: torch.Tensor, *attention_args
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """`attention_args`: (position_embeddings, partition, attention_interface[, output_attentions]), as the core
        passes them (see `PackedEncoderLayer.attention_branch`)."""
        attended, weights = self.attention(self.norm1(hidden_states), *attention_args)
        return self.layer_scale1(attended), weights  # [S, D]

    def mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layer_scale2(self.mlp(self.norm2(hidden_states)))

    def forward(
        self, hidden_states: torch.Tensor, *attention_args
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """The core's residual block; in training with `drop_path_rate` > 0 each branch is dropped per frame."""
        if not (self.training and self.drop_path_rate > 0):
            return super().forward(hidden_states, *attention_args)
        partition = attention_args[1]
        branch, weights = self.attention_branch(hidden_states, *attention_args)
        hidden_states = hidden_states + branch * _frame_drop_scale(partition, self.drop_path_rate, hidden_states)
        branch = self.mlp_branch(hidden_states)
        hidden_states = hidden_states + branch * _frame_drop_scale(partition, self.drop_path_rate, hidden_states)
        return hidden_states, weights


class Dinov3NavitEncoder(PackedEncoder):
    """The core's layer loop over the model's `layer` list, with DINOv3's RoPE.

    The list is registered on the model itself (as `layer`, the name in transformers' checkpoint files), not here:
    this module holds a plain reference, so parameter names stay `layer.N.…`.
    """

    def __init__(self, config: Dinov3NavitConfig, layers: nn.ModuleList):
        super().__init__(config, [])
        del self._modules["layers"]
        object.__setattr__(self, "layers", layers)  # not a submodule (see the class docstring)

    def rotary_embeddings(self, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [S, head_dim]: patches rotated by their normalised centre, prefix rows the identity."""
        config = self.config
        head_dim = config.hidden_size // config.num_attention_heads
        coords = patch_coordinates(layout.positions, layout.grid_sizes)  # [K, 2]
        if self.training:
            coords = augment_coordinates(coords, layout.family, config)
        cos, sin = rope_cos_sin(coords, head_dim, config.rope_theta)  # [K, head_dim]
        prefix_cos, prefix_sin = prefix_rotation(layout.num_prefix_tokens, head_dim, cos.device)
        return assemble_sequence(layout, cos, prefix_cos), assemble_sequence(layout, sin, prefix_sin)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model
# ----------------------------------------------------------------------------------------------------------------------


class Dinov3NavitPreTrainedModel(PackedPreTrainedModel):
    config_class = Dinov3NavitConfig
    base_model_prefix = "dinov3_navit"
    _no_split_modules = ["Dinov3NavitEmbeddings", "Dinov3NavitLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' DINOv3 initialisation through `nn.init` (guarded by transformers, so loaded weights are
        kept): truncated normal for projections and the CLS/register tokens, zero mask token, constant LayerScale."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Dinov3NavitEmbeddings):
            nn.init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            nn.init.trunc_normal_(module.register_tokens, mean=0.0, std=std)
            nn.init.zeros_(module.mask_token)
        elif isinstance(module, Dinov3NavitLayerScale):
            nn.init.constant_(module.lambda1, self.config.layerscale_value)


def _check_masked_pos(bool_masked_pos: Optional[torch.Tensor], num_rows: int) -> None:
    if bool_masked_pos is None:
        return
    if not isinstance(bool_masked_pos, torch.Tensor) or bool_masked_pos.dtype != torch.bool:
        raise ValueError("`bool_masked_pos` must be a boolean tensor with one entry per row of `pixel_values`.")
    if tuple(bool_masked_pos.shape) != (num_rows,):
        raise ValueError(
            f"`bool_masked_pos` must have shape [{num_rows}] (one entry per row of `pixel_values`), got "
            f"{tuple(bool_masked_pos.shape)}."
        )


class Dinov3NavitModel(Dinov3NavitPreTrainedModel):
    """DINOv3 ViT over packed images: `model(pixel_values, grid_thws)`.

    Inputs: `pixel_values` [Σ t·h·w, C·p·p] patch rows (raster order with `hidden_stride` 1, s×s blocks
    with s) and `grid_thws` [n_images, 3] (t, h, w) in patches. `keep_indices` (optional) encodes only those patch
    rows (NaViT token dropping); the CLS and register tokens of every frame are always kept.
    """

    def __init__(self, config: Dinov3NavitConfig):
        config._validate()  # fields may have changed since the config's __init__ (from_pretrained overrides)
        super().__init__(config)
        self.embeddings = Dinov3NavitEmbeddings(config)
        self.layer = nn.ModuleList([Dinov3NavitLayer(config) for _ in range(config.num_hidden_layers)])
        self.encoder = Dinov3NavitEncoder(config, self.layer)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    # -- planning hooks of the shared core --
    def _layout_options(self) -> dict:
        return {"num_prefix_tokens": self.config.num_prefix_tokens}

    def _has_pooler(self) -> bool:
        return True  # every frame's CLS token

    def _plan_family(self, layout: PackedLayout, grids: Sequence[tuple[int, int, int]]) -> Dinov3Plan:
        frame_image = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor([t for t, _, _ in grids]))
        image_ids = frame_image[layout.host_frame_ids].to(layout.positions.device)
        return Dinov3Plan(image_ids=image_ids, num_images=len(grids))

    def _family_inputs(self, pixel_values: torch.Tensor, kwargs: dict) -> dict:
        """`bool_masked_pos` (`torch.BoolTensor` of shape `[Σ t·h·w]`, *optional*): patches replaced by the mask token
        (transformers' `bool_masked_pos`, one entry per packed row)."""
        bool_masked_pos = kwargs.pop("bool_masked_pos", None)
        _check_masked_pos(bool_masked_pos, pixel_values.shape[0])
        return {**super()._family_inputs(pixel_values, kwargs), "bool_masked_pos": bool_masked_pos}

    def encode(
        self,
        pixel_values: torch.Tensor,
        layout: PackedLayout,
        output_attentions: bool,
        output_hidden_states: bool,
        bool_masked_pos: Optional[torch.Tensor] = None,
    ) -> Dinov3NavitEncoderOutput:
        """Embeddings, layers and the final norm of the patches (input order); also the last sequence [S, D]."""
        hidden_states = self.embeddings(pixel_values, layout, bool_masked_pos)  # [S, D], working order
        encoded, sequence = self.encoder.encode_and_restore(
            hidden_states, layout, self.norm, output_attentions, output_hidden_states
        )
        return Dinov3NavitEncoderOutput(sequence=sequence, **encoded)

    def wrap_outputs(
        self, encoded: Dinov3NavitEncoderOutput, layout: PackedLayout, return_dict: bool
    ) -> Union[Dinov3NavitModelOutput, tuple]:
        """The patch outputs plus every frame's prefix tokens after the final norm (CLS = `pooler_output`)."""
        prefix_tokens = self.norm(encoded.sequence[layout.prefix_index])  # [F, P, D]
        outputs = Dinov3NavitModelOutput(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=prefix_tokens[:, 0],
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            prefix_tokens=prefix_tokens,
        )
        return outputs if return_dict else outputs.to_tuple()


Dinov3NavitModel.register_for_auto_class("AutoModel")  # save_pretrained then writes auto_map + the .py files

__all__ = ["Dinov3NavitModelOutput", "Dinov3NavitPreTrainedModel", "Dinov3NavitModel"]
