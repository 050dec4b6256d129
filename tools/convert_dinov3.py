# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Convert a transformers DINOv3 ViT checkpoint into a packed (NaViT) `Dinov3NavitModel` Hub model folder.

SRC is a local `DINOv3ViTModel` folder (safetensors), e.g. a download of facebook/dinov3-vitl16-pretrain-lvd1689m.
The tensors are kept exactly as they are: the model's parameter names are those of the files, which transformers
writes as `embeddings.*`, `layer.N.*`, `norm.*` (its module path is `model.layer.N.*`; files saved with that path are
accepted too). The config keeps transformers' field names and values; `--hidden-stride` sets the token order of the
packed rows: 1 (default) is raster order, s orders each frame in s×s blocks for an LLM-side merger (the encoder
output is the same up to that permutation).

The converted processor keeps the source's `preprocessor_config.json` normalisation (`image_mean`, `image_std`,
`resample`); without one it uses DINOv3's defaults (ImageNet mean/std, bilinear). Images keep their aspect ratio
(no 224×224 resize): the pixel budget is the processor's `min_pixels` / `max_pixels`.

Example:
    navit-convert dinov3 ~/models/dinov3-vitl16-pretrain-lvd1689m ./dinov3-navit-vitl16 \\
        --base-model facebook/dinov3-vitl16-pretrain-lvd1689m
"""

import sys
from pathlib import Path
from typing import Any, Dict, Optional


from . import checkpoint_utils as utils


_DINOV3_DEFAULTS = {  # transformers' DINOv3ViTConfig defaults, for fields a saved config may omit
    "patch_size": 16,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "hidden_act": "gelu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "rope_theta": 100.0,
    "image_size": 224,
    "num_channels": 3,
    "query_bias": True,
    "key_bias": False,
    "value_bias": True,
    "proj_bias": True,
    "mlp_bias": True,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "use_gated_mlp": False,
    "num_register_tokens": 0,
    "pos_embed_shift": None,
    "pos_embed_jitter": None,
    "pos_embed_rescale": 2.0,
}
_MODULE_PATH = "model.layer."  # transformers' module path of the layers; the files it writes say `layer.`


def navit_config_kwargs(config: Dict[str, Any], hidden_stride: int) -> Dict[str, Any]:
    """`Dinov3NavitConfig` fields of a `DINOv3ViTModel` `config.json` (defaults filled in, backbone fields dropped)."""
    model_type = config.get("model_type")
    if model_type != "dinov3_vit":
        raise utils.ConversionError(
            f"config.json has model_type {model_type!r}; expected a transformers DINOv3 ViT checkpoint ('dinov3_vit'). "
            "ConvNeXt DINOv3 checkpoints ('dinov3_convnext') are not ViTs."
        )
    values = {name: config.get(name, default) for name, default in _DINOV3_DEFAULTS.items()}
    values["patch_size"] = utils.square_side(values["patch_size"], "patch_size")
    values["image_size"] = utils.square_side(values["image_size"], "image_size")
    return {**values, "hidden_stride": hidden_stride, "temporal_patch_size": 1}


def checkpoint_names(keys) -> Dict[str, str]:
    """Source tensor name -> model parameter name: unchanged, but for layers saved under the module path."""
    return {key: "layer." + key[len(_MODULE_PATH) :] if key.startswith(_MODULE_PATH) else key for key in keys}


def convert(
    src, dst, hidden_stride: int = 1, overwrite: bool = False, dtype: str = "keep", base_model: Optional[str] = None
) -> Path:
    """Convert the DINOv3ViTModel folder `src` into the Dinov3NavitModel folder `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    utils.check_destination(dst, src, overwrite)
    checkpoint = utils.SafetensorsCheckpoint(src)
    try:
        config = utils.config_class(utils.DINOV3)(
            **navit_config_kwargs(utils.read_json(src / "config.json"), hidden_stride)
        )
    except ValueError as err:
        raise utils.ConversionError(f"Cannot build a Dinov3NavitConfig from {src}: {err}") from None
    processor_kwargs = utils.source_processor_kwargs(src, config)  # read (and checked) before any tensor

    names = checkpoint_names(checkpoint.keys())
    return utils.convert_renamed_tensors(
        src, dst, checkpoint, names, config, "navit-convert dinov3", "Reading the DINOv3 tensors", overwrite, dtype, base_model, processor_kwargs
    )


def main(argv=None, prog=None) -> int:
    parser = utils.conversion_parser(
        description=__doc__,
        src_help="local transformers DINOv3ViTModel folder (safetensors), e.g. dinov3-vitl16-pretrain-lvd1689m",
        prog=prog,
    )
    stride_help = "token order of the converted model: 1 = raster, s = s×s blocks (2 for an Ovis-style merger)"
    parser.add_argument("--hidden-stride", type=int, default=1, metavar="S", help=stride_help)
    args = parser.parse_args(argv)
    return utils.run_cli(convert, args, hidden_stride=args.hidden_stride)


if __name__ == "__main__":
    sys.exit(main())
