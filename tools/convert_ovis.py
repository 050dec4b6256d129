# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Extract the vision tower of an Ovis2.5 checkpoint into a stand-alone siglip2-navit Hub model folder.

SRC is a local Ovis2.5 model folder (e.g. a download of AIDC-AI/Ovis2.5-9B): sharded `model-*.safetensors`,
`model.safetensors.index.json` and `config.json`. The tensors under `visual_tokenizer.vit.` (prefix stripped: they
are already named as this model's parameters) and the `vit_config` block of SRC's config are taken; the language
model, the visual head and the visual embedding table are never read. Only the shards that hold vision-tower tensors
are opened, and only those tensors are read from them.

DST becomes a complete Hub model folder: model.safetensors, config.json (with auto_map), preprocessor_config.json,
processor_config.json, the three .py files and the model card. It is written into a temporary folder beside DST and
renamed into place at the end, so an interrupted run never leaves a half-written DST.

Example:
    navit-convert ovis ~/models/Ovis2.5-9B ./siglip2-navit-ovis2.5-9b \\
        --base-model AIDC-AI/Ovis2.5-9B
"""

import sys
from pathlib import Path
from typing import Any, Dict, Tuple

from . import checkpoint_utils as utils


VIT_PREFIX = "visual_tokenizer.vit."
# Fields of an Ovis `vit_config` that describe the file or the runtime, not the architecture.
_IGNORED_VIT_FIELDS = {
    "_name_or_path",
    "_attn_implementation_autoset",
    "_attn_implementation",
    "architectures",
    "auto_map",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
}


def vit_config_kwargs(ovis_config: Dict[str, Any], has_head: bool) -> Tuple[Dict[str, Any], list]:
    """Map the `vit_config` block of an Ovis2.5 `config.json` to `Siglip2NavitConfig` keyword arguments.

    Returns the kwargs and the names of the fields that were dropped because the model has no use for them.
    `fullatt_block_indexes` may be the legacy `"7|15|23"` string (normalised to a list by the config class);
    `hidden_stride`, `window_size`, `temporal_patch_size`, `preserve_original_pe`, `use_rope`, ... are kept as they are.
    """
    vit = ovis_config.get("vit_config")
    if not isinstance(vit, dict):
        raise utils.ConversionError("config.json has no `vit_config` block: is SRC an Ovis2.5 model folder?")
    model_type = vit.get("model_type", "siglip2_navit")
    if model_type != "siglip2_navit":
        raise utils.ConversionError(
            f"vit_config.model_type is {model_type!r}; only Ovis2.5's 'siglip2_navit' vision tower is supported "
            f"(Ovis1.x/2 use other towers)."
        )
    known = utils.config_fields()
    kwargs, dropped = {}, []
    for key, value in vit.items():
        if key in _IGNORED_VIT_FIELDS:
            continue
        if key in known:
            kwargs[key] = value
        else:
            dropped.append(key)
    kwargs.setdefault("vision_use_head", has_head)
    return kwargs, sorted(dropped)


def convert(src, dst, overwrite: bool = False, dtype: str = "keep", base_model=None) -> Path:
    """Convert the Ovis2.5 folder `src` into the siglip2-navit folder `dst`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    utils.check_destination(dst, src, overwrite)
    checkpoint = utils.SafetensorsCheckpoint(src)
    ovis_config = utils.read_json(src / "config.json")

    vit_keys = [key for key in checkpoint.keys() if key.startswith(VIT_PREFIX)]
    if not vit_keys:
        raise utils.ConversionError(f"No tensors under {VIT_PREFIX!r} in {src}: is it an Ovis2.5 checkpoint?")
    names = {key: key[len(VIT_PREFIX) :] for key in vit_keys}
    has_head = any(name.startswith("vision_model.head.") for name in names.values())
    kwargs, dropped = vit_config_kwargs(ovis_config, has_head)
    if dropped:
        print(f"Ignoring vit_config fields this model does not use: {', '.join(dropped)}")
    try:
        config = utils.config_class()(**kwargs)
    except ValueError as err:
        raise utils.ConversionError(f"vit_config is not a valid Siglip2NavitConfig: {err}") from None

    # Check names and shapes from the safetensors headers before reading gigabytes.
    header_shapes = checkpoint.shapes(vit_keys)
    utils.check_shapes(
        {names[key]: shape for key, shape in header_shapes.items()}, utils.expected_shapes(config), f"Checkpoint {src}"
    )
    tensors = checkpoint.read(vit_keys, desc="Reading the vision tower")
    state_dict = utils.cast({names[key]: t for key, t in tensors.items()}, dtype)
    return utils.convert_to_folder(
        src, dst, state_dict, config, "navit-convert ovis", overwrite=overwrite, base_model=base_model
    )


def main(argv=None, prog=None) -> int:
    parser = utils.conversion_parser(
        description=__doc__,
        src_help="local Ovis2.5 model folder (model-*.safetensors + model.safetensors.index.json + config.json)",
        prog=prog,
    )
    return utils.run_cli(convert, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
