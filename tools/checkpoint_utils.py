# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Shared plumbing of the checkpoint scripts: safetensors-only reading shard by shard, validation against the model's
parameter shapes, and the atomic write of a complete Hub model folder.

Nothing here unpickles anything: sources must be safetensors, and a folder holding only pickle weights
(`pytorch_model.bin`, `*.pt`, ...) is refused with a clear message. Pickles are recognised by content as well as by
name (`pickle_reason`), shard names may not lead out of the source folder, a malformed shard or a NaN/Inf weight is
one clear `ConversionError`, and DST is replaced so that a killed run leaves the old or the new folder (or one that
the next run restores: `recover_interrupted`).
"""

import argparse
import ast
import bz2
import contextlib
import ctypes
import errno
import importlib
import importlib.util
import inspect
import io
import json
import lzma
import os
import pickletools
import re
import shutil
import socket
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import transformers
from packaging import version
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


# The installed package (or the checkout, installed editable): its remote-code modules are what a converted folder ships.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PACKAGE = "siglip2_navit"
MODEL_CARD = "README.md"
# Folders the model card links to (docs/) and its code examples open (examples/): copied into every converted folder,
# so that the card's links resolve and its snippets run in the Hub repository too.
CARD_ASSETS = ("docs", "examples")
CORE_FILES = (
    "navit_layout.py", "navit_attention.py", "navit_core.py",
    "navit_image_utils.py", "navit_batching.py", "image_processing_siglip2_navit.py",
    "pipeline_navit.py",
)  # every family ships them


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
# Every remote-code file a converted folder may ship: `push_to_hub.py` refuses any other `.py` file in a folder and
# any of these that is not byte-identical to this checkout's copy.
CODE_FILES = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.code_files))
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted as asked (missing tensors, shape mismatch, existing destination, ...)."""


# ----------------------------------------------------------------------------------------------------------------------
# the package these tools belong to (`siglip2_navit`)
# ----------------------------------------------------------------------------------------------------------------------


def import_package():
    """Return the `siglip2_navit` package (installed, or a checkout registered under that name by a scripts/ shim)."""
    return importlib.import_module(PACKAGE)


def family_of(config) -> Family:
    """The family of `config` (a config object or its `model_type` string)."""
    model_type = config if isinstance(config, str) or config is None else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConversionError(f"No model family for model_type {model_type!r}: expected one of {sorted(FAMILIES)}.")
    return FAMILIES[model_type]


def processor_class():
    """The image processor every family's folder ships."""
    import_package()
    return importlib.import_module(f"{PACKAGE}.image_processing_siglip2_navit").Siglip2NavitImageProcessor


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
# pickle detection by content (nothing is ever unpickled: opcodes are only disassembled, archives only listed)
# ----------------------------------------------------------------------------------------------------------------------

# Suffixes of files that are (or usually are) pickles: refused whatever their content.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
_SNIFF_BYTES = 4096  # bytes of a file (or of a decompressed stream) looked at
_COMPRESSED_SNIFF_BYTES = 1 << 16  # compressed bytes fed to a decompressor to get _SNIFF_BYTES out
_DECOMPRESSED_SNIFF_BYTES = 1 << 20  # of a compressed stream (a compressed text pickle is checked whole within it)
_SNIFF_DEPTH = 3  # nesting of compression / archives followed (e.g. a gzip of a tar of a pickle)
_PICKLE_MEMBER_SUFFIXES = (".pkl", ".pickle")  # torch.save zips hold `<archive>/data.pkl`


_TRUNCATED = ("exhausted", "not enough data", "no newline found", "remain")  # genops' errors when the data ends mid-pickle
_IMPORT_OPCODES = {"GLOBAL", "INST", "STACK_GLOBAL"}  # how a pickle reaches the code it runs
_TEXT_SCAN_BYTES = 1 << 28  # a file that starts like a text pickle is disassembled up to this size


def _is_binary_pickle(head: bytes) -> bool:
    """`head` starts with PROTO 2..5 and its first opcodes disassemble (a safetensors file whose header length
    happens to be 0x0380 starts with 0x80 0x03 too, but does not disassemble)."""
    if len(head) < 3 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    try:
        for count, _ in enumerate(pickletools.genops(io.BytesIO(head)), start=1):
            if count == 3:
                return True
    except ValueError as err:  # an unknown opcode (not a pickle), or `head` ends inside the stream (a pickle)
        return "unknown" not in str(err)
    return True  # a complete binary pickle of fewer than three opcodes


def _may_be_text_pickle(head: bytes) -> bool:
    """The first bytes decode as protocol 0/1 opcodes until they end (cheap: rules out almost every other file)."""
    if not head or head[:1] == b"\x80":
        return False
    try:
        for _ in pickletools.genops(io.BytesIO(head[:_SNIFF_BYTES])):
            pass
    except ValueError as err:
        return any(text in str(err) for text in _TRUNCATED)
    return True


def _is_text_pickle(data: bytes) -> bool:
    """`data` is a complete protocol 0/1 pickle that imports something: `pickletools.dis` checks it up to its STOP
    (stack, marks, memo: text that merely starts with opcode characters fails that) and nothing is run."""
    if not _may_be_text_pickle(data):
        return False
    try:
        pickletools.dis(io.BytesIO(data), out=io.StringIO())
        return any(opcode.name in _IMPORT_OPCODES for opcode, _, _ in pickletools.genops(io.BytesIO(data)))
    except ValueError:
        return False


def _text_pickle_in_file(path: Path, head: bytes) -> bool:
    """A text pickle longer than `head`: the file disassembled as a whole (bounded by `_TEXT_SCAN_BYTES`)."""
    if len(head) < _COMPRESSED_SNIFF_BYTES or not _may_be_text_pickle(head):
        return False
    with open(path, "rb") as f:
        return _is_text_pickle(f.read(_TEXT_SCAN_BYTES))


def _npy_holds_objects(head: bytes) -> bool:
    """A `.npy` array whose dtype holds Python objects (`O`, `|O`, or a structured dtype with an object field): its
    data is a pickle. The header is parsed as a literal and its `descr` turned into a dtype; no data is loaded."""
    if not head.startswith(b"\x93NUMPY") or len(head) < 10:
        return False
    length_bytes = 2 if head[6] == 1 else 4  # format version 1: uint16 header length; 2 and 3: uint32
    start = 8 + length_bytes
    size = int.from_bytes(head[8:start], "little")
    text = head[start : start + size].decode("latin-1")
    try:
        import numpy as np

        return bool(np.dtype(ast.literal_eval(text)["descr"]).hasobject)
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError):
        return "O" in text  # an unreadable header that mentions objects: refused rather than guessed


def _first_zip_member(head: bytes) -> Optional[Tuple[str, bytes]]:
    """Name and (stored) data start of the first member of a zip archive from its first bytes (local file header)."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return None
    name_len, extra_len = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
    name = head[30 : 30 + name_len].decode("utf-8", "replace")
    return name, head[30 + name_len + extra_len :]


def _decompress_prefix(head: bytes) -> Optional[bytes]:
    """The first `_DECOMPRESSED_SNIFF_BYTES` of a gzip, zlib, bz2 or xz stream starting `head` (None: not one of those)."""
    if head.startswith(b"\x1f\x8b"):
        decompressor = zlib.decompressobj(wbits=31)
    elif len(head) >= 2 and head[0] == 0x78 and (head[0] << 8 | head[1]) % 31 == 0:
        decompressor = zlib.decompressobj()
    elif head.startswith(b"BZh"):
        decompressor = bz2.BZ2Decompressor()
    elif head.startswith(b"\xfd7zXZ\x00"):
        decompressor = lzma.LZMADecompressor()
    else:
        return None
    try:
        return decompressor.decompress(head, _DECOMPRESSED_SNIFF_BYTES)
    except (zlib.error, OSError, EOFError, lzma.LZMAError):
        return None


def sniff_pickle(head: bytes, depth: int = 0) -> Optional[str]:
    """Why the bytes `head` (the start of a file or stream) are a pickle, or None.

    Recognised: binary pickles (protocol 2..5, e.g. legacy `torch.save`), text pickles (protocol 0/1) that import
    something (checked whole by `pickletools.dis`), numpy arrays of objects, and those inside
    a zip archive (`torch.save`'s `data.pkl`), a tar archive's first member, or a gzip / zlib / bz2 / xz stream.
    A zstd stream cannot be opened without an extra package: it is reported as uninspectable."""
    if depth > _SNIFF_DEPTH:
        return None
    if _is_binary_pickle(head):
        return f"a pickle (protocol {head[1]})"
    if _is_text_pickle(head):
        return "a pickle (protocol 0/1, text)"
    if _npy_holds_objects(head):
        return "a numpy array of Python objects (stored as a pickle)"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "a zstd-compressed file, which cannot be checked for a pickle here"
    member = _first_zip_member(head)
    if member is not None:
        return _sniff_member(member[0], member[1], depth)
    if head[257:262] == b"ustar":
        return _sniff_member(head[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), head[512:], depth, "tar")
    inner = _decompress_prefix(head)
    if inner is not None:
        reason = sniff_pickle(inner, depth + 1)
        return f"compressed {reason}" if reason else None
    return None


def _sniff_member(name: str, head: bytes, depth: int, kind: str = "zip") -> Optional[str]:
    if name.lower().endswith(_PICKLE_MEMBER_SUFFIXES):
        return f"a {kind} archive holding the pickle {name!r} (torch.save format)"
    reason = sniff_pickle(head, depth + 1)
    return f"a {kind} archive whose member {name!r} is {reason}" if reason else None


def _sniff_zip_file(path: Path) -> Optional[str]:
    """Every member name and the first bytes of every member of a zip file on disk (an `.npz` may hide an object
    array behind any number of plain ones)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                if info.filename.lower().endswith(_PICKLE_MEMBER_SUFFIXES):
                    return f"a zip archive holding the pickle {info.filename!r} (torch.save format)"
            for info in infos:
                with archive.open(info) as member:
                    reason = _sniff_member(info.filename, member.read(_SNIFF_BYTES), 0)
                if reason:
                    return reason
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, EOFError, zlib.error):
        return None  # not a readable zip: the local-header check in sniff_pickle still applies
    return None


def pickle_reason(path: Path) -> Optional[str]:
    """Why the file at `path` is (or holds) a pickle, judged by its name and its content, or None.

    Only the first bytes are read (a zip archive's member list too); nothing is unpickled."""
    path = Path(path)
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return f"named like a pickle ({path.suffix})"
    try:
        with open(path, "rb") as f:
            head = f.read(_COMPRESSED_SNIFF_BYTES)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip_file(path) or sniff_pickle(head)
    reason = sniff_pickle(head)
    if reason is None and _text_pickle_in_file(path, head):
        reason = "a pickle (protocol 0/1, text)"
    return reason


def pickle_files(folder: Path) -> List[str]:
    """Relative paths of the files under `folder` that are pickles by name or content (see `pickle_reason`)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and pickle_reason(p))


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a missing file, invalid JSON or a non-object is a `ConversionError`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path} not found.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def _hub_cache_blobs(folder: Path) -> Optional[Path]:
    """`.../models--org--name/blobs` when `folder` is a Hugging Face cache snapshot (its files link there)."""
    snapshots = folder.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent / "blobs"
    return None


def resolve_inside(folder: Path, name: object, what: str) -> Path:
    """The file `name` (as listed in an index) inside `folder`, refusing names and links that lead out of it.

    `name` must be a relative path without `..`; once symlinks are resolved the file must still lie in `folder`, or,
    for a Hugging Face cache snapshot, in that cache repository's `blobs/` (where snapshot files link)."""
    if not isinstance(name, str) or not name:
        raise ConversionError(f"{what} lists a shard name that is not a file name: {name!r}.")
    relative = Path(name)
    if relative.is_absolute() or relative.drive or ".." in relative.parts:
        raise ConversionError(f"{what} lists the shard {name!r}, which is outside {folder}: shards must be inside SRC.")
    path = folder / relative
    resolved, roots = path.resolve(), [folder.resolve()]
    blobs = _hub_cache_blobs(folder.resolve())
    if blobs is not None:
        roots.append(blobs.resolve())
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise ConversionError(f"{path} links to {resolved}, outside {folder}: shards must be inside SRC.")
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator:
    """`safe_open(path)`; a file that is not valid safetensors (truncated, a renamed pickle, ...) is one clear
    `ConversionError` naming it, whether opening or reading it fails."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as err:
        reason = pickle_reason(path) if Path(path).is_file() else None
        if reason:
            raise ConversionError(
                f"{path} is not safetensors: it is {reason}. Pickles are never loaded (unpickling runs arbitrary "
                f"code); re-save the checkpoint as safetensors in a trusted environment."
            ) from None
        raise ConversionError(f"{path} is not a valid safetensors file: {_first_line(err)}.") from None


_CORRUPT = "the checkpoint is corrupt or was saved after a diverged training step; refusing to convert it"


def check_finite(name: str, tensor: torch.Tensor, where: str, why: str = _CORRUPT) -> None:
    """Refuse a floating-point tensor holding NaN or Inf, naming it (`where`: "in <file>"; `why`: the likely cause)."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ConversionError(
                f"Tensor {name!r} {where} holds {bad} non-finite value(s) (NaN/Inf) of {tensor.numel()}: {why}."
            )


class SafetensorsCheckpoint:
    """A local checkpoint folder: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.

    Only the index (or the safetensors headers) is read up front; tensors are read on request, shard by shard. Shard
    names must stay inside the folder; a malformed shard is one clear `ConversionError`, and so is a tensor holding
    NaN or Inf.
    """

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"Source folder {self.folder} does not exist or is not a folder.")
        index = self.folder / WEIGHTS_INDEX_NAME
        single = self.folder / WEIGHTS_NAME
        if index.is_file():
            self.weight_map = self._read_index(index)
        elif single.is_file():
            with open_safetensors(resolve_inside(self.folder, WEIGHTS_NAME, str(self.folder))) as f:
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

    def _read_index(self, index: Path) -> Dict[str, str]:
        """The index's `weight_map`, every shard name checked to lie inside the folder and to exist."""
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no `weight_map`.")
        shards = {shard: resolve_inside(self.folder, shard, str(index)) for shard in set(weight_map.values())}
        missing = sorted(shard for shard, path in shards.items() if not path.is_file())
        if missing:
            raise ConversionError(f"Shards listed in the index are missing from {self.folder}: {missing}")
        return dict(weight_map)

    def _shard(self, shard: str):
        """Open one shard of this checkpoint (see `open_safetensors`)."""
        return open_safetensors(resolve_inside(self.folder, shard, str(self.folder)))

    def keys(self) -> List[str]:
        return sorted(self.weight_map)

    def _by_shard(self, keys: Iterable[str]) -> Dict[str, List[str]]:
        by_shard: Dict[str, List[str]] = {}
        for key in keys:
            if key not in self.weight_map:
                raise ConversionError(f"Tensor {key!r} is not in the checkpoint {self.folder}.")
            by_shard.setdefault(self.weight_map[key], []).append(key)
        return by_shard

    def _check_listed(self, handle, shard: str, keys: Sequence[str]) -> None:
        absent = sorted(set(keys) - set(handle.keys()))
        if absent:
            raise ConversionError(
                f"{self.folder / shard} does not hold {_listing(absent)}, which the index places there."
            )

    def shapes(self, keys: Iterable[str]) -> Dict[str, Tuple[int, ...]]:
        """Shapes of `keys` from the safetensors headers (no tensor data is read)."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        for shard, shard_keys in sorted(self._by_shard(keys).items()):
            with self._shard(shard) as f:
                self._check_listed(f, shard, shard_keys)
                for key in shard_keys:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        return shapes

    def read(self, keys: Iterable[str], desc: str = "Reading tensors") -> Dict[str, torch.Tensor]:
        """Read `keys` (and nothing else), opening only the shards that hold them, one after another; a tensor
        holding NaN or Inf is refused."""
        by_shard = self._by_shard(keys)
        tensors: Dict[str, torch.Tensor] = {}
        total = sum(len(v) for v in by_shard.values())
        with tqdm(total=total, desc=desc, unit="tensor") as bar:
            for shard in sorted(by_shard):
                bar.set_postfix_str(shard)
                with self._shard(shard) as f:
                    self._check_listed(f, shard, by_shard[shard])
                    for key in by_shard[shard]:
                        tensors[key] = f.get_tensor(key)
                        check_finite(key, tensors[key], f"in {self.folder / shard}")
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


# ----------------------------------------------------------------------------------------------------------------------
# destination: atomic replacement, recovery from killed runs, stale temp folders
# ----------------------------------------------------------------------------------------------------------------------

# Work folders beside DST are named `.<DST name>.<kind>-<host>-<pid>-<token>`: `tmp` (being written), `old` (the
# previous DST moved aside by --overwrite; always complete) and `trash` (being deleted). The host and pid say whose
# they are, so that only those of dead processes on this machine are cleaned up.
_WORK_KINDS = ("tmp", "old", "trash")
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_AT_FDCWD = -100  # Linux
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically


def _work_prefix(dst: Path, kind: str, pid: Optional[int] = None) -> str:
    return f".{dst.name}.{kind}-{_HOST}-{os.getpid() if pid is None else pid}-"


def _work_folders(dst: Path) -> List[Tuple[Path, str, str, int]]:
    """`(path, kind, host, pid)` of every work folder of `dst` (of any process)."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.({'|'.join(_WORK_KINDS)})-(.+)-(\d+)-([A-Za-z0-9_]+)")
    if not dst.parent.is_dir():
        return []
    found = []
    for entry in dst.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((entry, match.group(1), match.group(2), int(match.group(3))))
    return sorted(found)


def _owner_is_dead(host: str, pid: int) -> bool:
    """True only when the process `pid` of this host is known to be gone (another host's or a live one: False)."""
    if host != _HOST or os.name == "nt":  # on Windows, os.kill(pid, 0) would send CTRL_C_EVENT
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, owned by someone else
        return False
    return False


def _discard(path: Path, dst: Path) -> None:
    """Delete the work folder `path` of `dst`: renamed to a `trash` work folder first, so that a half-deleted folder
    never keeps a name that recovery would put back."""
    if not os.path.lexists(path):
        return
    trash = dst.parent / (_work_prefix(dst, "trash") + os.urandom(4).hex())
    os.rename(path, trash)
    if trash.is_symlink() or not trash.is_dir():  # a DST that was a link (or a file): remove the link itself
        trash.unlink()
    else:
        shutil.rmtree(trash, ignore_errors=True)


def recover_interrupted(dst) -> None:
    """Clean up after conversions to `dst` that were killed (SIGKILL, power loss), before a new one starts.

    When `dst` is missing and a dead run had moved it aside (`old`), it is put back; then the work folders of dead
    processes of this host are deleted. Those of live processes (a concurrent conversion) and of other hosts are left
    alone."""
    dst = Path(dst).absolute()
    dead = [(path, kind) for path, kind, host, pid in _work_folders(dst) if _owner_is_dead(host, pid)]
    if not dead:
        return
    olds = [path for path, kind in dead if kind == "old"]
    if olds and not os.path.lexists(dst):
        restored = max(olds, key=lambda p: p.stat().st_ctime)
        os.rename(restored, dst)
        print(f"Restored {dst}: an interrupted --overwrite run had moved it aside.", file=sys.stderr)
    leftovers = [path for path, _ in dead if os.path.lexists(path)]
    for path in leftovers:
        _discard(path, dst)
    if leftovers:
        print(f"Removed {len(leftovers)} temporary folder(s) left beside {dst} by interrupted runs.", file=sys.stderr)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the OS, the C
    library or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _move_into_place(new: Path, dst: Path) -> None:
    """Make the complete folder `new` become `dst`, discarding the previous `dst`.

    With an atomic exchange, `dst` is the old or the new folder at every instant. Without one, the old folder is
    renamed to an `old` work folder and the new one renamed into place: killed in between, `dst` is missing and
    `recover_interrupted` (run at the start of every conversion) puts the old one back."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
    elif _exchange(new, dst):
        _discard(new, dst)  # `new` now holds the previous dst
    else:
        old = dst.parent / (_work_prefix(dst, "old") + os.urandom(4).hex())
        os.rename(dst, old)
        try:
            os.rename(new, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        _discard(old, dst)


def check_destination(dst: Path, src: Path, overwrite: bool) -> None:
    """Refuse a destination that is, holds or lies in the source, or that exists without `overwrite`; first recovers
    from killed earlier runs (see `recover_interrupted`)."""
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConversionError(f"Destination {dst} must not be the source folder or inside it.")
    if dst.resolve() in src.resolve().parents:  # replacing dst would delete the source with it
        raise ConversionError(f"Destination {dst} must not contain the source folder {src}.")
    recover_interrupted(dst)
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
    """Run `write(tmp)` into a fresh temp folder beside `dst`, then move it into place (see `_move_into_place`).

    An error leaves `dst` untouched and no temp folder behind; a kill leaves `dst` as it was or complete and new, or
    moved aside where the next run's `recover_interrupted` puts it back (and deletes the killed run's temp folders).
    """
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"Destination {dst} already exists; pass --overwrite to replace it.")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"Destination {dst} exists and is not a folder.")
    tmp = Path(tempfile.mkdtemp(prefix=_work_prefix(dst, "tmp"), dir=dst.parent))
    try:
        write(tmp)
        _make_readable(tmp)
        _move_into_place(tmp, dst)
    except BaseException:
        _discard(tmp, dst)
        raise
    return dst


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
