# Copyright 2025 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Input handling shared by the NaViT processor and its batching utilities: value checks and image conversion.

* value checks (`_as_int`, `_positive_int`, `_finite_float`): a bad setting is a `ValueError` naming it;
* the resize rules other than Ovis2.5's `smart_resize` (which stays with the processor): SigLIP2 naflex's
  `naflex_resize` and CLIP's fixed-size `center_crop_plan` (with its settings check `check_center_crop`);
* image conversion: paths, PIL images, numpy arrays and torch tensors (channels-first or -last, any numeric dtype)
  become uint8 RGB arrays ``[H, W, 3]`` (`to_rgb_uint8`), and the `images` / `videos` arguments of a processor call
  become flat lists (`_make_image_list`, `_make_video_list`).
"""

import math
import operator
import os
import re
from typing import Any, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from transformers.utils import logging


try:
    import torch

    _TORCH_AVAILABLE = True
except ImportError:  # pragma: no cover - torch is a hard dependency of the model, not of this module
    torch = None
    _TORCH_AVAILABLE = False


logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# the packed token order
# ----------------------------------------------------------------------------------------------------------------------


def block_order_position(index: Any, width: Any, stride: int) -> Tuple[Any, Any]:
    """(row, col) in its frame of the patch at position `index` of the frame's packed rows.

    Inside a frame of `width` patches per row, rows are packed in `stride x stride` blocks: the blocks in raster
    order, and inside each block its `stride * stride` patches in raster order (stride 1: plain raster order). This is
    the one statement of that rule; the processor, the model's layout, the naflex interop and the benchmark all
    derive their orders from it. Works elementwise on Python ints, numpy arrays and torch tensors alike.
    """
    block = index // (stride * stride)
    blocks_per_row = width // stride
    row = (block // blocks_per_row) * stride + (index // stride) % stride
    col = (block % blocks_per_row) * stride + index % stride
    return row, col


def block_order_raster_index(height: int, width: int, stride: int) -> np.ndarray:
    """For each packed row of a `height x width` frame, the raster index (`row * width + col`) of its patch."""
    row, col = block_order_position(np.arange(height * width), width, stride)
    return row * width + col


# ----------------------------------------------------------------------------------------------------------------------
# value checks
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


# ----------------------------------------------------------------------------------------------------------------------
# the other resize rules: SigLIP2 naflex, and a fixed-size centre crop (CLIP / AIMv2 224-px checkpoints)
# ----------------------------------------------------------------------------------------------------------------------

# How an image is sized before it is cut into patches (the processor's `resize_rule`):
#   "ovis":        `smart_resize` (keep the aspect ratio, area within [min_pixels, max_pixels]);
#   "naflex":      `naflex_resize` (keep the aspect ratio, at most `max_num_patches` patches), as SigLIP2 naflex;
#   "center_crop": `center_crop_plan` (short side to `shortest_edge`, then a centred `crop_size` window), as CLIP.
RESIZE_RULES = ("ovis", "naflex", "center_crop")

# naflex's search for the scale of an image (transformers' `get_image_size_for_max_num_patches`): a bisection on
# [NAFLEX_SCALE_TOLERANCE / 10, NAFLEX_MAX_SCALE) that stops once the interval is narrower than the tolerance.
NAFLEX_SCALE_TOLERANCE = 1e-5
NAFLEX_MAX_SCALE = 100.0


class ResizePlan(NamedTuple):
    """How one image (or every frame of a video) is sized: resized to `height x width`, then, with a `crop`, cut to
    the window `(top, left, crop_height, crop_width)` of the resized image."""

    height: int
    width: int
    crop: Optional[Tuple[int, int, int, int]] = None

    @property
    def size(self) -> Tuple[int, int]:
        """`(height, width)` of the image the patches are cut from."""
        return (self.crop[2], self.crop[3]) if self.crop else (self.height, self.width)


def naflex_resize(
    height: int, width: int, patch_size: int, max_num_patches: int, hidden_stride: int = 1
) -> Tuple[int, int]:
    """Target `(height, width)` of SigLIP2 naflex's resize: the largest aspect-preserving grid with at most
    `max_num_patches` patches.

    A scale `r` maps each side to `max(1, ceil(r * side / cell))` cells of `cell = patch_size * hidden_stride` pixels;
    the rule takes the largest `r` in `(0, 100)` whose grid has at most `max_num_patches // hidden_stride**2` cells,
    found, as transformers' `Siglip2ImageProcessor` finds it, by bisection to a tolerance of 1e-5. Consequences: both
    sides are rounded *up* to whole cells (a side is at least one cell), and an image is enlarged at most 100-fold
    (a 1x1 image becomes 7x7 patches of 16 px, not 16x16).

    With `hidden_stride = 1` this is naflex's rule exactly (the grid equals naflex's `spatial_shapes`). With
    `hidden_stride = s > 1` the same rule runs on `s x s` blocks of patches, so both sides are multiples of `s`
    patches and the patch count stays within `max_num_patches`.

    Returns:
        `Tuple[int, int]`: `(height, width)` in pixels, both positive multiples of `patch_size * hidden_stride`.
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    cell = _positive_int(patch_size, "patch_size") * _positive_int(hidden_stride, "hidden_stride")
    max_num_patches = _positive_int(max_num_patches, "max_num_patches")
    max_cells = max_num_patches // (hidden_stride * hidden_stride)
    if max_cells < 1:
        raise ValueError(
            f"`max_num_patches` ({max_num_patches}) must be at least hidden_stride**2 = {hidden_stride**2}: one "
            f"{hidden_stride}x{hidden_stride} block of patches."
        )

    def cells(scale: float, side: int) -> int:
        return max(1, math.ceil(side * scale / cell))

    low, high = NAFLEX_SCALE_TOLERANCE / 10, NAFLEX_MAX_SCALE
    while high - low >= NAFLEX_SCALE_TOLERANCE:
        scale = (low + high) / 2
        if cells(scale, height) * cells(scale, width) <= max_cells:
            low = scale
        else:
            high = scale
    return cells(low, height) * cell, cells(low, width) * cell


def center_crop_plan(height: int, width: int, shortest_edge: int, crop_size: Tuple[int, int]) -> ResizePlan:
    """CLIP's fixed-size preprocessing (what AIMv2's 224-px checkpoints were trained with): the short side is
    resized to `shortest_edge` and the long side to `int(shortest_edge * long / short)`, then the centred window of
    `crop_size = (crop_height, crop_width)` is kept (its top-left corner at `((H - crop_height) // 2,
    (W - crop_width) // 2)` of the resized `H x W` image), as transformers' `CLIPImageProcessor` does."""
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    resized_h, resized_w = (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)
    crop_h, crop_w = crop_size
    return ResizePlan(resized_h, resized_w, ((resized_h - crop_h) // 2, (resized_w - crop_w) // 2, crop_h, crop_w))


def check_center_crop(shortest_edge: Any, crop_size: Any, factor: int) -> Tuple[int, Tuple[int, int]]:
    """`shortest_edge` as an int and `crop_size` as `(height, width)` (an int, a pair or a `{"height", "width"}`
    dict); the crop must fit inside every resized image (sides at most `shortest_edge`) and be cut into whole
    `factor x factor` tiles (`factor = patch_size * hidden_stride`)."""
    if shortest_edge is None or crop_size is None:
        raise ValueError(
            "resize_rule='center_crop' needs `shortest_edge` (the short side after resizing) and `crop_size` (the "
            f"centred window kept), got shortest_edge={shortest_edge!r} and crop_size={crop_size!r}."
        )
    shortest_edge = _positive_int(shortest_edge, "shortest_edge")
    if isinstance(crop_size, dict):
        if set(crop_size) != {"height", "width"}:
            raise ValueError(f"`crop_size` as a dict must have the keys 'height' and 'width', got {sorted(crop_size)}.")
        crop_size = (crop_size["height"], crop_size["width"])
    elif np.ndim(crop_size) == 0:
        crop_size = (crop_size, crop_size)
    if len(crop_size) != 2:
        raise ValueError(f"`crop_size` must be one side or a (height, width) pair, got {crop_size!r}.")
    crop = (_positive_int(crop_size[0], "crop_size[0]"), _positive_int(crop_size[1], "crop_size[1]"))
    if max(crop) > shortest_edge:
        raise ValueError(
            f"`crop_size` {crop} does not fit in an image whose short side is resized to shortest_edge="
            f"{shortest_edge}; each crop side must be at most shortest_edge."
        )
    if crop[0] % factor or crop[1] % factor:
        raise ValueError(
            f"`crop_size` {crop} must be cut into whole patches: both sides must be multiples of patch_size * "
            f"hidden_stride = {factor}."
        )
    return shortest_edge, crop


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

