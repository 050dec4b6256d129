# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the SigLIP2 NaViT vision encoder (the Ovis2.5 vision tower)."""

from typing import TYPE_CHECKING, Optional, Union

from transformers import PretrainedConfig

from .navit_core import check_dtype_settings, validate_packed_config

if TYPE_CHECKING:  # never run: names the core's modules for transformers < 5, which copies a local folder's remote code
    from .navit_attention import PACKED_ATTENTION_FUNCTIONS  # noqa: F401  (only the files each module imports itself)
    from .navit_image_utils import block_order_position  # noqa: F401
    from .navit_layout import MAX_CONFIG_INTS  # noqa: F401


_PE_INTERPOLATIONS = ("bicubic", "bilinear")


def _parse_fullatt_block_indexes(value: Union[None, str, list, tuple]) -> Optional[list[int]]:
    """Normalise `fullatt_block_indexes`: `None`, a list of ints, or the legacy Ovis string form `"7|15|23"`."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return None
        try:
            return [int(part) for part in value.split("|")]
        except ValueError:
            raise ValueError(
                f"`fullatt_block_indexes` string must look like '7|15|23' (layer ids separated by '|'), got {value!r}."
            ) from None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"`fullatt_block_indexes` must hold integer layer ids, got {value!r}.")
        return list(value)
    raise ValueError(
        f"`fullatt_block_indexes` must be None, a list of layer ids or a '7|15|23' string, got {type(value).__name__}."
    )


class Siglip2NavitConfig(PretrainedConfig):
    r"""
    Configuration of [`Siglip2NavitModel`], a SigLIP2 vision transformer that encodes images of any size and
    aspect ratio packed into one sequence (NaViT). The defaults are the SigLIP2 so400m/16 vision tower used by
    Ovis2.5.

    Args:
        hidden_size (`int`, *optional*, defaults to 1152): width of the encoder.
        intermediate_size (`int`, *optional*, defaults to 4304): width of the MLP.
        num_hidden_layers (`int`, *optional*, defaults to 27): number of encoder layers.
        num_attention_heads (`int`, *optional*, defaults to 16): attention heads per layer.
        num_channels (`int`, *optional*, defaults to 3): image channels.
        patch_size (`int`, *optional*, defaults to 16): side of a square patch in pixels.
        temporal_patch_size (`int`, *optional*, defaults to 1): frames folded into one patch.
        image_size (`int`, *optional*, defaults to 512): the learned position-embedding grid is
            `(image_size // patch_size)²`.
        hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`): MLP activation.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): layer-norm epsilon.
        attention_dropout (`float`, *optional*, defaults to 0.0): dropout on attention probabilities (training only).
        hidden_stride (`int`, *optional*, defaults to 2): tokens are ordered in `hidden_stride × hidden_stride`
            blocks, ready for an LLM-side merger that fuses each block into one token.
        window_size (`int`, *optional*, defaults to 112): side in pixels of the attention window of windowed layers.
        fullatt_block_indexes (`list[int]` or `str`, *optional*): layers with full (per-frame) attention; the others
            attend within windows. `None` means every layer attends to its whole frame. The legacy string form
            `"7|15|23"` is accepted.
        preserve_original_pe (`bool`, *optional*, defaults to `True`): add the learned (resized) position embedding.
        use_rope (`bool`, *optional*, defaults to `True`): apply 2D rotary position embeddings to queries and keys.
        rope_theta (`float`, *optional*, defaults to 10000.0): RoPE base.
        pe_interpolation (`str`, *optional*, defaults to `"bicubic"`): how the learned position embedding is resized,
            `"bicubic"` (Ovis) or `"bilinear"` (SigLIP2 naflex).
        pe_antialias (`bool`, *optional*, defaults to `False`): antialias when resizing the position embedding
            (`True` for SigLIP2 naflex checkpoints).
        vision_use_head (`bool`, *optional*, defaults to `False`): add SigLIP's multi-head attention pooling head.
        num_patches (`int`, *optional*, defaults to -1): legacy Ovis field, kept for compatibility and ignored.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal init of new weights.
        cpu_block_tokens (`int`, *optional*, defaults to 4096): CPU inference (eval mode, no autograd, not compiled)
            runs each layer block by block, a block being consecutive whole attention sequences (frames or windows)
            of at most this many tokens, so that every intermediate is block-sized: it stays in cache and the memory
            allocator recycles it instead of mapping fresh pages for every op. Same outputs as one op over all
            tokens; `None` disables it (the GPU and training path is never blocked).
    """

    model_type = "siglip2_navit"

    def __init__(
        self,
        hidden_size: int = 1152,
        intermediate_size: int = 4304,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        patch_size: int = 16,
        temporal_patch_size: int = 1,
        image_size: int = 512,
        hidden_act: str = "gelu_pytorch_tanh",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_stride: int = 2,
        window_size: int = 112,
        fullatt_block_indexes: Union[None, str, list[int]] = None,
        preserve_original_pe: bool = True,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        pe_interpolation: str = "bicubic",
        pe_antialias: bool = False,
        vision_use_head: bool = False,
        num_patches: int = -1,
        initializer_range: float = 0.02,
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
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.image_size = image_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_stride = hidden_stride
        self.window_size = window_size
        self.fullatt_block_indexes = fullatt_block_indexes  # parsed by __setattr__
        self.preserve_original_pe = preserve_original_pe
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.pe_interpolation = pe_interpolation
        self.pe_antialias = pe_antialias
        self.vision_use_head = vision_use_head
        self.num_patches = num_patches
        self.initializer_range = initializer_range
        self.cpu_block_tokens = cpu_block_tokens
        self._validate()

    def __setattr__(self, key, value):
        # Parsed on every assignment, not only in __init__: `from_pretrained(..., fullatt_block_indexes="7|15")` and
        # `config.fullatt_block_indexes = ...` set the attribute directly.
        if key == "fullatt_block_indexes":
            value = _parse_fullatt_block_indexes(value)
        super().__setattr__(key, value)

    def _validate(self) -> None:
        """Check field values and their consistency (at init and again when a model is built from the config, since
        `from_pretrained` overrides and direct assignments bypass `__init__`)."""
        validate_packed_config(
            self,
            extra_ints=("window_size",),
            positive_floats=("layer_norm_eps", "rope_theta"),
            fractions=("attention_dropout",),
            bools=("preserve_original_pe", "use_rope", "pe_antialias", "vision_use_head"),
        )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.use_rope and head_dim % 4 != 0:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got head_dim={head_dim}.")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )
        if self.pe_interpolation not in _PE_INTERPOLATIONS:
            raise ValueError(f"`pe_interpolation` must be one of {_PE_INTERPOLATIONS}, got {self.pe_interpolation!r}.")
        if self.fullatt_block_indexes is not None:
            bad = [i for i in self.fullatt_block_indexes if not -self.num_hidden_layers <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"`fullatt_block_indexes` {bad} are out of range for {self.num_hidden_layers} layers."
                )
            if self.window_size // self.hidden_stride // self.patch_size < 1:
                raise ValueError(
                    f"`window_size` ({self.window_size} px) is smaller than one {self.hidden_stride}×{self.hidden_stride}"
                    f" block of {self.patch_size}-px patches; windowed layers need at least one block per window."
                )

    @property
    def window_blocks(self) -> int:
        """Window side in `hidden_stride × hidden_stride` blocks (Ovis: `window_size // hidden_stride // patch_size`)."""
        return self.window_size // self.hidden_stride // self.patch_size

    def is_full_attention_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` attends to whole frames (`True`) or within windows (`False`)."""
        if self.fullatt_block_indexes is None:
            return True
        n = self.num_hidden_layers
        return any(layer_idx == i % n for i in self.fullatt_block_indexes)


Siglip2NavitConfig.register_for_auto_class()  # save_pretrained then writes auto_map for AutoConfig

__all__ = ["Siglip2NavitConfig"]
