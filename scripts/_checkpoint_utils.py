# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Shared plumbing of the checkpoint scripts: safetensors-only reading shard by shard, validation against the model's
parameter shapes, and the atomic write of a complete Hub model folder.

Nothing here unpickles anything: sources must be safetensors, and a folder holding only pickle weights
(`pytorch_model.bin`, `*.pt`, ...) is refused with a clear message.
"""

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import transformers
from packaging import version
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "siglip2_navit"
MODEL_CARD = "README.md"
# Folders the model card links to (docs/) and its code examples open (examples/): copied into every converted folder,
# so that the card's links resolve and its snippets run in the Hub repository too.
CARD_ASSETS = ("docs", "examples")
CORE_FILES = ("navit_core.py", "image_processing_siglip2_navit.py", "pipeline_navit.py")  # every family ships them


@dataclass(frozen=True)
class Family:
    """One encoder family on the shared packed core: its modules and classes, and what a converted folder ships."""

    name: str
    model_type: str
    configuration: str  # module (file stem) of the config class
    config_class_name: str
    modeling: str
    model_class_name: str
    processor_defaults: Mapping[str, Any] = field(default_factory=dict)  # processor settings when the source has none

    @property
    def code_files(self) -> Tuple[str, ...]:
        """The remote code of a converted folder: the family's two modules and the shared ones."""
        return (f"{self.configuration}.py", f"{self.modeling}.py", *CORE_FILES)

    @property
    def auto_map(self) -> Dict[str, str]:
        return {
            "AutoConfig": f"{self.configuration}.{self.config_class_name}",
            "AutoModel": f"{self.modeling}.{self.model_class_name}",
        }


SIGLIP2 = Family(
    "siglip2", "siglip2_navit", "configuration_siglip2_navit", "Siglip2NavitConfig", "modeling_siglip2_navit",
    "Siglip2NavitModel",
)
AIMV2 = Family(
    "aimv2", "aimv2_navit", "configuration_aimv2_navit", "Aimv2NavitConfig", "modeling_aimv2_navit", "Aimv2NavitModel",
    processor_defaults={  # CLIP normalisation, bicubic (transformers' Aimv2 / CLIP image processor defaults)
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
    },
)
DINOV3 = Family(
    "dinov3", "dinov3_navit", "configuration_dinov3_navit", "Dinov3NavitConfig", "modeling_dinov3_navit",
    "Dinov3NavitModel",
    processor_defaults={  # ImageNet normalisation, bilinear (transformers' DINOv3 image processor defaults)
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 2,
    },
)
FAMILIES: Dict[str, Family] = {family.model_type: family for family in (SIGLIP2, AIMV2, DINOV3)}
# Every code file any converted folder may ship (push_to_hub accepts no other .py).
CODE_FILES = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.code_files))
AUTO_MAP = SIGLIP2.auto_map
# config.json's `custom_pipelines`: `pipeline("image-feature-extraction", model=DST, trust_remote_code=True)` builds
# pipeline_navit's packed pipeline (transformers' own splits packed outputs row by row when batching).
CUSTOM_PIPELINES = {
    "image-feature-extraction": {
        "impl": "pipeline_navit.NavitImageFeatureExtractionPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "image",
    }
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Suffixes of files that are (or usually are) pickles: never read, never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted as asked (missing tensors, shape mismatch, existing destination, ...)."""


# ----------------------------------------------------------------------------------------------------------------------
# the package (installed editable as `siglip2_navit`, or loaded straight from this checkout)
# ----------------------------------------------------------------------------------------------------------------------


def import_package():
    """Return the `siglip2_navit` package: the installed one, else the checkout this script lives in."""
    try:
        return importlib.import_module(PACKAGE)
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        PACKAGE, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def family_of(config) -> Family:
    """The family of `config` (by its `model_type`)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConversionError(f"No model family for model_type {model_type!r}: expected one of {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def config_class(family: Family = SIGLIP2):
    import_package()
    return getattr(importlib.import_module(f"{PACKAGE}.{family.configuration}"), family.config_class_name)


def model_class(family: Family = SIGLIP2):
    import_package()
    return getattr(importlib.import_module(f"{PACKAGE}.{family.modeling}"), family.model_class_name)


def config_fields(family: Family = SIGLIP2) -> set:
    """The architecture fields the family's config `__init__` takes."""
    params = inspect.signature(config_class(family).__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every tensor of the family model's state dict for `config` and its shape, built on the meta device."""
    model_cls = model_class(family_of(config))
    with torch.device("meta"):
        model = model_cls(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} not found.") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


def pickle_files(folder: Path) -> List[str]:
    """Relative paths of the files under `folder` that look like pickles."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    )


class SafetensorsCheckpoint:
    """A local checkpoint folder: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.

    Only the index (or the safetensors headers) is read up front; tensors are read on request, shard by shard.
    """

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"Source folder {self.folder} does not exist or is not a folder.")
        index = self.folder / WEIGHTS_INDEX_NAME
        single = self.folder / WEIGHTS_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no `weight_map`.")
            self.weight_map: Dict[str, str] = dict(weight_map)
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {key: WEIGHTS_NAME for key in f.keys()}
        else:
            pickles = pickle_files(self.folder)
            hint = (
                f" It holds pickle weights ({', '.join(pickles[:3])}), which these scripts refuse to load (unpickling "
                f"runs arbitrary code). Re-save the checkpoint as safetensors first, e.g. "
                f"`model.save_pretrained(folder, safe_serialization=True)` in a trusted environment."
                if pickles
                else ""
            )
            raise ConversionError(f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {self.folder}.{hint}")
        missing = sorted({s for s in self.weight_map.values() if not (self.folder / s).is_file()})
        if missing:
            raise ConversionError(f"Shards listed in the index are missing from {self.folder}: {missing}")

    def keys(self) -> List[str]:
        return sorted(self.weight_map)

    def _by_shard(self, keys: Iterable[str]) -> Dict[str, List[str]]:
        by_shard: Dict[str, List[str]] = {}
        for key in keys:
            if key not in self.weight_map:
                raise ConversionError(f"Tensor {key!r} is not in the checkpoint {self.folder}.")
            by_shard.setdefault(self.weight_map[key], []).append(key)
        return by_shard

    def shapes(self, keys: Iterable[str]) -> Dict[str, Tuple[int, ...]]:
        """Shapes of `keys` from the safetensors headers (no tensor data is read)."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        for shard, shard_keys in sorted(self._by_shard(keys).items()):
            with safe_open(str(self.folder / shard), framework="pt") as f:
                for key in shard_keys:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        return shapes

    def read(self, keys: Iterable[str], desc: str = "Reading tensors") -> Dict[str, torch.Tensor]:
        """Read `keys` (and nothing else), opening only the shards that hold them, one after another."""
        by_shard = self._by_shard(keys)
        tensors: Dict[str, torch.Tensor] = {}
        total = sum(len(v) for v in by_shard.values())
        with tqdm(total=total, desc=desc, unit="tensor") as bar:
            for shard in sorted(by_shard):
                bar.set_postfix_str(shard)
                with safe_open(str(self.folder / shard), framework="pt") as f:
                    for key in by_shard[shard]:
                        tensors[key] = f.get_tensor(key)
                        bar.update()
        return tensors


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(found: Iterable[str], expected: Mapping[str, Tuple[int, ...]], source: str) -> None:
    """Refuse when tensors the model needs are missing, or when the source has tensors the model would not use."""
    found = set(found)
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) the model needs: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model has no place for: {_listing(unexpected)}")
    if problems:
        raise ConversionError(f"{source} does not match the configuration: " + "; ".join(problems) + ".")


def check_shapes(shapes: Mapping[str, Sequence[int]], expected: Mapping[str, Tuple[int, ...]], source: str) -> None:
    """Refuse when a tensor is missing or unexpected, or its shape disagrees with what the configuration implies."""
    check_keys(shapes, expected, source)
    bad = [
        f"{name}: checkpoint {tuple(shape)} vs config {tuple(expected[name])}"
        for name, shape in sorted(shapes.items())
        if tuple(shape) != tuple(expected[name])
    ]
    if bad:
        raise ConversionError(
            f"{source}: {len(bad)} tensor shape(s) disagree with the configuration: {_listing(bad, 5)}."
        )


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------


def model_card(base_model: Optional[str] = None, source_note: Optional[str] = None) -> str:
    """The repo's model card for a converted folder.

    Sections between `<!-- source-repo-only:start -->` and `<!-- source-repo-only:end -->` (the fresh-clone commands,
    "no weights here") are dropped; `base_model:` is added to the YAML front matter and `source_note` under the title.
    """
    text = (REPO_ROOT / MODEL_CARD).read_text(encoding="utf-8")
    text = re.sub(r"<!-- source-repo-only:start -->.*?<!-- source-repo-only:end -->\n", "", text, flags=re.S)
    if base_model and text.startswith("---\n") and "\nbase_model:" not in text.split("\n---", 2)[0]:
        text = f"---\nbase_model: {base_model}\n" + text[len("---\n") :]
    if source_note:
        text = re.sub(r"^(# .*\n)", lambda m: f"{m.group(1)}\n> {source_note}\n", text, count=1, flags=re.M)
    return text


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
    processor_cls = importlib.import_module(f"{PACKAGE}.image_processing_siglip2_navit").Siglip2NavitImageProcessor

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

    processor = processor_cls(
        **{**family.processor_defaults, **(processor_kwargs or {})},
        patch_size=config.patch_size,
        temporal_patch_size=getattr(config, "temporal_patch_size", 1),
        hidden_stride=config.hidden_stride,
    )
    processor.save_pretrained(str(folder))
    for name in family.code_files:
        shutil.copyfile(REPO_ROOT / name, folder / name)
    (folder / MODEL_CARD).write_text(model_card(base_model, source_note), encoding="utf-8")
    for name in CARD_ASSETS:
        shutil.copytree(REPO_ROOT / name, folder / name)


def check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConversionError(f"Destination {dst} must not be the source folder or inside it.")
    if dst.resolve() in src.resolve().parents:  # replacing dst would delete the source with it
        raise ConversionError(f"Destination {dst} must not contain the source folder {src}.")
    if dst.exists() and not overwrite:
        raise ConversionError(f"Destination {dst} already exists; pass --overwrite to replace it.")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"Destination {dst} exists and is not a folder.")


def _make_readable(folder: Path) -> None:
    """mkdtemp (and some writers) create private files; give the folder the permissions of a normal one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write_folder(dst, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run `write(tmp)` into a fresh temp folder beside `dst`, then move it into place in one rename.

    A crash or an error leaves `dst` untouched (and no temp folder behind). With `overwrite`, an existing `dst` is
    moved aside first and deleted only once the new folder is in place.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ConversionError(f"Destination {dst} already exists; pass --overwrite to replace it.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    old = None
    try:
        write(tmp)
        _make_readable(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rmdir(old)
            os.replace(dst, old)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not dst.exists():
            os.replace(old, dst)  # put the previous version back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def convert_to_folder(
    src, dst, state_dict, config, script: str, overwrite=False, base_model=None, processor_kwargs=None
) -> Path:
    """Validate `state_dict` against `config`, then write DST atomically (`script` is named in the model card)."""
    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    check_shapes(shapes, expected_shapes(config), f"Checkpoint {src}")
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{Path(src).name}`"
    note = f"Weights converted from {source} with `scripts/{script}`."
    return atomic_write_folder(
        dst, lambda tmp: save_model_folder(tmp, state_dict, config, base_model, note, processor_kwargs), overwrite
    )


def cast(state_dict: Dict[str, torch.Tensor], dtype: Optional[str]) -> Dict[str, torch.Tensor]:
    if dtype in (None, "keep"):
        return state_dict
    return {name: t.to(DTYPES[dtype]) for name, t in state_dict.items()}


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def conversion_parser(description: str, src_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {dst}")
    return 0
