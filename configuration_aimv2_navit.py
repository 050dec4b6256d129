# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the AIMv2 NaViT vision encoder: transformers' `Aimv2VisionConfig` fields and defaults, plus the
packed-input fields (`hidden_stride`, `temporal_patch_size`, `cpu_block_tokens`)."""

from typing import TYPE_CHECKING, Optional

from transformers import PretrainedConfig

from .navit_core import check_dtype_settings, validate_packed_config

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


_BOOLS = ("qkv_bias", "mlp_bias", "use_head", "is_native")


class Aimv2NavitConfig(PretrainedConfig):
    r"""
    Configuration of [`Aimv2NavitModel`], the AIMv2 vision encoder over images of any size packed into one sequence
    (NaViT). Field names and defaults are those of transformers' `Aimv2VisionConfig` (apple/aimv2-large-patch14-224),
    so a transformers checkpoint's config maps one to one.

    Args:
        hidden_size (`int`, *optional*, defaults to 1024): width of the encoder.
        intermediate_size (`int`, *optional*, defaults to 2816): width of the SwiGLU MLP.
        num_hidden_layers (`int`, *optional*, defaults to 24): number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8): attention heads per layer (and in the pooling head).
        num_channels (`int`, *optional*, defaults to 3): image channels.
        image_size (`int`, *optional*, defaults to 224): the trained resolution. Checkpoints with a learned position
            table (`is_native=False`) only accept grids of `image_size // patch_size` patches per side.
        patch_size (`int`, *optional*, defaults to 14): side of a square patch in pixels.
        hidden_act (`str`, *optional*, defaults to `"silu"`): activation of the SwiGLU gate.
        attention_dropout (`float`, *optional*, defaults to 0.0): dropout on attention probabilities (training only).
        rms_norm_eps (`float`, *optional*, defaults to 1e-5): RMSNorm epsilon.
        qkv_bias (`bool`, *optional*, defaults to `False`): biases on the q/k/v/out projections (and the head's k/v).
        mlp_bias (`bool`, *optional*, defaults to `False`): biases on the MLP projections.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the pooling head's query at init.
        use_head (`bool`, *optional*, defaults to `True`): attention-pooling head (`pooler_output [n_images, D]`).
        is_native (`bool`, *optional*, defaults to `False`): native-resolution checkpoint: a fixed 2D sin-cos position
            embedding of each patch's (row, col), any grid. `False`: a learned table for the trained grid only.
        hidden_stride (`int`, *optional*, defaults to 1): token order of the packed input: 1 is raster order, s orders
            every frame in `s × s` blocks (blocks in raster order, each block's patches in raster order), ready for
            an LLM-side merger.
        temporal_patch_size (`int`, *optional*, defaults to 1): frames per patch; AIMv2 is an image model, so 1.
        cpu_block_tokens (`int`, *optional*, defaults to 4096): CPU inference runs each layer over blocks of whole
            frames of at most this many tokens (same outputs, block-sized intermediates); `None` disables it.
    """

    model_type = "aimv2_navit"

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 2816,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 8,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 14,
        hidden_act: str = "silu",
        attention_dropout: float = 0.0,
        rms_norm_eps: float = 1e-5,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        initializer_range: float = 0.02,
        use_head: bool = True,
        is_native: bool = False,
        hidden_stride: int = 1,
        temporal_patch_size: int = 1,
        cpu_block_tokens: Optional[int] = 4096,
        **kwargs,
    ):
        check_dtype_settings(kwargs)  # before transformers resolves a dtype name to a torch attribute
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.initializer_range = initializer_range
        self.use_head = use_head
        self.is_native = is_native
        self.hidden_stride = hidden_stride
        self.temporal_patch_size = temporal_patch_size
        self.cpu_block_tokens = cpu_block_tokens
        self._validate()

    @property
    def position_grid(self) -> int:
        """Patches per side of the learned position table (`is_native=False`): the trained grid."""
        return self.image_size // self.patch_size

    def _validate(self) -> None:
        """Check every field (at init, and again when a model is built: `from_pretrained` overrides and direct
        assignments bypass `__init__`)."""
        validate_packed_config(
            self, frames_per_patch=1, positive_floats=("rms_norm_eps",), fractions=("attention_dropout",), bools=_BOOLS
        )
        if self.is_native and self.hidden_size % 4:
            raise ValueError(
                f"The 2D sin-cos position embedding of native checkpoints needs `hidden_size` divisible by 4, got "
                f"{self.hidden_size}."
            )
        if not self.is_native and self.image_size < self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be at least `patch_size` ({self.patch_size}).")


Aimv2NavitConfig.register_for_auto_class()  # save_pretrained then writes auto_map for AutoConfig

__all__ = ["Aimv2NavitConfig"]
