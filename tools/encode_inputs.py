# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-encode, inputs: files, folders, globs, @lists and `datasets` tables become items with ids; decoding and
token-budget batching in DataLoader workers.
"""

import argparse
import dataclasses
import fnmatch
import glob
import hashlib
import io
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple




IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .avif .heic".split()
)


class UsageError(Exception):
    """A problem with the command line or the output folder: reported as one line, exit status 2."""


class JobError(Exception):
    """The job stopped part-way (a dead worker, a broken model): one line, exit status 1. Complete shards are kept."""



# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TarMember:
    """Where a member of a WebDataset .tar shard is: its name and its data's byte range."""

    name: str
    offset: int
    size: int


@dataclasses.dataclass(frozen=True)
class Item:
    """One input: a stable id and where its bytes are (a file path, a row of the --dataset, or a member of the .tar
    shard at `path`). `problem`: why it cannot be read, known when it was listed (decoding it raises that)."""

    id: str
    path: Optional[str] = None
    row: Optional[int] = None
    member: Optional[TarMember] = None
    meta: Optional[TarMember] = None  # a WebDataset sample's .json member
    problem: Optional[str] = None

    @property
    def source(self) -> str:
        if self.member is not None:
            return f"{self.path}::{self.member.name}"
        return self.path if self.path is not None else f"dataset row {self.row}"


def printable_id(name: str) -> str:
    """A file name as an id that any output can hold: bytes that are not UTF-8 (decoded by Python as lone surrogates)
    are written as backslash escapes, `caf\\xe9.png`; every other name is unchanged. The same file always gets the
    same id, so reruns resume it."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def walk_folder(folder: str) -> List[Item]:
    """Image files and the samples of WebDataset .tar shards under `folder` (recursively, hidden entries skipped),
    sorted by id = relative POSIX path (a shard's samples: its relative path without .tar, then /key)."""
    from .webdataset_source import is_tar_name, list_samples, shard_stem

    items = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            relative = Path(os.path.relpath(path, folder)).as_posix()
            if is_image_name(name):
                items.append(Item(printable_id(relative), path=path))
            elif is_tar_name(name):
                items.extend(list_samples(path, shard_stem(relative)))
    return sorted(items, key=lambda item: item.id)


def expand_file(path: str) -> List[Item]:
    """A file given by name or matched by a glob: an image (id = the path as written) or a .tar shard's samples
    (ids = its file name without .tar, then /key)."""
    from .webdataset_source import is_tar_name, list_samples, shard_stem

    if is_tar_name(path):
        return list_samples(path, shard_stem(os.path.basename(path)))
    return [Item(printable_id(path), path=path)]


def glob_matches(pattern: str) -> List[str]:
    """The paths matching a glob, written as `glob.glob(pattern, recursive=True)` writes them, except that `**` never
    descends through a symlink to a folder: a link to a parent would make the walk endless."""
    parts = pattern.split(os.sep)
    matches: List[str] = []

    def entries(folder: str) -> List[os.DirEntry]:
        try:
            with os.scandir(folder or os.curdir) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError:
            return []

    def folders_below(folder: str) -> List[str]:
        found = []
        for entry in entries(folder):
            if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                path = os.path.join(folder, entry.name)
                found += [path, *folders_below(path)]
        return found

    def walk(prefix: str, i: int) -> None:
        if i == len(parts):
            matches.append(prefix)
            return
        part, last = parts[i], i == len(parts) - 1
        if part == "**":  # this folder and every real folder below it: never through a link to a folder
            if last and prefix:
                matches.append(os.path.join(prefix, ""))  # the folder itself, written as glob writes it
            for folder in [prefix, *folders_below(prefix)]:
                if last:
                    matches.extend(os.path.join(folder, e.name) for e in entries(folder) if not e.name.startswith("."))
                else:
                    walk(folder, i + 1)
            return
        for entry in entries(prefix) if glob.has_magic(part) else []:
            if fnmatch.fnmatch(entry.name, part) and (part.startswith(".") or not entry.name.startswith(".")):
                if last or entry.is_dir():
                    walk(os.path.join(prefix, entry.name), i + 1)
        path = os.path.join(prefix, part)
        if not glob.has_magic(part) and (os.path.lexists(path) if last else os.path.isdir(path)):
            walk(path, i + 1)

    absolute = parts[0] == "" and len(parts) > 1
    walk(os.sep if absolute else "", 1 if absolute else 0)
    return list(dict.fromkeys(matches))


def expand_input(token: str, from_list: bool = False) -> List[Item]:
    """Files, folders, globs and (not nested) @lists, in the order given."""
    if is_url(token):
        from .webdataset_source import expand_url

        return expand_url(token)
    if token.startswith("@") and not from_list:
        list_path = token[1:]
        if not os.path.isfile(list_path):
            raise UsageError(f"no such list file: {list_path}")
        with open(list_path, encoding="utf-8", errors="surrogateescape") as f:  # paths as bytes, like argv
            lines = [line.strip() for line in f]
        return [item for line in lines if line and not line.startswith("#") for item in expand_input(line, True)]
    if os.path.isdir(token):
        return walk_folder(token)
    if os.path.exists(token):  # a file (one that is not a regular file is recorded as an error, never opened)
        return expand_file(token)
    if glob.has_magic(token):
        matches = sorted(glob_matches(token))
        return [item for m in matches for item in (walk_folder(m) if os.path.isdir(m) else expand_file(m))]
    raise UsageError(f"no such file or folder: {token}")


def check_unique(items: Sequence[Item], reserved: Sequence[str] = ()) -> None:
    seen: Dict[str, Item] = {}
    for item in items:
        if item.id in reserved:
            raise UsageError(f"input {item.source!r} has the id {item.id!r}, which this output format reserves")
        if item.id in seen:
            raise UsageError(
                f"two inputs have the same id {item.id!r} ({seen[item.id].source} and {item.source}); ids must be "
                "unique: pass the common parent folder instead, or encode them into separate --out folders"
            )
        seen[item.id] = item


def is_url(token: str) -> bool:
    return "://" in token


def load_table(path: str, split: Optional[str]):
    """The --dataset as a datasets.Dataset (all columns)."""
    try:
        import datasets
    except ImportError:
        raise UsageError('--dataset needs the datasets package: pip install "siglip2-navit[encode]"') from None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json")):
        saved = datasets.load_from_disk(path)
        splits = list(saved)
        chosen = split or (splits[0] if len(splits) == 1 else "train")
        if chosen not in saved:
            raise UsageError(f"--dataset {path} has splits {splits}; choose one with --split")
        ds = saved[chosen]
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json")):
        ds = datasets.load_from_disk(path)
    else:
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) else (
            [path] if path.endswith(".parquet") and os.path.isfile(path) else sorted(glob.glob(path))
        )
        if not files:
            raise UsageError(f"--dataset {path}: not a save_to_disk folder and no parquet files found")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    return ds


def open_dataset(path: str, split: Optional[str], column: str):
    """The --dataset as a datasets.Dataset holding only the image column (not decoded: bytes/path per row)."""
    import datasets

    ds = load_table(path, split)
    if column not in ds.column_names:
        raise UsageError(f"--dataset {path} has no column {column!r} (columns: {ds.column_names}); "
                         "choose one with --image-column")
    ds = ds.select_columns([column])
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def dataset_ids(path: str, split: Optional[str], column: str) -> List[str]:
    """--id-column: each row's id, the column's value as text (a missing value is refused)."""
    ds = load_table(path, split)
    if column not in ds.column_names:
        raise UsageError(f"--dataset {path} has no column {column!r} (columns: {ds.column_names}); "
                         "choose the ids' column with --id-column")
    values = ds[column]
    missing = next((row for row, value in enumerate(values) if value is None or value == ""), None)
    if missing is not None:
        raise UsageError(f"--id-column {column}: row {missing} has no value (every row needs an id)")
    return [printable_id(str(value)) for value in values]


def collect_inputs(args: argparse.Namespace) -> Tuple[List[Item], Any]:
    items = [item for token in args.inputs for item in expand_input(token)]
    dataset = None
    if args.dataset is not None:
        dataset = open_dataset(args.dataset, args.split, args.image_column)
        ids = (dataset_ids(args.dataset, args.split, args.id_column) if args.id_column is not None
               else [str(row) for row in range(len(dataset))])
        items += [Item(item_id, row=row) for row, item_id in enumerate(ids)]
    if not items:
        raise UsageError("the inputs hold no images (folders are searched for " +
                         " ".join(sorted(IMAGE_EXTENSIONS)) + ")")
    check_unique(items, reserved=("__metadata__",) if args.format == "safetensors" else ())
    return items, dataset


def owner_rank(item_id: str, world_size: int) -> int:
    """The rank that encodes an id: a stable hash (independent of input order and of Python's hash seed)."""
    digest = hashlib.sha1(item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % world_size


# ----------------------------------------------------------------------------------------------------------------------
# decoding (runs in DataLoader workers)
# ----------------------------------------------------------------------------------------------------------------------


def regular_file(path: str) -> str:
    """`path`, checked to be a regular file before anything opens it (opening a FIFO would wait forever)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}.get(stat.S_IFMT(mode), "not a file")
        raise ValueError(f"not a regular file ({kind}); not opened")
    return path


def open_source(item: Item, dataset: Any) -> Any:
    """A file-like object or path for PIL."""
    if item.problem is not None:
        raise ValueError(item.problem)
    if item.member is not None:
        from .webdataset_source import read_member

        return io.BytesIO(read_member(item.path, item.member))
    if item.path is not None:
        return regular_file(item.path)
    value = dataset[item.row][dataset.column_names[0]]
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, str):
        return regular_file(value)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def header_size(item: Item, dataset: Any) -> Optional[Tuple[int, int]]:
    """(width, height) after EXIF orientation from the header only, or None when the header is unreadable."""
    import PIL.Image

    try:
        with PIL.Image.open(open_source(item, dataset)) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # the worker decodes it again and records the error
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_image(item: Item, dataset: Any):
    return open_image(open_source(item, dataset))


def open_image(source: Any):
    """A path or file-like object decoded to a PIL image, EXIF orientation applied."""
    import PIL.Image
    import PIL.ImageOps

    with PIL.Image.open(source) as image:
        image.load()
        return PIL.ImageOps.exif_transpose(image)


class EncodeInputs:
    """Map-style dataset over the pending items: decode + preprocess one image, or return its error."""

    def __init__(self, items: Sequence[Item], dataset: Any, processor: Any, budget: Dict[str, int]) -> None:
        self.items, self.dataset, self.processor, self.budget = items, dataset, processor, budget

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.items[index]
        return preprocess(index, lambda: decode_image(item, self.dataset), self.processor, self.budget)


def preprocess(index: int, load: Callable[[], Any], processor: Any, budget: Dict[str, int]) -> Dict[str, Any]:
    """One image decoded by `load()` and preprocessed: {index, pixel_values [patches, C*p*p], grid [1, 3], size (W, H)},
    or {index, error} (any failure of one input is recorded, the run goes on)."""
    try:
        image = load()
        size = image.size
        batch = processor(images=[image], return_tensors="pt", **budget)
    except Exception as error:  # noqa: BLE001
        return {"index": index, "error": f"{type(error).__name__}: {error}"}
    return {"index": index, "pixel_values": batch["pixel_values"], "grid": batch["grid_thws"], "size": size}


def quiet_worker_threads(worker_id: int) -> None:
    """In each DataLoader worker: a background thread's traceback is not printed. When the job stops (another worker
    died, a kill), a worker's thread that hands tensors to the main process fails mid-transfer; its traceback would
    follow the job's one-line message. The worker's own errors still reach the main process."""
    sys.excepthook = lambda *exc_info: None


def collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    import torch

    good = [s for s in samples if "error" not in s]
    return {
        "indices": [s["index"] for s in good],
        "sizes": [s["size"] for s in good],
        "errors": [(s["index"], s["error"]) for s in samples if "error" in s],
        "pixel_values": torch.cat([s["pixel_values"] for s in good]) if good else None,
        "grid_thws": torch.cat([s["grid"] for s in good]) if good else None,
    }


class TokenBudgetBatches:
    """Batches of indices into the pending list, shard by shard: each chunk of `shard_size` items is packed by
    token budget from header sizes (an unreadable header gets a batch of its own; its worker records the error)."""

    def __init__(self, items: Sequence[Item], dataset: Any, processor: Any, budget: Dict[str, int],
                 max_tokens: int, shard_size: int) -> None:
        self.items, self.dataset, self.processor, self.budget = items, dataset, processor, budget
        self.max_tokens, self.shard_size = max_tokens, shard_size

    def _cost(self, item: Item) -> Optional[int]:
        size = header_size(item, self.dataset)
        if size is None:
            return None
        try:
            return int(self.processor.get_num_tokens(size[1], size[0], **self.budget).num_patches)
        except Exception:  # noqa: BLE001 - e.g. a degenerate size: let the worker report it
            return None

    def __iter__(self) -> Iterator[List[int]]:
        for start in range(0, len(self.items), self.shard_size):
            chunk = range(start, min(start + self.shard_size, len(self.items)))
            costs = [self._cost(self.items[i]) for i in chunk]
            known = [i for i, c in zip(chunk, costs) if c is not None]
            for i, c in zip(chunk, costs):
                if c is None:
                    yield [i]
            if known:
                groups = self.processor.pack_by_token_budget([c for c in costs if c is not None], self.max_tokens)
                for group in groups:
                    yield [known[j] for j in group]


