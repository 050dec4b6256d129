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

Besides the processor, this module provides helpers for NaViT-style training and batch inference:
:func:`pack_by_token_budget` (first-fit-decreasing packing of images into token-bounded batches),
:func:`collate_packed` (concatenate processed samples into one packed batch) and :func:`sample_max_pixels`
(seeded per-image resolution sampling).
"""

import math
import operator
import os
import random
import re
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

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


class TokenCount(NamedTuple):
    """What one image (or video) costs the vision tower.

    Attributes:
        num_patches (`int`): rows of `pixel_values`, i.e. `t * h * w` (the sequence length seen by the ViT).
        num_tokens (`int`): tokens after the LLM-side `hidden_stride x hidden_stride` merge,
            i.e. `num_patches // hidden_stride**2`.
    """

    num_patches: int
    num_tokens: int


# ----------------------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------------------


def _as_int(value: Any, name: str) -> int:
    """Return `value` as a Python int; raise a `ValueError` naming `name` if it is not an integer."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be an integer, got the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"`{name}` must be an integer, got {value!r} of type {type(value).__name__}.")


def _positive_int(value: Any, name: str) -> int:
    value = _as_int(value, name)
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    return value


def _finite_float(value: Any, name: str) -> float:
    """Return `value` as a finite Python float; a bool, a string, NaN or an infinity is a `ValueError` naming `name`."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"`{name}` must be a finite number, got {value!r} of type {type(value).__name__}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a finite number, got {value!r} of type {type(value).__name__}.") from None
    if not math.isfinite(number):
        raise ValueError(f"`{name}` must be a finite number, got {number}.")
    return number


def validate_pixel_budget(min_pixels: Any, max_pixels: Any, factor: int) -> Tuple[int, int]:
    """Check a `(min_pixels, max_pixels)` budget for a resize factor and return it as Python ints.

    Raises:
        ValueError: if a budget is not a positive integer, if `min_pixels > max_pixels`, or if `max_pixels` is
            smaller than one `factor x factor` tile (no image could then be resized into the budget).
    """
    min_pixels = _positive_int(min_pixels, "min_pixels")
    max_pixels = _positive_int(max_pixels, "max_pixels")
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
# input conversion
# ----------------------------------------------------------------------------------------------------------------------


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def open_image(path: Union[str, os.PathLike]) -> PIL.Image.Image:
    """Open an image file with PIL, applying its EXIF orientation, and keep its mode.

    PIL's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) is left in force: an oversized file raises
    `PIL.Image.DecompressionBombError`. Strings are local paths only: a URL (`http://`, `https://`, any
    `scheme://`) is a `ValueError`, never fetched (a vision tower's processor does no network I/O).
    """
    path_str = os.fspath(path)
    if isinstance(path_str, str) and _URL_SCHEME.match(path_str):
        raise ValueError(
            f"Image {path_str!r} is a URL; URLs are not fetched (images given as strings must be local file paths). "
            f"Download it first and pass a PIL image, a numpy array / torch tensor, or the local path."
        )
    if not os.path.isfile(path_str):
        raise ValueError(f"Image file {path_str!r} does not exist (images given as strings must be local paths).")
    with PIL.Image.open(path_str) as image:
        image.load()
        transposed = PIL.ImageOps.exif_transpose(image)
    return transposed


def _is_pil(x: Any) -> bool:
    return isinstance(x, PIL.Image.Image)


def _is_tensor(x: Any) -> bool:
    return _TORCH_AVAILABLE and isinstance(x, torch.Tensor)


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or _is_tensor(x)


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _is_single_image(x: Any) -> bool:
    return _is_pil(x) or _is_path(x) or (_is_array(x) and x.ndim in (2, 3))


def _to_numpy(x: Any) -> np.ndarray:
    if _is_tensor(x):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _pil_to_rgb_uint8(image: PIL.Image.Image, do_convert_rgb: bool) -> np.ndarray:
    """PIL image of any mode -> uint8 `[H, W, 3]` array.

    Follows `image.convert("RGB")` (what Ovis2.5 does) for every mode except the high-bit-depth ones, where PIL
    would clip every value above 255 to white:
    * `I;16*` (16-bit greyscale): rescaled to 8 bits as `round(v / 257)` (65535 -> 255);
    * `I` (32-bit int): treated as 16-bit data (`round(clip(v, 0, 65535) / 257)`) when any value exceeds 255,
      else used as 8-bit data;
    * `F` (float): multiplied by 255 when all values lie in [0, 1], else clipped to [0, 255]; then rounded.
    Transparency (RGBA, LA, PA, P with a transparent colour) is dropped, as `convert("RGB")` does.
    """
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"Got an empty image of size {width}x{height} (width x height); images must be non-empty.")
    mode = image.mode
    if not do_convert_rgb:
        if mode != "RGB":
            raise ValueError(
                f"Got a PIL image in mode {mode!r} with do_convert_rgb=False; only RGB images can be used without "
                f"conversion. Pass do_convert_rgb=True (the default) or convert the image yourself."
            )
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        values = np.asarray(image)
        if mode == "F":
            values = values.astype(np.float64)
            if not np.isfinite(values).all():
                raise ValueError("Got a mode 'F' PIL image with NaN or infinite values.")
            if values.min() >= 0.0 and values.max() <= 1.0:
                values = values * 255.0
            gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        else:
            values = values.astype(np.int64)
            if mode.startswith("I;16") or values.max(initial=0) > 255:
                gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
            else:
                gray = np.clip(values, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        try:
            image = image.convert("RGB")
        except (ValueError, OSError) as err:
            raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB: {err}") from err
    return np.asarray(image, dtype=np.uint8)


def _infer_channels_last(shape: tuple, is_tensor: bool) -> bool:
    """Whether the channels of a 3-D array come last. As in transformers, a 1 or 3 at exactly one end decides; 4 (RGBA)
    counts only when neither end is 1 or 3. Both ends 1 or 3 (e.g. a 3×3×3 image) is ambiguous: tensors are read
    (C, H, W) and numpy arrays (H, W, C), with a warning; `input_data_format` decides."""
    first, last = shape[0] in (1, 3), shape[-1] in (1, 3)
    if first and last:
        channels_last = not is_tensor
        logger.warning_once(
            f"The channel dimension of an image array of shape {tuple(shape)} is ambiguous; reading it as "
            f"{'(H, W, C)' if channels_last else '(C, H, W)'}. Pass input_data_format='channels_first' or "
            f"'channels_last' to choose."
        )
        return channels_last
    if first or last:
        return last
    if shape[0] == 4 or shape[-1] == 4:  # RGBA
        return shape[-1] == 4
    raise ValueError(
        f"Cannot read an array of shape {tuple(shape)} as an image: expected 1, 3 or 4 channels in the first "
        f"(C, H, W) or last (H, W, C) dimension."
    )


def _array_to_rgb_uint8(array: Any, input_data_format: Optional[str], do_convert_rgb: bool) -> np.ndarray:
    """numpy array / torch tensor (HW, HWC or CHW) -> uint8 `[H, W, 3]` array.

    dtypes: uint8 as is; float arrays must lie in [0, 1] and are quantised with `round(x * 255)` (so they take the
    same PIL path as 8-bit images); bool -> {0, 255}; uint16 -> `round(v / 257)`; other integer arrays must lie in
    [0, 255]. Channels: 1 (grey, replicated), 3 (RGB) or 4 (RGBA, alpha dropped like `convert("RGB")`).
    """
    is_tensor = _is_tensor(array)
    array = _to_numpy(array)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"An image array must have 2 (H, W) or 3 (H, W, C or C, H, W) dimensions, got shape {tuple(array.shape)}."
        )
    if array.size == 0:
        raise ValueError(f"Got an empty (0-sized) image array of shape {tuple(array.shape)}.")

    if array.ndim == 2:
        array = array[:, :, None]
    else:
        fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format))
        if fmt == "channels_first":
            channels_last = False
        elif fmt == "channels_last":
            channels_last = True
        elif fmt is not None:
            raise ValueError(f"`input_data_format` must be 'channels_first' or 'channels_last', got {fmt!r}.")
        else:
            channels_last = _infer_channels_last(array.shape, is_tensor)
        if not channels_last:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"Cannot read an array with {array.shape[-1]} channels as an image (shape {tuple(array.shape)}): "
                f"expected 1 (greyscale), 3 (RGB) or 4 (RGBA) channels."
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"Got an empty (0-sized) image array of shape {tuple(array.shape)}.")

    dtype = array.dtype
    if dtype == np.uint8:
        pass
    elif dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("Got a float image array with NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float image arrays must hold values in [0, 1], got values in [{low}, {high}]. Pass uint8 arrays "
                f"for 0..255 data."
            )
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif dtype.kind == "u" and dtype.itemsize == 2:  # uint16 of either byte order
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Integer image arrays of dtype {dtype} must hold values in [0, 255], got values in [{low}, {high}]."
            )
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"Unsupported image array dtype {dtype}; use uint8, or float in [0, 1].")

    channels = array.shape[-1]
    if channels == 3:
        return np.ascontiguousarray(array)
    if not do_convert_rgb:
        raise ValueError(
            f"Got an image array with {channels} channel(s) and do_convert_rgb=False; only 3-channel RGB arrays "
            f"can be used without conversion."
        )
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    return np.ascontiguousarray(array[:, :, :3])  # RGBA: drop alpha, like PIL convert("RGB")


def to_rgb_uint8(
    image: Any, input_data_format: Optional[str] = None, do_convert_rgb: bool = True
) -> np.ndarray:
    """Convert one image (PIL image of any mode, file path, numpy array or torch tensor) to a uint8 `[H, W, 3]` array.

    See `_pil_to_rgb_uint8` and `_array_to_rgb_uint8` for the exact rules; transparency is dropped (Ovis2.5 uses
    `convert("RGB")`, unlike transformers 5.x which composites onto white).
    """
    if _is_path(image):
        image = open_image(image)
    if _is_pil(image):
        return _pil_to_rgb_uint8(image, do_convert_rgb)
    if _is_array(image):
        return _array_to_rgb_uint8(image, input_data_format, do_convert_rgb)
    raise ValueError(
        f"Unsupported image type {type(image).__name__}; expected a PIL image, a file path, a numpy array or a "
        f"torch tensor."
    )


def _make_image_list(images: Any) -> List[Any]:
    """Flatten the accepted `images` structures into a list of single images."""
    if _is_single_image(images):
        return [images]
    if _is_array(images):
        if images.ndim == 4:  # a batch of images
            if images.shape[0] == 0:
                raise ValueError("Got an empty batch of images (first dimension is 0).")
            return [images[i] for i in range(images.shape[0])]
        raise ValueError(
            f"`images` arrays must have 2, 3 (one image) or 4 (a batch) dimensions, got shape {tuple(images.shape)}."
        )
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("Got an empty list of images; pass at least one image.")
        flat: List[Any] = []
        for item in images:
            if isinstance(item, (list, tuple)) or (_is_array(item) and item.ndim == 4):
                flat.extend(_make_image_list(item))  # nested batches, as transformers accepts
            elif _is_single_image(item):
                flat.append(item)
            elif _is_array(item):
                raise ValueError(
                    f"Each image array must have 2 or 3 dimensions, got shape {tuple(item.shape)}."
                )
            else:
                raise ValueError(
                    f"Unsupported image type {type(item).__name__}; expected PIL images, file paths, numpy arrays "
                    f"or torch tensors."
                )
        return flat
    raise ValueError(
        f"Unsupported `images` type {type(images).__name__}; expected a PIL image, a file path, a numpy array, a "
        f"torch tensor, or a list of them."
    )


def _make_video_list(videos: Any) -> List[List[Any]]:
    """Normalise the accepted `videos` structures into a list of videos, each a list of frames."""
    if _is_array(videos):
        if videos.ndim == 4:  # one video [T, H, W, C] (or [T, C, H, W])
            if videos.shape[0] == 0:
                raise ValueError("Got a video with no frames (first dimension is 0).")
            return [[videos[i] for i in range(videos.shape[0])]]
        if videos.ndim == 5:  # a batch of videos
            if videos.shape[0] == 0:
                raise ValueError("Got an empty batch of videos (first dimension is 0).")
            return [_make_video_list(videos[i])[0] for i in range(videos.shape[0])]
        raise ValueError(
            f"A video array must have 4 dimensions [T, H, W, C] (or 5 for a batch), got shape {tuple(videos.shape)}."
        )
    if isinstance(videos, (list, tuple)):
        if len(videos) == 0:
            raise ValueError("Got an empty list of videos; pass at least one video (a list of frames).")
        is_video = [isinstance(v, (list, tuple)) or (_is_array(v) and v.ndim in (4, 5)) for v in videos]
        if all(is_video):
            result = []
            for video in videos:
                if isinstance(video, (list, tuple)):
                    if len(video) == 0:
                        raise ValueError("Got a video with no frames; each video needs at least one frame.")
                    for frame in video:
                        if not _is_single_image(frame):
                            raise ValueError(
                                f"Video frames must be PIL images, file paths or 2-D/3-D arrays, got "
                                f"{type(frame).__name__}"
                                + (f" of shape {tuple(frame.shape)}" if _is_array(frame) else "")
                                + "."
                            )
                    result.append(list(video))
                else:
                    result.extend(_make_video_list(video))
            return result
        if all(_is_single_image(v) for v in videos):
            return [list(videos)]  # a single video given as a flat list of frames
        raise ValueError(
            "`videos` must be a list of frames (one video), a [T, H, W, C] array, or a list of such videos; got a "
            "list mixing frames and videos."
        )
    raise ValueError(
        f"Unsupported `videos` type {type(videos).__name__}; expected a list of frames, a [T, H, W, C] array, or a "
        f"list of them."
    )


# ----------------------------------------------------------------------------------------------------------------------
# the processor
# ----------------------------------------------------------------------------------------------------------------------


class Siglip2NavitImageProcessor(BaseImageProcessor):
    r"""
    Constructs a native-resolution SigLIP2 NaViT image processor (the Ovis2.5 vision-tower preprocessing).

    Each image keeps its aspect ratio: it is resized with [`smart_resize`] to a size whose sides are multiples of
    `patch_size * hidden_stride` and whose area lies in `[min_pixels, max_pixels]` (up to rounding: an enlarged image
    rounds its sides up, so with a narrow budget its area can pass `max_pixels`), then cut into patches that are
    packed, for all images of the call, into one `pixel_values` matrix, with one `grid_thws` row per image.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize to the [`smart_resize`] size. With `False`, the image sides must already be multiples
            of `patch_size * hidden_stride`.
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

    def get_num_tokens(
        self,
        height: int,
        width: int,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        num_frames: int = 1,
    ) -> TokenCount:
        """What an image (or a video of `num_frames` frames of that size) costs, without processing it.

        Returns:
            [`TokenCount`]: `(num_patches, num_tokens)`; `num_patches = t * h * w` rows of `pixel_values` and
            `num_tokens = num_patches // hidden_stride**2` tokens after the LLM-side merge.
        """
        num_frames = _positive_int(num_frames, "num_frames")
        resized_h, resized_w = self.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        grid_t = -(-num_frames // self.temporal_patch_size)
        num_patches = grid_t * (resized_h // self.patch_size) * (resized_w // self.patch_size)
        return TokenCount(num_patches, num_patches // (self.hidden_stride**2))

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: Optional[dict] = None) -> int:
        """Number of patches (rows of `pixel_values`) for an image, as transformers' multimodal processors ask."""
        images_kwargs = images_kwargs or {}
        return self.get_num_tokens(
            height, width, min_pixels=images_kwargs.get("min_pixels"), max_pixels=images_kwargs.get("max_pixels")
        ).num_patches

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
                Per-call pixel budget (defaults: the processor's).
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
        min_pixels, max_pixels = self._budget(min_pixels, max_pixels, factor)
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
            factor=factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            do_resize=do_resize,
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
        factor: int,
        min_pixels: int,
        max_pixels: int,
        do_resize: bool,
        do_convert_rgb: bool,
        input_data_format: Optional[str],
    ) -> Tuple[List[np.ndarray], Tuple[int, int]]:
        """Decode one image (one frame) or one video to uint8 RGB frames and fix its target `(height, width)` (the
        first frame's `smart_resize` size); every check on the input happens here."""
        rgb_frames: List[np.ndarray] = []
        target: Optional[Tuple[int, int]] = None
        for frame in frames:
            rgb = to_rgb_uint8(frame, input_data_format=input_data_format, do_convert_rgb=do_convert_rgb)
            height, width = rgb.shape[:2]
            if target is None:
                if do_resize:
                    target = smart_resize(height, width, factor, min_pixels, max_pixels)
                elif height % factor or width % factor:
                    raise ValueError(
                        f"With do_resize=False the image sides must be multiples of patch_size * hidden_stride "
                        f"= {factor}, got {height}x{width} (height x width)."
                    )
                else:
                    target = (height, width)
            elif not do_resize and (height, width) != target:
                raise ValueError(
                    f"With do_resize=False all frames of a video must have the same size; got {height}x{width} "
                    f"after {target[0]}x{target[1]}."
                )
            rgb_frames.append(rgb)
        return rgb_frames, target

    @staticmethod
    def _patchify(
        rgb_frames: List[np.ndarray],
        target: Tuple[int, int],
        resample: int,
        patch_size: int,
        temporal_patch_size: int,
        hidden_stride: int,
        lut: np.ndarray,
    ) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """Resize decoded frames to `target`, rescale + normalise them, and cut them into packed patch rows in SPEC §3
        order; returns `(rows, (t, h, w))`."""
        channels_first: List[np.ndarray] = []
        for rgb in rgb_frames:
            if rgb.shape[:2] != target:
                resized = PIL.Image.fromarray(rgb).resize((target[1], target[0]), resample=resample)
                rgb = np.asarray(resized, dtype=np.uint8)
            # uint8 HWC -> float32 CHW through the value table (rescale + normalise).
            channels_first.append(lut[np.arange(3)[:, None, None], rgb.transpose(2, 0, 1)])

        remainder = len(channels_first) % temporal_patch_size
        if remainder:
            channels_first.extend([channels_first[-1]] * (temporal_patch_size - remainder))
        video = np.stack(channels_first, axis=0)  # [F, C, H, W]
        num_frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
        s, p, tp = hidden_stride, patch_size, temporal_patch_size
        patches = video.reshape(grid_t, tp, channels, grid_h // s, s, p, grid_w // s, s, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        patches = patches.reshape(grid_t * grid_h * grid_w, channels * tp * p * p)
        return np.ascontiguousarray(patches, dtype=np.float32), (grid_t, grid_h, grid_w)

    # -- saving ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        output = super().to_dict()
        for key in ("_valid_processor_keys", "_valid_kwargs_names", "size"):
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


# ----------------------------------------------------------------------------------------------------------------------
# NaViT training / batching helpers
# ----------------------------------------------------------------------------------------------------------------------


class _FirstFit:
    """First-fit bin assignment in O(log n) per item: a max-segment tree over the remaining capacity of the bins."""

    def __init__(self, capacity: int, max_bins: int) -> None:
        self.capacity = capacity
        self.size = 1
        while self.size < max(1, max_bins):
            self.size *= 2
        self.tree = [-1] * (2 * self.size)  # remaining capacity; -1 = bin not opened yet
        self.num_bins = 0

    def _set(self, index: int, value: int) -> None:
        i = index + self.size
        self.tree[i] = value
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def add(self, amount: int) -> int:
        """Put `amount` in the first open bin with room (or a new bin); return the bin index."""
        if amount <= self.capacity and self.tree[1] >= amount:
            i = 1
            while i < self.size:
                i = 2 * i if self.tree[2 * i] >= amount else 2 * i + 1
            index = i - self.size
            self._set(index, self.tree[i] - amount)
            return index
        index = self.num_bins
        self.num_bins += 1
        # An item larger than the budget gets a bin that nothing else can join (remaining capacity -1).
        self._set(index, self.capacity - amount if amount <= self.capacity else -1)
        return index


def _first_fit(order: Sequence[int], counts: Sequence[int], max_tokens: int) -> List[List[int]]:
    packer = _FirstFit(max_tokens, len(order))
    groups: List[List[int]] = []
    for index in order:
        b = packer.add(counts[index])
        if b == len(groups):
            groups.append([])
        groups[b].append(index)
    return groups


def pack_by_token_budget(token_counts: Sequence[int], max_tokens: int) -> List[List[int]]:
    """Pack items (images) into groups (batches) whose token totals stay within `max_tokens`.

    First-fit decreasing: items are taken by decreasing count (ties by index) and each goes into the first group
    with room. The result also never has more groups than plain first-fit in the given order (both are computed;
    the one with fewer groups wins, first-fit decreasing on a tie).

    Guarantees: every index appears exactly once; indices are increasing within a group; groups are ordered by
    their first index; each group's total is `<= max_tokens`, except that an item larger than `max_tokens` is
    alone in its own group.

    Args:
        token_counts (`Sequence[int]`): non-negative cost of each item, e.g. `num_patches` from
            [`Siglip2NavitImageProcessor.get_num_tokens`] (the ViT sequence length).
        max_tokens (`int`): budget per group.

    Returns:
        `List[List[int]]`: groups of item indices. An empty input gives `[]`.
    """
    max_tokens = _positive_int(max_tokens, "max_tokens")
    if _is_array(token_counts):
        token_counts = _to_numpy(token_counts)
        if token_counts.ndim != 1:
            raise ValueError(f"`token_counts` must be 1-D, got shape {tuple(token_counts.shape)}.")
        token_counts = token_counts.tolist()
    if isinstance(token_counts, (str, bytes)) or not hasattr(token_counts, "__len__"):
        raise ValueError(f"`token_counts` must be a sequence of integers, got {type(token_counts).__name__}.")
    counts = []
    for i, c in enumerate(token_counts):
        c = _as_int(c, f"token_counts[{i}]")
        if c < 0:
            raise ValueError(f"`token_counts[{i}]` must be non-negative, got {c}.")
        counts.append(c)
    if not counts:
        return []
    decreasing = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    ffd = _first_fit(decreasing, counts, max_tokens)
    ff = _first_fit(range(len(counts)), counts, max_tokens)
    best = ff if len(ff) < len(ffd) else ffd
    best = [sorted(group) for group in best]
    best.sort(key=lambda group: group[0])
    return best


def collate_packed(samples: Sequence[Any], return_tensors: str = "pt") -> BatchFeature:
    """Concatenate processed samples into one packed batch (a `collate_fn` for `torch.utils.data.DataLoader`).

    Each sample is a mapping (e.g. the `BatchFeature` returned by the processor) with `pixel_values` `[N_i, D]`,
    `grid_thws` `[n_i, 3]` and, optionally, `keep_indices` (1-D, strictly increasing positions into its `N_i` rows,
    e.g. from `Siglip2NavitModel.sample_keep_indices`). The result holds the concatenated `pixel_values` and
    `grid_thws`, and, when any sample has `keep_indices`, their concatenation offset by each sample's row start
    (samples without `keep_indices` keep all their rows).

    Args:
        samples: the processed samples.
        return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.

    Returns:
        [`BatchFeature`] with `pixel_values` (float32), `grid_thws` (int64) and possibly `keep_indices` (int64).
    """
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}.")
    if isinstance(samples, dict) or not isinstance(samples, (list, tuple)) or len(samples) == 0:
        raise ValueError("`samples` must be a non-empty list of processed samples (dicts with pixel_values, grid_thws).")
    pixel_values, grids, keeps = [], [], []
    any_keep = False
    offset = 0
    width = None
    for i, sample in enumerate(samples):
        if not hasattr(sample, "keys") or "pixel_values" not in sample or "grid_thws" not in sample:
            raise ValueError(f"Sample {i} must be a mapping with 'pixel_values' and 'grid_thws'.")
        pv, grid = _to_numpy(sample["pixel_values"]), _to_numpy(sample["grid_thws"])
        if pv.dtype.kind != "f":
            raise ValueError(f"Sample {i}: `pixel_values` must be floating point, got dtype {pv.dtype}.")
        if grid.dtype.kind not in "iu" or (grid.size and grid.min() <= 0):
            raise ValueError(f"Sample {i}: `grid_thws` must hold positive integers (t, h, w), got {grid.tolist()}.")
        pv, grid = pv.astype(np.float32, copy=False), grid.astype(np.int64, copy=False)
        if pv.ndim != 2:
            raise ValueError(f"Sample {i}: `pixel_values` must be 2-D [N, D], got shape {tuple(pv.shape)}.")
        if grid.ndim != 2 or grid.shape[1] != 3:
            raise ValueError(f"Sample {i}: `grid_thws` must have shape [n, 3], got {tuple(grid.shape)}.")
        if width is None:
            width = pv.shape[1]
        elif pv.shape[1] != width:
            raise ValueError(f"Sample {i} has rows of width {pv.shape[1]}, sample 0 has {width}; they cannot be packed.")
        num_rows = int(np.prod(grid, axis=1).sum())
        if num_rows != pv.shape[0]:
            raise ValueError(
                f"Sample {i}: `grid_thws` describes {num_rows} patches but `pixel_values` has {pv.shape[0]} rows."
            )
        keep = sample.get("keep_indices") if hasattr(sample, "get") else None
        if keep is not None:
            any_keep = True
            keep = _to_numpy(keep)
            if keep.ndim != 1 or keep.dtype.kind not in "iu":
                raise ValueError(
                    f"Sample {i}: `keep_indices` must be a 1-D integer array of row positions, got dtype {keep.dtype} "
                    f"and shape {tuple(keep.shape)}."
                )
            keep = keep.astype(np.int64, copy=False)
            if keep.size and (keep.min() < 0 or keep.max() >= pv.shape[0] or np.any(np.diff(keep) <= 0)):
                raise ValueError(
                    f"Sample {i}: `keep_indices` must be strictly increasing positions in [0, {pv.shape[0]})."
                )
        else:
            keep = np.arange(pv.shape[0], dtype=np.int64)
        pixel_values.append(pv)
        grids.append(grid)
        keeps.append(keep + offset)
        offset += pv.shape[0]
    data = {"pixel_values": np.concatenate(pixel_values, axis=0), "grid_thws": np.concatenate(grids, axis=0)}
    if any_keep:
        data["keep_indices"] = np.concatenate(keeps, axis=0)
    return BatchFeature(data=data, tensor_type=return_tensors)


def sample_max_pixels(
    rng: Union[None, int, np.random.Generator, random.Random],
    low: int,
    high: int,
    num_samples: Optional[int] = None,
    distribution: str = "log_uniform",
    factor: int = 32,
) -> Union[int, List[int]]:
    """Draw per-image `max_pixels` budgets for NaViT variable-resolution training.

    Each budget is drawn from `[low, high]` and rounded down to whole `factor x factor` tiles (never below `low`
    rounded up to a tile, never above `high`):

    * `"log_uniform"`: the area is log-uniform, so every scale (factor-of-2 step) is equally likely;
    * `"uniform_side"`: the side `sqrt(area)` is uniform in `[sqrt(low), sqrt(high)]`.

    Use it as `proc(images=img, max_pixels=sample_max_pixels(rng, 256**2, 1024**2), min_pixels=32 * 32)`: pass a
    `min_pixels` no larger than `low`, or the processor rejects budgets below its default `min_pixels`.

    Args:
        rng: a seed (`int`), a `numpy.random.Generator`, a `random.Random`, or `None` (fresh entropy).
        low (`int`), high (`int`): budget range in pixels; `factor**2 <= low <= high`.
        num_samples (`int`, *optional*): how many budgets to draw; `None` returns one `int`.
        distribution (`str`, *optional*, defaults to `"log_uniform"`): `"log_uniform"` or `"uniform_side"`.
        factor (`int`, *optional*, defaults to 32): `patch_size * hidden_stride`.

    Returns:
        `int` or `List[int]`: the budget(s).
    """
    factor = _positive_int(factor, "factor")
    low = _positive_int(low, "low")
    high = _positive_int(high, "high")
    if low > high:
        raise ValueError(f"`low` ({low}) must not be larger than `high` ({high}).")
    tile = factor * factor
    if high < tile:
        raise ValueError(f"`high` ({high}) must be at least one {factor}x{factor} tile ({tile} pixels).")
    if distribution not in ("log_uniform", "uniform_side"):
        raise ValueError(f"`distribution` must be 'log_uniform' or 'uniform_side', got {distribution!r}.")
    count = 1 if num_samples is None else _positive_int(num_samples, "num_samples")
    if isinstance(rng, random.Random):
        uniforms = [rng.random() for _ in range(count)]
    elif isinstance(rng, np.random.Generator):
        uniforms = rng.random(count).tolist()
    elif rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        uniforms = np.random.default_rng(rng).random(count).tolist()
    else:
        raise ValueError(f"`rng` must be None, an int seed, a numpy Generator or a random.Random, got {type(rng).__name__}.")
    lowest, highest = -(-low // tile) * tile, (high // tile) * tile  # whole tiles inside [low, high]
    if lowest > highest:
        raise ValueError(
            f"No whole {factor}x{factor} tile count lies in [low, high] = [{low}, {high}]: budgets are multiples of "
            f"{tile} pixels; widen the range."
        )
    budgets = []
    for u in uniforms:
        if distribution == "log_uniform":
            area = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            side = math.sqrt(low) + u * (math.sqrt(high) - math.sqrt(low))
            area = side * side
        budget = int(area // tile) * tile
        budgets.append(int(min(max(budget, lowest), highest)))
    return budgets[0] if num_samples is None else budgets



# ----------------------------------------------------------------------------------------------------------------------
# interoperability: SigLIP2 naflex processor output -> packed inputs
# ----------------------------------------------------------------------------------------------------------------------


def naflex_to_packed(
    pixel_values, pixel_attention_mask, spatial_shapes, hidden_stride: int = 1, num_channels: int = 3
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Turn SigLIP2 naflex processor output into this model's packed `(pixel_values, grid_thws)`.

    Args:
        pixel_values: `[B, L, p·p·C]` padded patches, each flattened (row-in-patch, col-in-patch, channel), as
            returned by transformers' `Siglip2ImageProcessor` (torch tensor or numpy array).
        pixel_attention_mask: `[B, L]`, 1 for the real patches (the first `h·w` of each row), 0 for padding.
        spatial_shapes: `[B, 2]` patch grid `(h, w)` of each image.
        hidden_stride: the converted model's `config.hidden_stride`; with 2 the patches are put in 2x2-block order,
            which needs even `h` and `w`.
        num_channels: `C` (3 for RGB).

    Returns:
        `pixel_values` float `[Σ h·w, C·p·p]` with rows flattened (channel, row-in-patch, col-in-patch) and in
        hidden_stride-block order, and `grid_thws` int64 `[B, 3]` = `(1, h, w)`.
    """
    pixel_values = torch.as_tensor(pixel_values)
    mask = torch.as_tensor(pixel_attention_mask).bool()
    shapes = torch.as_tensor(spatial_shapes).long().reshape(-1, 2)
    if pixel_values.ndim != 3 or mask.shape != pixel_values.shape[:2] or shapes.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"Expected pixel_values [B, L, p·p·C], pixel_attention_mask [B, L] and spatial_shapes [B, 2]; got "
            f"{tuple(pixel_values.shape)}, {tuple(mask.shape)} and {tuple(torch.as_tensor(spatial_shapes).shape)}."
        )
    dim = pixel_values.shape[-1]
    patch_size = math.isqrt(dim // num_channels)
    if patch_size * patch_size * num_channels != dim:
        raise ValueError(f"Patch rows of length {dim} are not p·p·{num_channels} for any integer patch size p.")
    s = int(hidden_stride)
    rows, grids = [], []
    for i, (h, w) in enumerate(shapes.tolist()):
        n = h * w
        if n <= 0 or n > pixel_values.shape[1]:
            raise ValueError(f"spatial_shapes[{i}] = {(h, w)} does not fit in {pixel_values.shape[1]} patches.")
        if int(mask[i].sum()) != n or not bool(mask[i, :n].all()):
            raise ValueError(
                f"Image {i}: pixel_attention_mask must mark exactly its first h·w = {n} patches as real "
                f"(got {int(mask[i].sum())} real patches)."
            )
        if h % s or w % s:
            raise ValueError(
                f"Image {i} has a {h}x{w} patch grid, not divisible by hidden_stride={s}: use a hidden_stride=1 "
                f"model, or preprocess with this repo's Siglip2NavitImageProcessor."
            )
        patches = pixel_values[i, :n].reshape(h // s, s, w // s, s, patch_size, patch_size, num_channels)
        # (block row, block col, r, c) token order; (channel, row-in-patch, col-in-patch) inside a row
        patches = patches.permute(0, 2, 1, 3, 6, 4, 5).reshape(n, dim)
        rows.append(patches)
        grids.append((1, h, w))
    return torch.cat(rows, dim=0), torch.tensor(grids, dtype=torch.long)


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
    "to_rgb_uint8",
    "validate_pixel_budget",
]
