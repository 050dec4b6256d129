# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""What every converter shares: writing a complete Hub model folder, the conversion steps around it, the command line.

The pieces it builds on are their own modules (`families`: the registry; `pickle_sniff`: the kind of pickle named in a
message; `safetensors_io`: safetensors-only reading and shape checks; `atomic`: the folder replaced atomically); this
module re-exports what a converter needs, so a converter imports only `checkpoint_utils`.

Nothing here unpickles anything: sources must be safetensors, and a folder holding only pickle weights
(`pytorch_model.bin`, `*.pt`, ...) is refused with a clear message. Pickles are recognised by content as well as by
name (`pickle_reason`), shard names may not lead out of the source folder, a malformed shard or a NaN/Inf weight is
one clear `ConversionError`, and DST is replaced so that a killed run leaves the old or the new folder (or one that
the next run restores: `recover_interrupted`).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import transformers
from packaging import version
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import card

# Everything the converters, push and tests use, from the modules this one was cut into (one import for a converter).
from .atomic import (  # noqa: F401
    _HOST,
    atomic_write_folder,
    check_destination,
    recover_interrupted,
)
from .families import (  # noqa: F401
    AIMV2,
    CARD_ASSETS,
    CODE_FILES,
    CORE_FILES,
    CUSTOM_PIPELINES,
    DINOV3,
    DTYPES,
    FAMILIES,
    MODEL_CARD,
    PACKAGE,
    PACKAGE_DIR,
    SIGLIP2,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ConversionError,
    Family,
    config_class,
    config_fields,
    expected_shapes,
    family_of,
    import_package,
    model_class,
    processor_class,
)
from .pickle_sniff import PICKLE_SUFFIXES, pickle_files, pickle_reason  # noqa: F401
from .safetensors_io import (  # noqa: F401
    SafetensorsCheckpoint,
    check_finite,
    check_keys,
    check_shapes,
    open_safetensors,
    read_json,
    resolve_inside,
)

# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------


def save_model_folder(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    config,
    base_model: Optional[str] = None,
    source_note: Optional[str] = None,
    processor_kwargs: Optional[Mapping[str, Any]] = None,
    command: Optional[str] = None,
):
    """Write a complete Hub model folder into the (existing, empty) `folder`.

    Files: `model.safetensors`, `config.json` (with `auto_map` and `custom_pipelines`), `preprocessor_config.json`
    and `processor_config.json` (patch size and stride from `config`; normalisation, resampling and resize rule from
    `processor_kwargs`, else the family's defaults), the family's `.py` files, the `examples/` images, `pictures/`
    (the converted model's view of an example image) and `README.md`, the card generated for this folder
    (`tools/card.py`). `source_note`: where the weights came from, and `command` the command that converted them.
    """
    family = family_of(config)

    config.auto_map = dict(family.auto_map)
    config.custom_pipelines = json.loads(json.dumps(CUSTOM_PIPELINES))  # a deep copy: the config may be reused
    config.architectures = [family.model_class_name]
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) == 1:
        dtype = str(next(iter(dtypes))).replace("torch.", "")
        if version.parse(transformers.__version__) < version.parse("4.56"):
            config.torch_dtype = dtype  # renamed `dtype` in 4.56
        else:
            config.dtype = dtype
    config.save_pretrained(str(folder))

    tensors = {name: t.contiguous() for name, t in state_dict.items()}
    try:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    except SafetensorError as err:  # e.g. the disk is full: safetensors raises its own error, not an OSError
        raise ConversionError(f"Writing {folder / WEIGHTS_NAME} failed: {err}") from None

    processor = processor_class()(
        **{**family.processor_defaults, **(processor_kwargs or {})},
        patch_size=config.patch_size,
        temporal_patch_size=getattr(config, "temporal_patch_size", 1),
        hidden_stride=config.hidden_stride,
    )
    processor.save_pretrained(str(folder))
    for name in family.code_files:
        shutil.copyfile(PACKAGE_DIR / name, folder / name)
    for name in CARD_ASSETS:
        shutil.copytree(PACKAGE_DIR / name, folder / name)
    model = model_class(family).from_pretrained(str(folder), attn_implementation="eager").eval()
    card.draw_pictures(folder, model, processor)
    del model
    card.write_card(folder, config, processor, base_model, source_note, command)



def convert_to_folder(
    src, dst, state_dict, config, script: str, overwrite=False, base_model=None, processor_kwargs=None
) -> Path:
    """Validate `state_dict` against `config`, then write DST atomically (`script` is named in the model card)."""
    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    check_shapes(shapes, expected_shapes(config), f"Checkpoint {src}")
    source = f"`{Path(src).name}`"
    return atomic_write_folder(
        dst,
        lambda tmp: save_model_folder(tmp, state_dict, config, base_model, source, processor_kwargs, script),
        overwrite,
    )


def convert_renamed_tensors(
    src, dst, checkpoint, names: Mapping[str, str], config, script: str, desc: str, overwrite=False, dtype="keep",
    base_model=None, processor_kwargs=None,
) -> Path:
    """The tensors of `checkpoint` named in `names` (source name -> model name), unchanged: header shapes checked
    against `config` before any data is read, then read, cast to `dtype` and written to DST atomically."""
    header_shapes = {names[key]: shape for key, shape in checkpoint.shapes(names).items()}
    check_shapes(header_shapes, expected_shapes(config), f"Checkpoint {src}")
    tensors = checkpoint.read(names, desc=desc)
    state_dict = cast({names[key]: t for key, t in tensors.items()}, dtype)
    return convert_to_folder(src, dst, state_dict, config, script, overwrite, base_model, processor_kwargs)


def square_side(value: Any, name: str) -> int:
    """A transformers size field (an int, or a square [side, side] pair) -> the side; non-square is refused."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"`{name}` {value!r} is not square; the packed models need square patches and grids.")
        value = value[0]
    return value


def _resample(value: Any) -> int:
    """A PIL resampling filter from a preprocessor config (an int, or a name such as "bilinear")."""
    import PIL.Image

    if isinstance(value, str):
        try:
            return int(PIL.Image.Resampling[value.upper()])
        except KeyError:
            raise ConversionError(f"Unknown `resample` {value!r} in preprocessor_config.json.") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConversionError(f"`resample` in preprocessor_config.json must be a PIL filter, got {value!r}.")
    return value


def source_processor_kwargs(
    src: Path, config: Any = None, resize_rule: Optional[Callable[[Optional[Dict[str, Any]]], Dict[str, Any]]] = None
) -> Optional[Dict[str, Any]]:
    """The converted folder's processor settings from the source's `preprocessor_config.json`: its `image_mean`,
    `image_std` and `resample` (those it has), plus `resize_rule(source settings or None)` (the family's resize rule,
    see `tools/resize_settings.py`). Checked by building the processor now (with `config`'s patch size and stride)
    rather than half-way through writing DST; None when there is neither a file nor a rule (the defaults apply)."""
    path = Path(src) / "preprocessor_config.json"
    source = read_json(path) if path.is_file() else None
    if source is None and resize_rule is None:
        return None
    source_settings = source or {}
    kwargs = {
        name: source_settings[name] for name in ("image_mean", "image_std") if source_settings.get(name) is not None
    }
    if source_settings.get("resample") is not None:
        kwargs["resample"] = _resample(source_settings["resample"])
    geometry = {} if config is None else {"patch_size": config.patch_size, "hidden_stride": config.hidden_stride}
    try:
        if resize_rule is not None:
            kwargs.update(resize_rule(source))
        processor_class()(**kwargs, **geometry)
    except ValueError as err:
        raise ConversionError(f"{path}: cannot reproduce the source's preprocessing: {err}") from None
    return kwargs


def cast(state_dict: Dict[str, torch.Tensor], dtype: Optional[str]) -> Dict[str, torch.Tensor]:
    """`state_dict` in `dtype` ("keep"/None: unchanged); a tensor whose values overflow `dtype` is refused."""
    if dtype in (None, "keep"):
        return state_dict
    cast_dict = {name: t.to(DTYPES[dtype]) for name, t in state_dict.items()}
    for name, tensor in cast_dict.items():
        check_finite(
            name, tensor, f"cast to {dtype}", f"its values exceed the range of {dtype}; keep the source dtype instead"
        )
    return cast_dict


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def conversion_parser(description: str, src_help: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", metavar="SRC", type=Path, help=src_help)
    parser.add_argument(
        "dst", metavar="DST", type=Path, help="output model folder (must not exist unless --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists (atomically)")
    parser.add_argument(
        "--dtype",
        choices=["keep", *DTYPES],
        default="keep",
        help="dtype of the written weights (default: keep the source's)",
    )
    parser.add_argument(
        "--base-model", default=None, help="Hub id of the source model, written as `base_model:` in the model card"
    )
    return parser


def run_cli(convert: Callable[..., Path], args: argparse.Namespace, **extra) -> int:
    """Run `convert(src, dst, overwrite=, dtype=, base_model=, **extra)` from parsed `args`; report a
    `ConversionError` as one clear line and exit code 1."""
    try:
        dst = convert(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype, base_model=args.base_model, **extra)
    except (ConversionError, OSError) as err:  # OSError: disk full, permissions, ... (the message names the path)
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {dst}")
    return 0
