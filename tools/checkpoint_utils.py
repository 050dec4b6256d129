# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""What every converter shares: writing a complete Hub model folder, the conversion steps around it, the command line.

The pieces it builds on are their own modules (`families`: the registry; `pickle_sniff`: pickles recognised by
content; `safetensors_io`: safetensors-only reading and shape checks; `atomic`: the folder replaced atomically); this
module re-exports what a converter needs, so a converter imports only `checkpoint_utils`.

Nothing here unpickles anything: sources must be safetensors, and a folder holding only pickle weights
(`pytorch_model.bin`, `*.pt`, ...) is refused with a clear message. Pickles are recognised by content as well as by
name (`pickle_reason`), shard names may not lead out of the source folder, a malformed shard or a NaN/Inf weight is
one clear `ConversionError`, and DST is replaced so that a killed run leaves the old or the new folder (or one that
the next run restores: `recover_interrupted`).
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import transformers
from packaging import version
from safetensors.torch import save_file

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
from .pickle_sniff import PICKLE_SUFFIXES, pickle_files, pickle_reason, sniff_pickle  # noqa: F401
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


def model_card(base_model: Optional[str] = None, source_note: Optional[str] = None) -> str:
    """The repo's model card for a converted folder.

    Sections between `<!-- source-repo-only:start -->` and `<!-- source-repo-only:end -->` (the fresh-clone commands,
    "no weights here") are dropped; `base_model:` is added to the YAML front matter and `source_note` under the title.
    """
    card = PACKAGE_DIR / MODEL_CARD
    if not card.is_file():  # an installed (not editable) package has no README: a short card of its own
        return _short_card(base_model, source_note)
    text = card.read_text(encoding="utf-8")
    text = re.sub(r"<!-- source-repo-only:start -->.*?<!-- source-repo-only:end -->\n", "", text, flags=re.S)
    if base_model and text.startswith("---\n") and "\nbase_model:" not in text.split("\n---", 2)[0]:
        text = f"---\nbase_model: {base_model}\n" + text[len("---\n") :]
    if source_note:
        text = re.sub(r"^(# .*\n)", lambda m: f"{m.group(1)}\n> {source_note}\n", text, count=1, flags=re.M)
    return text


def _short_card(base_model: Optional[str], source_note: Optional[str]) -> str:
    front = "---\nlibrary_name: transformers\npipeline_tag: image-feature-extraction\n"
    front += f"base_model: {base_model}\n---\n" if base_model else "---\n"
    note = f"\n> {source_note}\n" if source_note else ""
    return (
        f"{front}\n# siglip2-navit\n{note}\nA native-resolution packed (NaViT) vision encoder, converted with "
        "`navit-convert` (`pip install siglip2-navit`). Load it with `AutoModel.from_pretrained(path, "
        "trust_remote_code=True)` and `AutoImageProcessor.from_pretrained(path, trust_remote_code=True)`.\n"
    )


def save_model_folder(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    config,
    base_model: Optional[str] = None,
    source_note: Optional[str] = None,
    processor_kwargs: Optional[Mapping[str, Any]] = None,
):
    """Write a complete Hub model folder into the (existing, empty) `folder`.

    Files: `model.safetensors`, `config.json` (with `auto_map` and `custom_pipelines`), `preprocessor_config.json`
    and `processor_config.json` (patch size and stride from `config`; normalisation and resampling from
    `processor_kwargs`, else the family's defaults), the family's `.py` files, `README.md` and the folders it refers
    to (`CARD_ASSETS`: docs/, examples/).
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
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    processor = processor_class()(
        **{**family.processor_defaults, **(processor_kwargs or {})},
        patch_size=config.patch_size,
        temporal_patch_size=getattr(config, "temporal_patch_size", 1),
        hidden_stride=config.hidden_stride,
    )
    processor.save_pretrained(str(folder))
    for name in family.code_files:
        shutil.copyfile(PACKAGE_DIR / name, folder / name)
    (folder / MODEL_CARD).write_text(model_card(base_model, source_note), encoding="utf-8")
    for name in CARD_ASSETS:
        if (PACKAGE_DIR / name).is_dir():  # a checkout's docs/ and examples/ (an installed package has none)
            shutil.copytree(PACKAGE_DIR / name, folder / name)



def convert_to_folder(
    src, dst, state_dict, config, script: str, overwrite=False, base_model=None, processor_kwargs=None
) -> Path:
    """Validate `state_dict` against `config`, then write DST atomically (`script` is named in the model card)."""
    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    check_shapes(shapes, expected_shapes(config), f"Checkpoint {src}")
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{Path(src).name}`"
    note = f"Weights converted from {source} with `{script}`."
    return atomic_write_folder(
        dst, lambda tmp: save_model_folder(tmp, state_dict, config, base_model, note, processor_kwargs), overwrite
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


def source_processor_kwargs(src: Path) -> Optional[Dict[str, Any]]:
    """`image_mean`, `image_std` and `resample` of the source's `preprocessor_config.json` (those it has), checked by
    building the processor now rather than half-way through writing DST; None without the file (the family's
    defaults apply)."""
    path = Path(src) / "preprocessor_config.json"
    if not path.is_file():
        return None
    source = read_json(path)
    kwargs = {name: source[name] for name in ("image_mean", "image_std") if source.get(name) is not None}
    if source.get("resample") is not None:
        kwargs["resample"] = _resample(source["resample"])
    try:
        processor_class()(**kwargs)
    except ValueError as err:
        raise ConversionError(f"{path}: {err}") from None
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
