# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Safetensors-only reading of a source checkpoint, shard by shard, and its validation against the model's names and
shapes.
"""


import contextlib
import json
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .families import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, ConversionError
from .pickle_sniff import pickle_files, pickle_reason


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


_FLOAT_DTYPES = ("F", "BF")  # safetensors dtype names of floating-point tensors: F16, BF16, F32, F64, F8_*


def check_float(name: str, dtype: str, where: str) -> None:
    """Refuse a tensor whose safetensors dtype (`dtype`, e.g. "I32") is not floating point: every weight of the
    models is, and an integer tensor would be stored as such (loading as garbage) or silently cast by --dtype."""
    if not dtype.startswith(_FLOAT_DTYPES):
        raise ConversionError(
            f"Tensor {name!r} {where} is {dtype}, but the model's weights are floating-point: the checkpoint is not "
            f"a model's float weights (quantised or corrupt?); re-save it with float weights."
        )


class SafetensorsCheckpoint:
    """A local checkpoint folder: one `model.safetensors`, or shards listed by `model.safetensors.index.json`.

    Only the index (or the safetensors headers) is read up front; tensors are read on request, shard by shard. Shard
    names must stay inside the folder; a malformed shard is one clear `ConversionError`, and so is a tensor holding
    NaN or Inf or one that is not floating point.
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
        """Shapes of `keys` from the safetensors headers (no tensor data is read); a non-float tensor is refused."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        for shard, shard_keys in sorted(self._by_shard(keys).items()):
            with self._shard(shard) as f:
                self._check_listed(f, shard, shard_keys)
                for key in shard_keys:
                    header = f.get_slice(key)
                    check_float(key, header.get_dtype(), f"in {self.folder / shard}")
                    shapes[key] = tuple(header.get_shape())
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
                        check_float(key, f.get_slice(key).get_dtype(), f"in {self.folder / shard}")
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
