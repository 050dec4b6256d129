# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Convert a transformers SigLIP2 naflex checkpoint into a siglip2-navit Hub model folder.

SRC is a local `Siglip2VisionModel` or `Siglip2Model` folder (safetensors), e.g. a download of
google/siglip2-so400m-patch16-naflex. Only the vision tower is taken (text tower, logit scale and bias are never
read). The weights map one to one, except the patch embedding: naflex stores it as a Linear over patches flattened
(row-in-patch, col-in-patch, channel); it is permuted to this model's Conv2d layout `[hidden, C, p, p]`.

The written config reproduces naflex exactly: the 16x16 learned PE grid (`image_size = 16 * patch_size`) resized
bilinear with antialias (`pe_interpolation="bilinear"`, `pe_antialias=true`), no RoPE (`use_rope=false`), full
attention in every layer, and the MAP head (`vision_use_head=true`) carried over. `--hidden-stride` sets the token
order: 1 (default) is naflex's raster order; 2 orders tokens in 2x2 blocks, ready for an Ovis-style merger (the
encoder output is the same up to that permutation, since attention is permutation-equivariant).

`--temporal-patch-size T` (default 1) makes a video-ready model that folds T frames into each patch: the image
patch embedding is inflated to T frames by repeating it over time and dividing by T (each input channel (c, t) of the
`[hidden, C·T, p, p]` Conv2d gets W[:, c] / T). A patch whose T frames are equal, which is what the image processor
makes of a still image, therefore embeds exactly as the naflex model embeds that image.

The folder's processor resizes as naflex does (`resize_rule="naflex"`: the largest grid of at most `max_num_patches`
patches, the source processor's budget, 256 when it has none; its resampling and normalisation), so the folder's
`AutoImageProcessor` + `AutoModel` give naflex's grids and features. With `--hidden-stride 2` the rule runs on 2x2
blocks of patches (even grids, within the same patch budget), since naflex's own grids are often odd.

Feeding naflex-processed inputs: `naflex_to_packed(pixel_values, pixel_attention_mask, spatial_shapes)` (in
`navit_batching.py`, re-exported here) turns the output of transformers' `Siglip2ImageProcessor` into this model's
packed `pixel_values` and `grid_thws`.

Example:
    navit-convert siglip2-naflex ~/models/siglip2-so400m-patch16-naflex ./siglip2-navit-so400m-naflex \\
        --base-model google/siglip2-so400m-patch16-naflex
"""

import math
import sys
from pathlib import Path
from typing import Any, Dict

import torch

from . import checkpoint_utils as utils
from . import resize_settings


PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding.weight"
_NAFLEX_DEFAULTS = {  # transformers' Siglip2VisionConfig defaults, for fields a saved config may omit
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_patches": 256,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "vision_use_head": True,
}


# ----------------------------------------------------------------------------------------------------------------------
# naflex processor output -> packed inputs
# ----------------------------------------------------------------------------------------------------------------------


# `naflex_to_packed` lives in the image-processing module (it ships with every Hub folder); re-exported here.
from ..navit_batching import naflex_to_packed  # noqa: E402  (re-exported: part of this script's API)


# ----------------------------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------------------------


def vision_config_of(config: Dict[str, Any]) -> Dict[str, Any]:
    """The vision config of a `Siglip2VisionModel` or `Siglip2Model` `config.json`, defaults filled in."""
    model_type = config.get("model_type")
    if model_type == "siglip2":
        vision = config.get("vision_config") or {}
    elif model_type == "siglip2_vision_model":
        vision = config
    else:
        raise utils.ConversionError(
            f"config.json has model_type {model_type!r}; expected a SigLIP2 naflex checkpoint ('siglip2' or "
            f"'siglip2_vision_model'). Fixed-resolution SigLIP2 checkpoints ('siglip') are not naflex."
        )
    if not isinstance(vision, dict):
        raise utils.ConversionError(f"config.json's vision config must be a JSON object, got {vision!r}.")
    return {**_NAFLEX_DEFAULTS, **vision}


def navit_config_kwargs(vision: Dict[str, Any], hidden_stride: int, temporal_patch_size: int = 1) -> Dict[str, Any]:
    side = math.isqrt(int(vision["num_patches"]))
    if side * side != vision["num_patches"]:
        raise utils.ConversionError(f"num_patches={vision['num_patches']} is not a square: no 2D PE grid.")
    return dict(
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        num_channels=vision["num_channels"],
        patch_size=vision["patch_size"],
        temporal_patch_size=temporal_patch_size,
        image_size=side * vision["patch_size"],
        hidden_act=vision["hidden_act"],
        layer_norm_eps=vision["layer_norm_eps"],
        attention_dropout=vision["attention_dropout"],
        hidden_stride=hidden_stride,
        fullatt_block_indexes=None,
        preserve_original_pe=True,
        use_rope=False,
        pe_interpolation="bilinear",
        pe_antialias=True,
        vision_use_head=bool(vision["vision_use_head"]),
    )


def patch_embedding_to_conv(weight: torch.Tensor, num_channels: int, patch_size: int) -> torch.Tensor:
    """`[hidden, p·p·C]` Linear weight (row, col, channel) -> `[hidden, C, p, p]` Conv2d weight."""
    hidden = weight.shape[0]
    return weight.reshape(hidden, patch_size, patch_size, num_channels).permute(0, 3, 1, 2).contiguous()


def inflate_temporal(weight: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """`[hidden, C, p, p]` image patch embedding -> `[hidden, C·T, p, p]` over T frames, input channels in the packed
    row order (channel, temporal): channel c·T + t holds W[:, c] / T, so T equal frames embed as the one image."""
    if temporal_patch_size == 1:
        return weight
    return (weight.repeat_interleave(temporal_patch_size, dim=1) / temporal_patch_size).contiguous()


def convert(
    src, dst, hidden_stride: int = 1, overwrite: bool = False, dtype: str = "keep", base_model=None,
    temporal_patch_size: int = 1,
) -> Path:
    """Convert the SigLIP2 naflex folder `src` into the siglip2-navit folder `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    if isinstance(temporal_patch_size, bool) or not isinstance(temporal_patch_size, int) or temporal_patch_size < 1:
        raise utils.ConversionError(f"temporal_patch_size must be a positive integer, got {temporal_patch_size!r}.")
    utils.check_destination(dst, src, overwrite)
    checkpoint = utils.SafetensorsCheckpoint(src)
    vision = vision_config_of(utils.read_json(src / "config.json"))
    try:
        config = utils.config_class()(**navit_config_kwargs(vision, hidden_stride, temporal_patch_size))
    except ValueError as err:
        raise utils.ConversionError(f"Cannot build a Siglip2NavitConfig from {src}: {err}") from None

    # Siglip2Model and transformers 4.x Siglip2VisionModel files use `vision_model.`; 5.x Siglip2VisionModel has none.
    keys = checkpoint.keys()
    if any(key.startswith("vision_model.") for key in keys):
        names = {key: key for key in keys if key.startswith("vision_model.")}
    else:
        names = {key: "vision_model." + key for key in keys}
    p, c = config.patch_size, config.num_channels
    header_shapes = {names[key]: shape for key, shape in checkpoint.shapes(names).items()}
    if PATCH_EMBEDDING in header_shapes:
        hidden, flat = header_shapes[PATCH_EMBEDDING]
        header_shapes[PATCH_EMBEDDING] = (hidden, c * temporal_patch_size, p, p) if flat == c * p * p else (hidden, flat)
    utils.check_shapes(header_shapes, utils.expected_shapes(config), f"Checkpoint {src}")

    # naflex's own resize rule and budget, so that the folder's processor gives naflex's grids
    processor_kwargs = utils.source_processor_kwargs(
        src, config, lambda source: resize_settings.naflex_settings(source, config.patch_size)
    )
    tensors = checkpoint.read(names, desc="Reading the vision tower")
    state_dict = {names[key]: t for key, t in tensors.items()}
    conv = patch_embedding_to_conv(state_dict[PATCH_EMBEDDING], c, p)  # [D, C, p, p]
    state_dict[PATCH_EMBEDDING] = inflate_temporal(conv, temporal_patch_size)  # [D, C·T, p, p]
    state_dict = utils.cast(state_dict, dtype)
    return utils.convert_to_folder(
        src, dst, state_dict, config, "navit-convert siglip2-naflex", overwrite=overwrite, base_model=base_model,
        processor_kwargs=processor_kwargs,
    )


def main(argv=None, prog=None) -> int:
    parser = utils.conversion_parser(
        description=__doc__,
        src_help="local transformers Siglip2VisionModel or Siglip2Model folder (safetensors), e.g. siglip2-*-naflex",
        prog=prog,
    )
    parser.add_argument(
        "--hidden-stride",
        type=int,
        default=1,
        help="token order of the converted model: 1 = raster (naflex), 2 = 2x2 blocks for an Ovis-style merger",
    )
    parser.add_argument(
        "--temporal-patch-size",
        type=int,
        default=1,
        help="frames per patch of the converted model: 1 = images (naflex); 2 = video-ready, the image patch "
        "embedding inflated over 2 frames (equal frames embed as the image)",
    )
    args = parser.parse_args(argv)
    return utils.run_cli(
        convert, args, hidden_stride=args.hidden_stride, temporal_patch_size=args.temporal_patch_size
    )


if __name__ == "__main__":
    sys.exit(main())
