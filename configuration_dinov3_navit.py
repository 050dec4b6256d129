# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the DINOv3 NaViT vision encoder: transformers' `DINOv3ViTConfig` fields and defaults, plus the
packed-input fields (`hidden_stride`, `temporal_patch_size`, `cpu_block_tokens`)."""

from typing import TYPE_CHECKING, Optional

from transformers import PretrainedConfig

from .navit_core import check_dtype_settings, is_int, is_real, validate_packed_config

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


class Dinov3NavitConfig(PretrainedConfig):
    r"""
    Configuration of [`Dinov3NavitModel`], DINOv3's ViT encoding images of any size and aspect ratio packed into one
    sequence. Field names and defaults are transformers' `DINOv3ViTConfig` (ViT-S/16), so that its checkpoints load
    unchanged; the packed-input fields come on top.

    Args:
        patch_size (`int`, *optional*, defaults to 16): side of a square patch in pixels.
        hidden_size (`int`, *optional*, defaults to 384): width of the encoder.
        intermediate_size (`int`, *optional*, defaults to 1536): width of the MLP.
        num_hidden_layers (`int`, *optional*, defaults to 12): number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 6): attention heads per layer (head_dim divisible by 4).
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation.
        attention_dropout (`float`, *optional*, defaults to 0.0): dropout on attention probabilities (training only).
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal init of new weights.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): layer-norm epsilon.
        rope_theta (`float`, *optional*, defaults to 100.0): base period of the 2D RoPE.
        image_size (`int`, *optional*, defaults to 224): the pretraining resolution (informative: every grid works).
        num_channels (`int`, *optional*, defaults to 3): image channels.
        query_bias, key_bias, value_bias, proj_bias, mlp_bias (`bool`, *optional*): biases of the q/k/v/output
            projections and of the MLP (defaults `True`, `False`, `True`, `True`, `True`).
        layerscale_value (`float`, *optional*, defaults to 1.0): initial LayerScale value.
        drop_path_rate (`float`, *optional*, defaults to 0.0): stochastic depth (training only), drawn per frame.
        use_gated_mlp (`bool`, *optional*, defaults to `False`): SwiGLU-style gated MLP instead of the GELU MLP.
        num_register_tokens (`int`, *optional*, defaults to 0): register tokens after the CLS token of every frame.
        pos_embed_shift (`float`, *optional*): training-only RoPE augmentation: coordinates shifted by a uniform value
            in [-shift, shift] (per axis, drawn per image).
        pos_embed_jitter (`float`, *optional*): training-only: coordinates scaled by a log-uniform value in
            [1/jitter, jitter] (per axis, per image).
        pos_embed_rescale (`float`, *optional*, defaults to 2.0): training-only: coordinates scaled by a log-uniform
            value in [1/rescale, rescale] (both axes alike, per image).
        hidden_stride (`int`, *optional*, defaults to 1): token order of the packed rows: 1 is raster order, s orders
            each frame in s×s blocks (blocks in raster order, each block's patches in raster order), ready for an
            LLM-side merger.
        temporal_patch_size (`int`, *optional*, defaults to 1): frames per patch; DINOv3 embeds single frames (1).
        cpu_block_tokens (`int`, *optional*, defaults to 4096): CPU inference runs each layer block by block over
            whole frames of at most this many tokens (same outputs, block-sized intermediates); `None` disables it.
    """

    model_type = "dinov3_navit"

    def __init__(
        self,
        patch_size: int = 16,
        hidden_size: int = 384,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        hidden_act: str = "gelu",
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        rope_theta: float = 100.0,
        image_size: int = 224,
        num_channels: int = 3,
        query_bias: bool = True,
        key_bias: bool = False,
        value_bias: bool = True,
        proj_bias: bool = True,
        mlp_bias: bool = True,
        layerscale_value: float = 1.0,
        drop_path_rate: float = 0.0,
        use_gated_mlp: bool = False,
        num_register_tokens: int = 0,
        pos_embed_shift: Optional[float] = None,
        pos_embed_jitter: Optional[float] = None,
        pos_embed_rescale: Optional[float] = 2.0,
        hidden_stride: int = 1,
        temporal_patch_size: int = 1,
        cpu_block_tokens: Optional[int] = 4096,
        **kwargs,
    ):
        check_dtype_settings(kwargs)  # before transformers resolves a dtype name to a torch attribute
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.image_size = image_size
        self.num_channels = num_channels
        self.query_bias = query_bias
        self.key_bias = key_bias
        self.value_bias = value_bias
        self.proj_bias = proj_bias
        self.mlp_bias = mlp_bias
        self.layerscale_value = layerscale_value
        self.drop_path_rate = drop_path_rate
        self.use_gated_mlp = use_gated_mlp
        self.num_register_tokens = num_register_tokens
        self.pos_embed_shift = pos_embed_shift
        self.pos_embed_jitter = pos_embed_jitter
        self.pos_embed_rescale = pos_embed_rescale
        self.hidden_stride = hidden_stride
        self.temporal_patch_size = temporal_patch_size
        self.cpu_block_tokens = cpu_block_tokens
        self._validate()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens opening every frame's sequence: the CLS token and the registers."""
        return 1 + self.num_register_tokens

    def _validate(self) -> None:
        """Check field values and their consistency (at init and again when a model is built from the config)."""
        validate_packed_config(
            self,
            frames_per_patch=1,
            positive_floats=("layer_norm_eps", "rope_theta"),
            fractions=("attention_dropout", "drop_path_rate"),
            bools=("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias", "use_gated_mlp"),
        )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 4:
            raise ValueError(f"DINOv3's 2D RoPE needs head_dim divisible by 4, got head_dim={head_dim}.")
        if not is_int(self.num_register_tokens) or self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be a non-negative integer, got {self.num_register_tokens!r}.")
        self._validate_augmentation()

    def _validate_augmentation(self) -> None:
        shift = self.pos_embed_shift
        if shift is not None and (not is_real(shift) or shift < 0):
            raise ValueError(f"`pos_embed_shift` must be None or a number >= 0, got {shift!r}.")
        for name in ("pos_embed_jitter", "pos_embed_rescale"):
            value = getattr(self, name)
            if value is not None and (not is_real(value) or value < 1):
                raise ValueError(
                    f"`{name}` must be None or a number >= 1 (a log-uniform factor in [1/{name[10:]}, {name[10:]}]), "
                    f"got {value!r}."
                )


Dinov3NavitConfig.register_for_auto_class()  # save_pretrained then writes auto_map for AutoConfig

__all__ = ["Dinov3NavitConfig"]
