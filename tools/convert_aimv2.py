# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Convert a transformers AIMv2 checkpoint into an AIMv2 NaViT (packed) Hub model folder.

SRC is a local `Aimv2VisionModel` folder (safetensors), e.g. a download of apple/aimv2-large-patch14-native, or an
`Aimv2Model` folder (vision + text towers): then only the vision tower is read (`vision_model.*`; the text tower and
projections are never touched). The tensors are kept exactly as stored: `Aimv2NavitModel` has transformers'
parameter names and layouts (the patch embedding stays a Conv2d weight, applied to packed rows as one matmul).

The written config carries transformers' `Aimv2VisionConfig` fields (defaults filled in for fields the source
omits). Native-resolution checkpoints (`is_native: true`) encode any image size; the others have a learned position
table for their trained grid and accept only that grid (`image_size // patch_size` patches per side), so their
folder's processor resizes and crops as the source's CLIP processor does (`resize_rule="center_crop"`: short side to
`size.shortest_edge`, centred `crop_size` window, both `image_size` by default) and encodes any image; a source crop
that is not the table's grid is refused.
`--hidden-stride` sets the token order: 1 (default) is raster order, 2 orders tokens in 2x2 blocks, ready for an
LLM-side merger. The converted processor takes the source's `preprocessor_config.json` normalisation (`image_mean`,
`image_std`, `resample`), else AIMv2's defaults (CLIP mean/std, bicubic).

Example:
    navit-convert aimv2 ~/models/aimv2-large-patch14-native ./aimv2-navit-large-native \\
        --base-model apple/aimv2-large-patch14-native
"""

import sys
from pathlib import Path
from typing import Any, Dict, Optional

from . import checkpoint_utils as utils
from . import resize_settings


VISION_PREFIX = "vision_model."  # where an Aimv2Model folder keeps its vision tower
DERIVED_BUFFERS = ("embeddings.position_ids",)  # non-persistent in transformers; never a weight, if ever saved
_VISION_DEFAULTS = {  # transformers' Aimv2VisionConfig defaults, for fields a saved config may omit
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 24,
    "num_attention_heads": 8,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-5,
    "qkv_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "use_head": True,
    "is_native": False,
}


def vision_config_of(config: Dict[str, Any]) -> Dict[str, Any]:
    """The vision config of an `Aimv2VisionModel` or `Aimv2Model` `config.json`, defaults filled in."""
    model_type = config.get("model_type")
    vision = {"aimv2": config.get("vision_config") or {}, "aimv2_vision_model": config}.get(model_type)
    if vision is None:
        raise utils.ConversionError(
            f"config.json has model_type {model_type!r}; expected a transformers AIMv2 checkpoint ('aimv2_vision_model' "
            "or 'aimv2')."
        )
    return {**_VISION_DEFAULTS, **vision}


def navit_config_kwargs(vision: Dict[str, Any], hidden_stride: int) -> Dict[str, Any]:
    """Aimv2NavitConfig arguments: the source's vision fields unchanged, plus the packed token order."""
    kwargs = {name: vision[name] for name in _VISION_DEFAULTS}
    kwargs["image_size"] = utils.square_side(vision["image_size"], "image_size")
    kwargs["patch_size"] = utils.square_side(vision["patch_size"], "patch_size")
    kwargs["hidden_stride"] = hidden_stride
    return kwargs


def vision_tensor_names(keys, src: Path) -> Dict[str, str]:
    """Source tensor name -> model parameter name for the vision tower (a whole `Aimv2VisionModel`, or the
    `vision_model.` part of an `Aimv2Model`); derived buffers are skipped."""
    if any(key.startswith(VISION_PREFIX) for key in keys):
        names = {key: key[len(VISION_PREFIX) :] for key in keys if key.startswith(VISION_PREFIX)}
    elif any(key.startswith("text_model.") for key in keys):
        raise utils.ConversionError(f"{src} has a text tower but no `{VISION_PREFIX}*` tensors: no vision tower.")
    else:
        names = {key: key for key in keys}
    return {key: name for key, name in names.items() if name not in DERIVED_BUFFERS}


def convert(
    src,
    dst,
    hidden_stride: int = 1,
    overwrite: bool = False,
    dtype: str = "keep",
    base_model: Optional[str] = None,
) -> Path:
    """Convert the transformers AIMv2 folder `src` into the AIMv2 NaViT folder `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    utils.check_destination(dst, src, overwrite)
    checkpoint = utils.SafetensorsCheckpoint(src)
    vision = vision_config_of(utils.read_json(src / "config.json"))
    try:
        config = utils.config_class(utils.AIMV2)(**navit_config_kwargs(vision, hidden_stride))
    except ValueError as err:
        raise utils.ConversionError(f"Cannot build an Aimv2NavitConfig from {src}: {err}") from None
    # a learned table for one grid: the source's fixed-size resize and crop, so that the folder encodes any image
    fixed = None if config.is_native else (
        lambda source: resize_settings.fixed_size_settings(source, config.image_size, config.patch_size)
    )
    processor_kwargs = utils.source_processor_kwargs(src, config, fixed)  # read (and checked) before any tensor

    names = vision_tensor_names(checkpoint.keys(), src)
    return utils.convert_renamed_tensors(
        src, dst, checkpoint, names, config, "navit-convert aimv2", "Reading the vision tower", overwrite, dtype, base_model, processor_kwargs
    )


STRIDE_HELP = "token order of the converted model: 1 = raster (default), 2 = 2x2 blocks for an LLM-side merger"
SRC_HELP = "local transformers Aimv2VisionModel or Aimv2Model folder (safetensors), e.g. aimv2-*-native"


def main(argv=None, prog=None) -> int:
    parser = utils.conversion_parser(__doc__, SRC_HELP, prog)
    parser.add_argument("--hidden-stride", type=int, choices=(1, 2), default=1, help=STRIDE_HELP)
    args = parser.parse_args(argv)
    return utils.run_cli(convert, args, hidden_stride=args.hidden_stride)


if __name__ == "__main__":
    sys.exit(main())
