# Copyright 2025 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Image processor for the native-resolution SigLIP2 NaViT vision encoder (Ovis2.5 vision tower).

The processor turns images and videos into the packed inputs the model consumes:

* ``pixel_values``: float32 ``[N, C * T * p * p]``, one row per patch, each row flattened in the order
  (channel, temporal, row-in-patch, col-in-patch);
* ``grid_thws``: int64 ``[n, 3]``, one ``(t, h, w)`` row (in patch units) per image or video.

Inside one frame, patches are ordered by ``hidden_stride`` x ``hidden_stride`` blocks: for each block row, each block
column, the ``s * s`` patches of the block in raster order (with ``s = 1`` this is plain raster order).

Resizing reproduces the Ovis2.5 pipeline exactly: the image is converted to uint8 RGB with PIL's ``convert("RGB")``,
resized with PIL (bilinear by default) to the size chosen by :func:`smart_resize`, then rescaled by 1/255 and
normalised with mean = std = 0.5 in float32. The result equals transformers' ``SiglipImageProcessor`` (the PIL one)
run with ``size={"height": h, "width": w}`` on the same RGB image.

Input conversion and the naflex / centre-crop resize rules live in `navit_image_utils.py`; the NaViT batching
utilities (`pack_by_token_budget`, `collate_packed`, `sample_max_pixels`, `naflex_to_packed`) live in
`navit_batching.py` and are re-exported here and reachable as static methods of the processor.
"""

import functools
import math
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import PIL.Image

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import TensorType, logging


try:  # transformers >= 4.42
    from transformers.processing_utils import ImagesKwargs as _ImagesKwargsBase
except ImportError:  # pragma: no cover - very old transformers
    from typing import TypedDict as _TypedDict

    class _ImagesKwargsBase(_TypedDict, total=False):
        pass


try:
    import torch

    _TORCH_AVAILABLE = True
except ImportError:  # pragma: no cover - torch is a hard dependency of the model, not of this module
    torch = None
    _TORCH_AVAILABLE = False


from .navit_batching import collate_packed, naflex_to_packed, pack_by_token_budget, sample_max_pixels
from .navit_image_utils import (
    RESIZE_RULES,
    ResizePlan,
    _as_int,
    _finite_float,
    _make_image_list,
    _make_video_list,
    _positive_int,
    block_order_raster_index,
    center_crop_plan,
    check_center_crop,
    naflex_resize,
    open_image,
    to_rgb_uint8,
)


logger = logging.get_logger(__name__)


OVIS_MEAN = (0.5, 0.5, 0.5)
OVIS_STD = (0.5, 0.5, 0.5)
MAX_ASPECT_RATIO = 200

_VALID_RESAMPLE = {int(r): r.name for r in PIL.Image.Resampling}
_ALPHA_DROP_NOTE = (
    "transparency is dropped as PIL's convert('RGB') does (Ovis2.5 semantics); composite onto a background "
    "yourself before calling the processor if you want that instead"
)


class Siglip2NavitImagesKwargs(_ImagesKwargsBase, total=False):
    """Keyword arguments accepted by [`Siglip2NavitImageProcessor`] on top of the standard `ImagesKwargs`."""

    min_pixels: Optional[int]
    max_pixels: Optional[int]
    patch_size: Optional[int]
    temporal_patch_size: Optional[int]
    hidden_stride: Optional[int]
    resize_rule: Optional[str]
    max_num_patches: Optional[int]


class TokenCount(NamedTuple):
    """What one image (or video) costs the vision tower.

    Attributes:
        num_patches (`int`): rows of `pixel_values`, i.e. `t * h * w` (the sequence length seen by the ViT).
        num_tokens (`int`): tokens after the LLM-side `hidden_stride x hidden_stride` merge,
            i.e. `num_patches // hidden_stride**2`.
    """

    num_patches: int
    num_tokens: int



# The largest pixel budget a processor accepts: 8192 x 8192 pixels (21x Ovis2.5's 1792^2 default; 262,144 patches of
# 16 px). A larger budget would make one image's float32 patches alone outgrow a machine's memory (1e11 pixels:
# 1.2 TB), so it is refused at load and at call instead of being found by the OOM killer.
MAX_PIXEL_BUDGET = 8192 * 8192


def validate_pixel_budget(min_pixels: Any, max_pixels: Any, factor: int) -> Tuple[int, int]:
    """Check a `(min_pixels, max_pixels)` budget for a resize factor and return it as Python ints.

    Raises:
        ValueError: if a budget is not a positive integer, if it exceeds `MAX_PIXEL_BUDGET` (8192 x 8192), if
            `min_pixels > max_pixels`, or if `max_pixels` is smaller than one `factor x factor` tile (no image could
            then be resized into the budget).
    """
    min_pixels = _positive_int(min_pixels, "min_pixels")
    max_pixels = _positive_int(max_pixels, "max_pixels")
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value > MAX_PIXEL_BUDGET:
            raise ValueError(
                f"`{name}` = {value} exceeds the largest supported budget of {MAX_PIXEL_BUDGET} pixels (8192 x 8192)."
            )
    if min_pixels > max_pixels:
        raise ValueError(
            f"`min_pixels` ({min_pixels}) must not be larger than `max_pixels` ({max_pixels}). When you lower "
            f"`max_pixels` below the processor's default `min_pixels`, pass a smaller `min_pixels` too."
        )
    if max_pixels < factor * factor:
        raise ValueError(
            f"`max_pixels` ({max_pixels}) is too small for a single {factor}x{factor} tile "
            f"(factor = patch_size * hidden_stride = {factor}); it must be at least {factor * factor}."
        )
    return min_pixels, max_pixels


# ----------------------------------------------------------------------------------------------------------------------
# smart_resize
# ----------------------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """Target `(height, width)` for an image, reproducing Ovis2.5's `smart_resize` arithmetic exactly.

    1. If a side is smaller than `factor`, scale so the short side becomes `factor` (the other side becomes
       `round(factor / short * long)`); otherwise, if the aspect ratio exceeds 200, clamp the long side to
       `200 * short`.
    2. Round both sides to the nearest multiple of `factor` (Python `round`, i.e. half to even).
    3. If the area exceeds `max_pixels`: `beta = sqrt(height * width / max_pixels)` and each side becomes
       `floor(side / beta / factor) * factor`; else, if the area is below `min_pixels`:
       `beta = sqrt(min_pixels / (height * width))` and each side becomes `ceil(side * beta / factor) * factor`.

    On top of Ovis2.5, this function never returns a side smaller than `factor` (Ovis can return 0 for extremely
    elongated images, e.g. 1x5000): such a side is raised to `factor` and the other side is then shortened, if
    needed, so that the area stays within `max_pixels`. Bad budgets are rejected with a `ValueError`.

    Args:
        height (`int`): original image height in pixels.
        width (`int`): original image width in pixels.
        factor (`int`): `patch_size * hidden_stride`; both output sides are multiples of it.
        min_pixels (`int`): lower bound of the pixel budget.
        max_pixels (`int`): upper bound of the pixel budget.

    Returns:
        `Tuple[int, int]`: `(height, width)` of the resized image, both positive multiples of `factor`.
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    factor = _positive_int(factor, "factor")
    min_pixels, max_pixels = validate_pixel_budget(min_pixels, max_pixels, factor)

    # Step 1 (Ovis2.5).
    if height < factor or width < factor:
        if height < width:
            width = round(factor / height * width)
            height = factor
        else:
            height = round(factor / width * height)
            width = factor
    elif max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        if height > width:
            height = MAX_ASPECT_RATIO * width
        else:
            width = MAX_ASPECT_RATIO * height

    # Step 2.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor

    # Step 3.
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor

    # Extra guarantee: no side below one tile, and the area still within max_pixels.
    if h_bar < factor or w_bar < factor:
        max_tiles = max_pixels // (factor * factor)  # >= 1, checked above
        if h_bar < factor:
            h_bar = factor
            w_bar = min(max(w_bar, factor), max_tiles * factor)
        else:
            w_bar = factor
            h_bar = min(max(h_bar, factor), max_tiles * factor)
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------------------------------
# the processor
# ----------------------------------------------------------------------------------------------------------------------


class Siglip2NavitImageProcessor(BaseImageProcessor):
    r"""
    Constructs a native-resolution NaViT image processor (by default the Ovis2.5 vision-tower preprocessing).

    Each image is resized by the processor's `resize_rule`, then cut into patches that are packed, for all images of
    the call, into one `pixel_values` matrix, with one `grid_thws` row per image:

    * `"ovis"` (default; Ovis2.5 and the SigLIP2 so400m towers): the aspect ratio is kept, the sides become multiples
      of `patch_size * hidden_stride` and the area lies in `[min_pixels, max_pixels]` ([`smart_resize`]; up to
      rounding: an enlarged image rounds its sides up, so with a narrow budget its area can pass `max_pixels`);
    * `"naflex"` (converted SigLIP2 naflex checkpoints): the aspect ratio is kept and the grid is the largest with at
      most `max_num_patches` patches ([`naflex_resize`], the grid of transformers' `Siglip2ImageProcessor`);
    * `"center_crop"` (fixed-size checkpoints such as AIMv2's 224-px ones): the short side is resized to
      `shortest_edge` and the centred `crop_size` window is kept ([`center_crop_plan`], as `CLIPImageProcessor`).

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize (and crop) by `resize_rule`. With `False`, the image sides must already be multiples
            of `patch_size * hidden_stride`.
        resize_rule (`str`, *optional*, defaults to `"ovis"`):
            `"ovis"`, `"naflex"` or `"center_crop"` (see above).
        max_num_patches (`int`, *optional*, defaults to 256):
            Patch budget of one image (or video frame) under the `"naflex"` rule.
        shortest_edge (`int`, *optional*):
            Short side after resizing under the `"center_crop"` rule.
        crop_size (`int`, `(height, width)` or `{"height": ..., "width": ...}`, *optional*):
            Window kept under the `"center_crop"` rule; stored as `[height, width]`.
        resample (`PILImageResampling` or `int`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            PIL resampling filter.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the uint8 pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Rescale factor.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `image_mean` and `image_std`.
        image_mean (`float` or `List[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel mean.
        image_std (`float` or `List[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel standard deviation.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert inputs to RGB (PIL `convert("RGB")` semantics, see [`to_rgb_uint8`]).
        min_pixels (`int`, *optional*, defaults to `448 * 448`):
            Lower bound of the pixel budget of one image (or video frame).
        max_pixels (`int`, *optional*, defaults to `1792 * 1792`):
            Upper bound of the pixel budget of one image (or video frame).
        patch_size (`int`, *optional*, defaults to 16):
            Spatial patch size `p`; must equal the model's `config.patch_size`.
        temporal_patch_size (`int`, *optional*, defaults to 1):
            Frames folded into one patch `T`; must equal the model's `config.temporal_patch_size`.
        hidden_stride (`int`, *optional*, defaults to 2):
            Side `s` of the patch groups merged by the LLM adapter; must equal the model's `config.hidden_stride`.
        size (`dict`, *optional*):
            Alias for the pixel budget as transformers' Qwen2-VL processor spells it:
            `{"min_pixels": ..., "max_pixels": ...}` or `{"shortest_edge": ..., "longest_edge": ...}`.
            It is not stored; `min_pixels`/`max_pixels` are.
    """

    model_input_names = ["pixel_values", "grid_thws"]
    valid_kwargs = Siglip2NavitImagesKwargs

    # Class-level defaults (the instance attributes set in __init__ are what gets saved).
    do_resize = True
    resample = int(PIL.Image.Resampling.BILINEAR)
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = list(OVIS_MEAN)
    image_std = list(OVIS_STD)
    do_convert_rgb = True
    min_pixels = 448 * 448
    max_pixels = 1792 * 1792
    patch_size = 16
    temporal_patch_size = 1
    hidden_stride = 2
    resize_rule = "ovis"
    max_num_patches = 256
    shortest_edge = None
    crop_size = None

    def __init__(
        self,
        do_resize: bool = True,
        resample: Union[int, "PIL.Image.Resampling"] = PIL.Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: Union[int, float] = 1 / 255,
        do_normalize: bool = True,
        image_mean: Optional[Union[float, List[float]]] = None,
        image_std: Optional[Union[float, List[float]]] = None,
        do_convert_rgb: bool = True,
        min_pixels: int = 448 * 448,
        max_pixels: int = 1792 * 1792,
        patch_size: int = 16,
        temporal_patch_size: int = 1,
        hidden_stride: int = 2,
        size: Optional[Dict[str, int]] = None,
        resize_rule: str = "ovis",
        max_num_patches: int = 256,
        shortest_edge: Optional[int] = None,
        crop_size: Optional[Union[int, List[int], Dict[str, int]]] = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = _positive_int(patch_size, "patch_size")
        self.temporal_patch_size = _positive_int(temporal_patch_size, "temporal_patch_size")
        self.hidden_stride = _positive_int(hidden_stride, "hidden_stride")
        min_pixels, max_pixels = self._resolve_size_alias(size, min_pixels, max_pixels, None, None)
        self.min_pixels, self.max_pixels = validate_pixel_budget(min_pixels, max_pixels, self.factor)
        self.do_resize = bool(do_resize)
        self.resample = self._validate_resample(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = self._validate_rescale_factor(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = self._validate_stats(OVIS_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = self._validate_stats(OVIS_STD if image_std is None else image_std, "image_std")
        self.do_convert_rgb = bool(do_convert_rgb)
        self.resize_rule = self._validate_resize_rule(resize_rule)
        self.max_num_patches = self._validate_max_num_patches(max_num_patches, self.hidden_stride)
        self.shortest_edge, self.crop_size = shortest_edge, crop_size
        if shortest_edge is not None or crop_size is not None or self.resize_rule == "center_crop":
            self.shortest_edge, crop = check_center_crop(shortest_edge, crop_size, self.factor)
            self.crop_size = list(crop)

    # -- small helpers ---------------------------------------------------------------------------------------------

    @property
    def factor(self) -> int:
        """`patch_size * hidden_stride`: both sides of a resized image are multiples of it."""
        return self.patch_size * self.hidden_stride

    @staticmethod
    def _validate_resample(resample: Any) -> int:
        value = _as_int(resample, "resample")
        if value not in _VALID_RESAMPLE:
            raise ValueError(
                f"`resample` must be a PIL resampling filter ({_VALID_RESAMPLE}), got {resample!r}."
            )
        return value

    @staticmethod
    def _validate_stats(values: Any, name: str) -> List[float]:
        """Three finite per-channel values (one number is used for all three); `image_std`'s must be positive."""
        values = [values] * 3 if np.ndim(values) == 0 else list(values)
        if len(values) != 3:
            raise ValueError(f"`{name}` must have 3 values (one per RGB channel), got {len(values)}: {values}.")
        values = [_finite_float(v, f"{name}[{i}]") for i, v in enumerate(values)]
        if name == "image_std" and any(v <= 0.0 for v in values):
            raise ValueError(f"`image_std` must not contain zeros or negative values (it divides), got {values}.")
        return values

    @staticmethod
    def _validate_rescale_factor(value: Any) -> float:
        """A finite, positive `rescale_factor`."""
        value = _finite_float(value, "rescale_factor")
        if value <= 0.0:
            raise ValueError(f"`rescale_factor` must be positive, got {value}.")
        return value

    @staticmethod
    def _resolve_size_alias(
        size: Optional[Dict[str, int]],
        min_pixels: Any,
        max_pixels: Any,
        explicit_min: Any,
        explicit_max: Any,
    ) -> Tuple[Any, Any]:
        """Apply a Qwen2-VL style `size` dict; explicit `min_pixels`/`max_pixels` must agree with it."""
        if size is None:
            return min_pixels, max_pixels
        if not isinstance(size, dict):
            raise ValueError(f"`size` must be a dict with the pixel budget, got {size!r}.")
        keys = set(size)
        if keys == {"min_pixels", "max_pixels"}:
            size_min, size_max = size["min_pixels"], size["max_pixels"]
        elif keys == {"shortest_edge", "longest_edge"}:
            size_min, size_max = size["shortest_edge"], size["longest_edge"]
        else:
            raise ValueError(
                f"`size` must have the keys ('min_pixels', 'max_pixels') or ('shortest_edge', 'longest_edge') "
                f"(pixel counts, as in Qwen2-VL), got {sorted(keys)}."
            )
        for name, explicit, from_size in (("min_pixels", explicit_min, size_min), ("max_pixels", explicit_max, size_max)):
            if explicit is not None and explicit != from_size:
                raise ValueError(f"`{name}`={explicit} disagrees with `size`={size}; pass only one of them.")
        return size_min, size_max

    @staticmethod
    def _validate_resize_rule(rule: Any) -> str:
        if rule not in RESIZE_RULES:
            raise ValueError(f"`resize_rule` must be one of {RESIZE_RULES}, got {rule!r}.")
        return rule

    @staticmethod
    def _validate_max_num_patches(value: Any, hidden_stride: int) -> int:
        value = _positive_int(value, "max_num_patches")
        if value < hidden_stride * hidden_stride:
            raise ValueError(
                f"`max_num_patches` ({value}) must be at least hidden_stride**2 = {hidden_stride**2}: one "
                f"{hidden_stride}x{hidden_stride} block of patches."
            )
        return value

    def _size_rule(
        self,
        resize_rule: Optional[str] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        max_num_patches: Optional[int] = None,
        patch_size: Optional[int] = None,
        hidden_stride: Optional[int] = None,
    ) -> Callable[[int, int], ResizePlan]:
        """`(height, width) -> ResizePlan` of the processor's rule, or of the per-call overrides; every setting the
        rule uses is checked here (the stored ones too: they may have been assigned after construction)."""
        patch_size = self.patch_size if patch_size is None else _positive_int(patch_size, "patch_size")
        hidden_stride = self.hidden_stride if hidden_stride is None else _positive_int(hidden_stride, "hidden_stride")
        factor = patch_size * hidden_stride
        rule = self._validate_resize_rule(self.resize_rule if resize_rule is None else resize_rule)
        min_pixels, max_pixels = self._budget(min_pixels, max_pixels, factor)
        if rule == "ovis":
            return lambda height, width: ResizePlan(*smart_resize(height, width, factor, min_pixels, max_pixels))
        if rule == "naflex":
            budget = self._validate_max_num_patches(
                self.max_num_patches if max_num_patches is None else max_num_patches, hidden_stride
            )
            size = functools.partial(naflex_resize, patch_size=patch_size, max_num_patches=budget, hidden_stride=hidden_stride)
            return lambda height, width: ResizePlan(*size(height, width))
        shortest_edge, crop = check_center_crop(self.shortest_edge, self.crop_size, factor)
        return functools.partial(center_crop_plan, shortest_edge=shortest_edge, crop_size=crop)

    def _budget(self, min_pixels: Optional[int], max_pixels: Optional[int], factor: Optional[int] = None) -> Tuple[int, int]:
        return validate_pixel_budget(
            self.min_pixels if min_pixels is None else min_pixels,
            self.max_pixels if max_pixels is None else max_pixels,
            self.factor if factor is None else factor,
        )

    # -- planning API ----------------------------------------------------------------------------------------------

    def smart_resize(
        self, height: int, width: int, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None
    ) -> Tuple[int, int]:
        """Target `(height, width)` this processor resizes an image of `height x width` pixels to.

        Uses the processor's `min_pixels`/`max_pixels` unless overridden; see the module-level [`smart_resize`].
        """
        min_pixels, max_pixels = self._budget(min_pixels, max_pixels)
        return smart_resize(height, width, self.factor, min_pixels, max_pixels)

    def target_size(
        self,
        height: int,
        width: int,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        max_num_patches: Optional[int] = None,
        resize_rule: Optional[str] = None,
    ) -> Tuple[int, int]:
        """`(height, width)` of the image the patches are cut from, for an input of `height x width` pixels, under
        the processor's `resize_rule` (or the one given); the other arguments override the rule's settings."""
        plan = self._size_rule(resize_rule, min_pixels, max_pixels, max_num_patches)
        return plan(height, width).size

    def get_num_tokens(
        self,
        height: int,
        width: int,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        num_frames: int = 1,
        max_num_patches: Optional[int] = None,
        resize_rule: Optional[str] = None,
    ) -> TokenCount:
        """What an image (or a video of `num_frames` frames of that size) costs, without processing it.

        Returns:
            [`TokenCount`]: `(num_patches, num_tokens)`; `num_patches = t * h * w` rows of `pixel_values` and
            `num_tokens = num_patches // hidden_stride**2` tokens after the LLM-side merge.
        """
        num_frames = _positive_int(num_frames, "num_frames")
        resized_h, resized_w = self.target_size(height, width, min_pixels, max_pixels, max_num_patches, resize_rule)
        grid_t = -(-num_frames // self.temporal_patch_size)
        num_patches = grid_t * (resized_h // self.patch_size) * (resized_w // self.patch_size)
        return TokenCount(num_patches, num_patches // (self.hidden_stride**2))

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: Optional[dict] = None) -> int:
        """Number of patches (rows of `pixel_values`) for an image, as transformers' multimodal processors ask."""
        images_kwargs = images_kwargs or {}
        settings = {key: images_kwargs.get(key) for key in ("min_pixels", "max_pixels", "max_num_patches", "resize_rule")}
        return self.get_num_tokens(height, width, **settings).num_patches

    # -- processing ------------------------------------------------------------------------------------------------

    def __call__(self, images: Any = None, videos: Any = None, **kwargs) -> BatchFeature:
        """Preprocess images and/or videos; see [`~Siglip2NavitImageProcessor.preprocess`]."""
        return self.preprocess(images=images, videos=videos, **kwargs)

    def preprocess(
        self,
        images: Any = None,
        videos: Any = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        return_tensors: Optional[Union[str, TensorType]] = None,
        do_resize: Optional[bool] = None,
        resample: Optional[Union[int, "PIL.Image.Resampling"]] = None,
        do_rescale: Optional[bool] = None,
        rescale_factor: Optional[float] = None,
        do_normalize: Optional[bool] = None,
        image_mean: Optional[Union[float, List[float]]] = None,
        image_std: Optional[Union[float, List[float]]] = None,
        do_convert_rgb: Optional[bool] = None,
        patch_size: Optional[int] = None,
        temporal_patch_size: Optional[int] = None,
        hidden_stride: Optional[int] = None,
        size: Optional[Dict[str, int]] = None,
        input_data_format: Optional[str] = None,
        resize_rule: Optional[str] = None,
        max_num_patches: Optional[int] = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Preprocess images and videos into packed patches.

        Args:
            images (*optional*):
                One image or a list of images: PIL images of any mode, local file paths, numpy arrays or torch
                tensors (HW, HWC or CHW; uint8, or float in [0, 1]); a 4-D array is a batch of images.
            videos (*optional*):
                One video (a list of frames, or a `[T, H, W, C]` / `[T, C, H, W]` array) or a list of videos. Every
                frame is resized to the target size of the first frame (frames of other sizes are resized to it),
                and the frame count is padded to a multiple of `temporal_patch_size` by repeating the last frame.
            min_pixels, max_pixels (`int`, *optional*):
                Per-call pixel budget of the `"ovis"` rule (defaults: the processor's).
            resize_rule (`str`, *optional*):
                Per-call resize rule: `"ovis"`, `"naflex"` or `"center_crop"` (default: the processor's).
            max_num_patches (`int`, *optional*):
                Per-call patch budget of the `"naflex"` rule (default: the processor's), as naflex's processor takes it.
            return_tensors (`str` or [`~utils.TensorType`], *optional*):
                `None` or `"np"` for numpy arrays, `"pt"` for torch tensors.
            do_resize, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb,
            patch_size, temporal_patch_size, hidden_stride:
                Per-call overrides of the processor settings.
            size (`dict`, *optional*):
                Qwen2-VL style alias for the pixel budget (see the class docstring).
            input_data_format (`str`, *optional*):
                `"channels_first"` or `"channels_last"` for ambiguous arrays (default: inferred).

        Returns:
            [`BatchFeature`] with `pixel_values` (float32 `[N, C * T * p * p]`, images first, then videos) and
            `grid_thws` (int64 `[n, 3]`, one `(t, h, w)` row per image or video, in patch units).
        """
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            logger.warning_once(f"Siglip2NavitImageProcessor ignores the unused keyword arguments: {unknown}.")

        # ---- validate everything before doing any work ----
        if images is None and videos is None:
            raise ValueError("Pass `images` and/or `videos`; got neither.")
        patch_size = self.patch_size if patch_size is None else _positive_int(patch_size, "patch_size")
        temporal_patch_size = (
            self.temporal_patch_size
            if temporal_patch_size is None
            else _positive_int(temporal_patch_size, "temporal_patch_size")
        )
        hidden_stride = self.hidden_stride if hidden_stride is None else _positive_int(hidden_stride, "hidden_stride")
        factor = patch_size * hidden_stride
        min_pixels, max_pixels = self._resolve_size_alias(size, min_pixels, max_pixels, min_pixels, max_pixels)
        plan = self._size_rule(resize_rule, min_pixels, max_pixels, max_num_patches, patch_size, hidden_stride)
        do_resize = self.do_resize if do_resize is None else bool(do_resize)
        resample = self.resample if resample is None else self._validate_resample(resample)
        do_rescale = self.do_rescale if do_rescale is None else bool(do_rescale)
        # the stored settings are checked again too: they may have been assigned after construction
        rescale_factor = self._validate_rescale_factor(
            self.rescale_factor if rescale_factor is None else rescale_factor
        )
        do_normalize = self.do_normalize if do_normalize is None else bool(do_normalize)
        image_mean = self._validate_stats(self.image_mean if image_mean is None else image_mean, "image_mean")
        image_std = self._validate_stats(self.image_std if image_std is None else image_std, "image_std")
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else bool(do_convert_rgb)
        if return_tensors is not None:
            rt = str(getattr(return_tensors, "value", return_tensors))
            if rt not in ("np", "pt"):
                raise ValueError(f"`return_tensors` must be None, 'np' or 'pt', got {return_tensors!r}.")
            if rt == "pt" and not _TORCH_AVAILABLE:
                raise ValueError("return_tensors='pt' needs PyTorch, which is not installed.")
        image_list = _make_image_list(images) if images is not None else []
        video_list = _make_video_list(videos) if videos is not None else []

        # Decode every image and frame and fix its target size first (as transformers' processors convert every
        # input to an array up front): an unreadable or invalid input anywhere in the batch raises before any image
        # is resized. Each decoded image is released as soon as its patches are made, so the peak stays about
        # max(decoded inputs, patch rows) rather than their sum.
        decode = dict(
            plan=plan if do_resize else None,
            factor=factor,
            do_convert_rgb=do_convert_rgb,
            input_data_format=input_data_format,
        )
        decoded = [self._decode_frames([image], **decode) for image in image_list]
        decoded += [self._decode_frames(frames, **decode) for frames in video_list]

        lut = self._value_table(do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        rows: List[np.ndarray] = []
        grids: List[Tuple[int, int, int]] = []
        decoded.reverse()
        while decoded:
            frames, target = decoded.pop()  # in input order; dropped here, freed after its patches are made
            patches, grid = self._patchify(frames, target, resample, patch_size, temporal_patch_size, hidden_stride, lut)
            del frames
            rows.append(patches)
            grids.append(grid)

        pixel_values = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
        grid_thws = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        return BatchFeature(data={"pixel_values": pixel_values, "grid_thws": grid_thws}, tensor_type=return_tensors)

    @staticmethod
    def _value_table(
        do_rescale: bool, rescale_factor: float, do_normalize: bool, image_mean: List[float], image_std: List[float]
    ) -> np.ndarray:
        """`[3, 256]` float32 table mapping a uint8 value of channel c to its rescaled + normalised value.

        Same arithmetic as transformers' `rescale` (float64 product cast to float32) and `normalize` (float32
        `(x - mean) / std`), so a table lookup gives bit-identical results to running them on the whole image.
        """
        values = np.arange(256, dtype=np.float64)
        values = (values * rescale_factor).astype(np.float32) if do_rescale else values.astype(np.float32)
        table = np.broadcast_to(values, (3, 256)).copy()
        if do_normalize:
            mean = np.asarray(image_mean, dtype=np.float32)[:, None]
            std = np.asarray(image_std, dtype=np.float32)[:, None]
            table = (table - mean) / std
        return table.astype(np.float32)

    @staticmethod
    def _decode_frames(
        frames: List[Any],
        plan: Optional[Callable[[int, int], ResizePlan]],
        factor: int,
        do_convert_rgb: bool,
        input_data_format: Optional[str],
    ) -> Tuple[List[np.ndarray], ResizePlan]:
        """Decode one image (one frame) or one video to uint8 RGB frames and fix how it is sized (the first frame's
        `plan`; None: no resize); every check on the input happens here."""
        rgb_frames: List[np.ndarray] = []
        target: Optional[ResizePlan] = None
        do_resize = plan is not None
        for frame in frames:
            rgb = to_rgb_uint8(frame, input_data_format=input_data_format, do_convert_rgb=do_convert_rgb)
            height, width = rgb.shape[:2]
            if target is None:
                if do_resize:
                    target = plan(height, width)
                elif height % factor or width % factor:
                    raise ValueError(
                        f"With do_resize=False the image sides must be multiples of patch_size * hidden_stride "
                        f"= {factor}, got {height}x{width} (height x width)."
                    )
                else:
                    target = ResizePlan(height, width)
            elif not do_resize and (height, width) != target.size:
                raise ValueError(
                    f"With do_resize=False all frames of a video must have the same size; got {height}x{width} "
                    f"after {target[0]}x{target[1]}."
                )
            rgb_frames.append(rgb)
        return rgb_frames, target

    @staticmethod
    def _patchify(
        rgb_frames: List[np.ndarray],
        target: ResizePlan,
        resample: int,
        patch_size: int,
        temporal_patch_size: int,
        hidden_stride: int,
        lut: np.ndarray,
    ) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """Resize (and crop) decoded frames as `target` says, rescale + normalise them, and cut them into packed
        patch rows (for each `hidden_stride x hidden_stride` block of the frame in raster order, its patches in raster
        order); returns `(rows, (t, h, w))`."""
        channels_first: List[np.ndarray] = []
        for rgb in rgb_frames:
            if rgb.shape[:2] != (target.height, target.width):
                resized = PIL.Image.fromarray(rgb).resize((target.width, target.height), resample=resample)
                rgb = np.asarray(resized, dtype=np.uint8)
            if target.crop is not None:
                top, left, crop_h, crop_w = target.crop
                rgb = rgb[top : top + crop_h, left : left + crop_w]
            # uint8 HWC -> float32 CHW through the value table (rescale + normalise).
            channels_first.append(lut[np.arange(3)[:, None, None], rgb.transpose(2, 0, 1)])

        remainder = len(channels_first) % temporal_patch_size
        if remainder:
            channels_first.extend([channels_first[-1]] * (temporal_patch_size - remainder))
        video = np.stack(channels_first, axis=0)  # [F, C, H, W]
        num_frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
        s, p, tp = hidden_stride, patch_size, temporal_patch_size
        # [t, h, w, C, tp, p, p]: patches in raster order, each flattened as (channel, temporal, row, col)
        patches = video.reshape(grid_t, tp, channels, grid_h, p, grid_w, p).transpose(0, 3, 5, 2, 1, 4, 6)
        patches = patches.reshape(grid_t, grid_h * grid_w, channels * tp * p * p)
        patches = patches[:, block_order_raster_index(grid_h, grid_w, s)]  # raster -> packed (s x s block) order
        patches = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
        return np.ascontiguousarray(patches, dtype=np.float32), (grid_t, grid_h, grid_w)

    # -- saving ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        output = super().to_dict()
        for key in ("_valid_processor_keys", "_valid_kwargs_names", "size"):
            output.pop(key, None)
        for key in ("shortest_edge", "crop_size"):  # the center_crop rule's settings: absent when unused
            if output.get(key) is None:
                output.pop(key, None)
        output["image_processor_type"] = self.__class__.__name__
        return output

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        """Write the settings; when that is a folder's `preprocessor_config.json`, also write them, nested under
        `"image_processor"`, into its `processor_config.json` (other keys of an existing one are kept), so that
        every transformers version reads the same values whichever file it prefers. `save_pretrained` writes through
        here, so with `push_to_hub=True` both files count as modified and are uploaded."""
        import json

        super().to_json_file(json_file_path)
        if os.path.basename(os.fspath(json_file_path)) != "preprocessor_config.json":
            return
        processor_file = os.path.join(os.path.dirname(os.fspath(json_file_path)), "processor_config.json")
        content: Dict[str, Any] = {}
        if os.path.isfile(processor_file):
            with open(processor_file, encoding="utf-8") as f:
                try:
                    content = json.load(f)
                except json.JSONDecodeError:
                    content = {}
            if not isinstance(content, dict):
                content = {}
        with open(json_file_path, encoding="utf-8") as f:
            content["image_processor"] = json.load(f)
        tmp_file = processor_file + ".tmp"
        with open(tmp_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_file, processor_file)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> List[str]:
        """Save `preprocessor_config.json` and `processor_config.json` (see `to_json_file`); returns both paths."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        return list(files) + [os.path.join(os.fspath(save_directory), "processor_config.json")]


Siglip2NavitImageProcessor.register_for_auto_class("AutoImageProcessor")



# Reachable from a processor loaded with trust_remote_code (no package install needed): `processor.naflex_to_packed(...)`,
# `processor.pack_by_token_budget(...)`, `processor.collate_packed(...)`, `processor.sample_max_pixels(...)`.
for _helper in (naflex_to_packed, pack_by_token_budget, collate_packed, sample_max_pixels):
    setattr(Siglip2NavitImageProcessor, _helper.__name__, staticmethod(_helper))
del _helper

__all__ = [
    "naflex_to_packed",
    "Siglip2NavitImageProcessor",
    "TokenCount",
    "collate_packed",
    "open_image",
    "pack_by_token_budget",
    "sample_max_pixels",
    "smart_resize",
    "naflex_resize",
    "center_crop_plan",
    "ResizePlan",
    "RESIZE_RULES",
    "to_rgb_uint8",
    "validate_pixel_budget",
    "MAX_PIXEL_BUDGET",
]
