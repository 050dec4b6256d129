# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Pictures of what a packed encoder sees: `navit-visualize IMAGE... --model M --out DIR`, or `visualize(...)`.

Per image (or video), at the resolution the model saw it (the processor's resized image, one colour block per patch):

* `<name>.features.png`: the patch features projected on their first three principal components, one per RGB channel
  (the convention of the DINO and SigLIP2 papers: similar parts get similar colours). The projection is computed
  per image, over all its frames together, so a video's frames share one colouring;
* `<name>.attention.png` (models with a CLS token or a pooling query): where that query looks, blended over the
  image; DINOv3: the CLS token's attention in the last layer (eager backend), SigLIP2 with a MAP head and AIMv2 with
  its attention-pooling head: the pooling query's attention weights. Heads are averaged.

Video frames (one `grid_thws` row with `t > 1`) are laid side by side, left to right. Everything is deterministic: the
principal components come from an SVD and each is signed so that its largest-magnitude projection is positive.
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch

from ..navit_image_utils import block_order_raster_index


# ----------------------------------------------------------------------------------------------------------------------
# token order and principal components
# ----------------------------------------------------------------------------------------------------------------------


def raster_index(grid_h: int, grid_w: int, stride: int) -> torch.Tensor:
    """`[h·w]` positions, in a frame's packed rows (`navit_image_utils.block_order_position`: s×s blocks in raster
    order, each block's patches in raster order), of its patches in plain raster order."""
    if grid_h % stride or grid_w % stride:
        raise ValueError(f"A {grid_h}x{grid_w} patch grid is not made of {stride}x{stride} blocks.")
    packed_to_raster = block_order_raster_index(grid_h, grid_w, stride)  # [h·w]
    return torch.from_numpy(np.argsort(packed_to_raster, kind="stable"))


def principal_colours(features: torch.Tensor) -> torch.Tensor:
    """`[n, D]` features -> `[n, 3]` colours in [0, 1]: the projections on the first three principal components,
    each signed so that its largest-magnitude value is positive and min-max scaled (a constant channel is 0.5)."""
    centred = features.double() - features.double().mean(dim=0, keepdim=True)  # [n, D]
    if centred.shape[0] > 1 and bool(centred.abs().max() > 0):
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projections = centred @ vh[:3].T  # [n, <=3]
    else:
        projections = centred.new_zeros(centred.shape[0], 0)
    projections = torch.cat([projections, projections.new_zeros(projections.shape[0], 3 - projections.shape[1])], 1)
    peak = projections.gather(0, projections.abs().argmax(dim=0, keepdim=True))  # [1, 3]
    projections = projections * torch.where(peak < 0, -1.0, 1.0)
    low, high = projections.min(dim=0).values, projections.max(dim=0).values
    span = high - low
    scaled = (projections - low) / torch.where(span > 0, span, 1.0)
    return torch.where(span > 0, scaled, torch.full_like(scaled, 0.5)).float()


# ----------------------------------------------------------------------------------------------------------------------
# the images the model saw, and colour maps
# ----------------------------------------------------------------------------------------------------------------------


def _frames_to_picture(frames: np.ndarray) -> PIL.Image.Image:
    """`[t, H, W, 3]` uint8 frames -> one image, frames left to right."""
    return PIL.Image.fromarray(np.concatenate(list(frames), axis=1))


def blocks_to_pixels(values: np.ndarray, patch_size: int) -> np.ndarray:
    """`[t, h, w, C]` per-patch values -> `[t, h·p, w·p, C]`: each patch a p×p block of its value."""
    return values.repeat(patch_size, axis=1).repeat(patch_size, axis=2)


def seen_images(pixel_values: torch.Tensor, grid: Sequence[int], stride: int, processor: Any) -> np.ndarray:
    """The processor's output for one image or video turned back into uint8 frames `[t, h·p, w·p, 3]` (the first
    frame of every temporal patch): rows put in raster order, normalisation and rescaling undone."""
    t, h, w = (int(v) for v in grid)
    p, channels = int(processor.patch_size), 3
    frames_per_patch = pixel_values.shape[1] // (channels * p * p)
    rows = pixel_values.reshape(t, h * w, -1)[:, raster_index(h, w, stride)]  # [t, h·w, C·T·p·p], raster order
    patches = rows.reshape(t, h, w, channels, frames_per_patch, p, p)[:, :, :, :, 0].double()  # [t, h, w, C, p, p]
    if processor.do_normalize:
        std = torch.tensor(processor.image_std, dtype=torch.float64)[:, None, None]
        patches = patches * std + torch.tensor(processor.image_mean, dtype=torch.float64)[:, None, None]
    if processor.do_rescale:
        patches = patches / processor.rescale_factor
    image = patches.permute(0, 1, 4, 2, 5, 3).reshape(t, h * p, w * p, channels)  # [t, H, W, C]
    return image.round().clamp(0, 255).to(torch.uint8).numpy()


# Anchor colours of a dark-blue -> red -> yellow heat map (values 0, 1/3, 2/3, 1), interpolated linearly.
_HEAT = np.array([[0, 0, 40], [120, 30, 140], [230, 80, 30], [255, 240, 80]], dtype=np.float64)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT) - 1)
    low = np.minimum(position.astype(np.int64), len(_HEAT) - 2)
    fraction = (position - low)[..., None]
    return np.rint(_HEAT[low] * (1 - fraction) + _HEAT[low + 1] * fraction).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# attention of the CLS token / pooling query
# ----------------------------------------------------------------------------------------------------------------------


def pooling_query_weights(model: Any, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """`[heads, L]` attention weights of the model's pooling query over one image's tokens `[L, D]` (after the
    final norm: what the head pools); None when the model has no pooling head."""
    head = getattr(getattr(model, "vision_model", model), "head", None)
    if head is None:
        return None
    if hasattr(head, "probe"):  # SigLIP MAP head: nn.MultiheadAttention with a learned probe
        batch = tokens[None]  # [1, L, D]
        _, weights = head.attention(head.probe, batch, batch, need_weights=True, average_attn_weights=False)
        return weights[0, :, 0]  # [heads, L]
    if hasattr(head, "cls_token"):  # AIMv2 attention pooling: the unprojected query against k_proj of the tokens
        keys = head._heads(head.k_proj(tokens)[None])  # [1, heads, L, D/heads]
        query = head._heads(head.cls_token.to(keys.dtype))  # [1, heads, 1, D/heads]
        scores = query @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1])  # [1, heads, 1, L]
        return scores.softmax(dim=-1)[0, :, 0]  # [heads, L]
    return None


def attention_maps(model: Any, outputs: Any, grids: Sequence[Sequence[int]]) -> Optional[List[torch.Tensor]]:
    """Per image, `[t, h·w]` attention weights of its CLS token (DINOv3, last layer, from `outputs.attentions`) or
    of the pooling query, in packed row order; None when the model has neither."""
    counts = [int(t) * int(h) * int(w) for t, h, w in grids]
    if getattr(model.config, "num_prefix_tokens", 0) and outputs.attentions is not None:  # DINOv3: CLS first
        prefix = model.config.num_prefix_tokens
        frames = iter(outputs.attentions[-1])  # one [heads, P + h·w, P + h·w] map per frame, input order
        return [
            torch.stack([next(frames).mean(dim=0)[0, prefix:] for _ in range(int(t))]) for t, _, _ in grids
        ]  # [t, h·w] each
    maps = []
    for (t, h, w), tokens in zip(grids, outputs.last_hidden_state.split(counts)):
        weights = pooling_query_weights(model, tokens)  # [heads, t·h·w]: one query over all frames of the image
        if weights is None:
            return None
        maps.append(weights.mean(dim=0).reshape(int(t), int(h) * int(w)))
    return maps


# ----------------------------------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Pictures:
    """The pictures of one image or video: `features` (principal colours of the patch features) and, for models
    with a CLS token or pooling query, `attention`; both `w·p·t` wide and `h·p` high (frames left to right)."""

    grid: Tuple[int, int, int]
    features: PIL.Image.Image
    attention: Optional[PIL.Image.Image] = None


def _pictures_of(
    tokens: torch.Tensor, weights: Optional[torch.Tensor], seen: np.ndarray, grid: Tuple[int, int, int], stride: int,
    patch_size: int,
) -> Pictures:
    """Pictures of one image from its tokens `[t·h·w, D]` and attention `[t, h·w]` (packed order) and the frames
    the model saw `[t, H, W, 3]`."""
    t, h, w = grid
    order = raster_index(h, w, stride)
    raster = tokens.reshape(t, h * w, -1)[:, order].reshape(t * h * w, -1)  # [t·h·w, D], raster order per frame
    colours = principal_colours(raster).reshape(t, h, w, 3).numpy()
    features = _frames_to_picture(blocks_to_pixels(np.rint(colours * 255).astype(np.uint8), patch_size))
    attention = None
    if weights is not None:
        per_frame = weights.detach().double()[:, order].reshape(t, h, w, 1)
        low = per_frame.amin(dim=(1, 2, 3), keepdim=True)
        span = per_frame.amax(dim=(1, 2, 3), keepdim=True) - low
        per_frame = (per_frame - low) / span.clamp_min(1e-12)  # each frame from 0 (least attended) to 1 (most)
        heat = heat_colours(blocks_to_pixels(per_frame.numpy(), patch_size)[..., 0]).astype(np.float64)
        grey = seen.astype(np.float64).mean(axis=-1, keepdims=True)
        attention = _frames_to_picture(np.rint(0.65 * heat + 0.35 * grey).astype(np.uint8))
    return Pictures(grid, features, attention)


ImageLike = Union[str, Path, PIL.Image.Image, np.ndarray]

# At most this many patches per picture unless asked otherwise: the attention picture runs the eager backend, which
# keeps every layer's [heads, L, L] maps (at L = 1,024: 4 MiB per head and layer), so a full-resolution photo through
# a real model would take minutes and exhaust memory.
PICTURE_PATCHES = 1024


def picture_budget(processor: Any, max_patches: int = PICTURE_PATCHES) -> Dict[str, int]:
    """Per-call processor settings that keep a picture within `max_patches` patches (the folder's own budget where
    that is smaller; a fixed-size rule is left as it is)."""
    if processor.resize_rule == "naflex":
        return {"max_num_patches": min(processor.max_num_patches, max_patches)}
    if processor.resize_rule == "ovis":
        max_pixels = max(min(processor.max_pixels, max_patches * processor.patch_size**2), processor.factor**2)
        # the rule rounds an upscaled image's sides up (by up to one factor each): a lower bound of 3/4 of the upper
        # one keeps the result within it
        return {"min_pixels": max(min(processor.min_pixels, max_pixels * 3 // 4), processor.factor**2),
                "max_pixels": max_pixels}
    return {}


@torch.no_grad()
def visualize(
    model: Any,
    processor: Any,
    images: Sequence[ImageLike] = (),
    videos: Sequence[Sequence[ImageLike]] = (),
    attention: bool = True,
    **processor_kwargs: Any,
) -> List[Pictures]:
    """Pictures of `images` and `videos` (lists of frames), in that order, from one packed forward of `model`.

    Args:
        model: a loaded packed model (any family), in eval mode. For DINOv3's CLS attention the forward runs with
            `output_attentions=True`, which uses the eager backend.
        processor: the model folder's image processor.
        images, videos: what to picture; anything the processor accepts.
        attention (`bool`): also make the attention pictures (when the model has a CLS token or pooling query).
        processor_kwargs: per-call processor settings (e.g. `max_pixels=`).
    """
    if not images and not videos:
        raise ValueError("Pass at least one image or video to visualize.")
    inputs = processor(images=list(images) or None, videos=[list(v) for v in videos] or None, return_tensors="pt",
                       **processor_kwargs)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    wants_cls = attention and bool(getattr(model.config, "num_prefix_tokens", 0))
    outputs = model(inputs["pixel_values"].to(device, dtype), inputs["grid_thws"], output_attentions=wants_cls)
    grids = [tuple(int(v) for v in g) for g in inputs["grid_thws"].tolist()]
    weights = attention_maps(model, outputs, grids) if attention else None
    stride, patch_size = int(model.config.hidden_stride), int(model.config.patch_size)
    counts = [t * h * w for t, h, w in grids]
    pictures = []
    for i, (grid, tokens, rows) in enumerate(
        zip(grids, outputs.last_hidden_state.float().cpu().split(counts), inputs["pixel_values"].split(counts))
    ):
        seen = seen_images(rows, grid, stride, processor)
        image_weights = None if weights is None else weights[i].float().cpu()
        pictures.append(_pictures_of(tokens, image_weights, seen, grid, stride, patch_size))
    return pictures


def save_pictures(pictures: Pictures, out_dir: Union[str, Path], name: str) -> List[Path]:
    """Write `<name>.features.png` (and `<name>.attention.png`) into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, picture in (("features", pictures.features), ("attention", pictures.attention)):
        if picture is not None:
            path = out_dir / f"{name}.{kind}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            picture.save(tmp, format="PNG")
            tmp.replace(path)
            written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="navit-visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (with --video: the frames of one video)")
    parser.add_argument("--model", required=True, help="converted model folder or Hub id")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder the PNG files are written to")
    parser.add_argument("--video", action="store_true", help="the IMAGEs are the frames of one video, in order")
    parser.add_argument("--no-attention", action="store_true", help="only the feature pictures")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help=f"per-image pixel budget (Ovis rule); default: the folder's, within {PICTURE_PATCHES} patches")
    parser.add_argument("--max-num-patches", type=int, default=None,
                        help=f"per-image patch budget (naflex rule); default: the folder's, within {PICTURE_PATCHES}")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [name for name in args.images if not Path(name).is_file()]
    if missing:
        print(f"error: no such image file(s): {', '.join(missing)}", file=sys.stderr)
        return 1
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, attn_implementation="eager").eval()
    settings = {key: value for key, value in (("max_pixels", args.max_pixels), ("max_num_patches", args.max_num_patches))
                if value is not None} or picture_budget(processor)
    try:
        if args.video:
            pictures = visualize(model, processor, videos=[args.images], attention=not args.no_attention, **settings)
            names = [Path(args.images[0]).stem + ".video"]
        else:
            pictures = visualize(model, processor, images=args.images, attention=not args.no_attention, **settings)
            stems = [Path(name).stem for name in args.images]
            names = [stem if stems.count(stem) == 1 else f"{stem}-{i}" for i, stem in enumerate(stems)]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for picture, name in zip(pictures, names):
        for path in save_pictures(picture, args.out, name):
            print(f"wrote {path} (grid t, h, w = {picture.grid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
