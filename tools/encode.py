"""Encode images with a packed (NaViT) vision tower: streaming, sharded, resumable, fault-tolerant.

    navit-encode INPUT... [--out DIR] [--model M] [--format safetensors|parquet]
        [--features tokens|pooled] [--pool auto|head|mean] [--normalize] [--shard-size N] [--workers N]
        [--max-tokens N] [--min-pixels N] [--max-pixels N] [--dtype auto|fp32|bf16|fp16] [--attn sdpa|eager|...]
        [--device cuda] [--dataset PATH [--image-column image] [--split S]] [--strict] [--overwrite]
        [--retry-errors] [--config-overrides k=v,...] [--table | --no-table]

INPUT: image files (id = the path as given), folders (walked recursively for image files, sorted; id = the path
relative to the folder), quoted globs (id = each match as written by the glob) and `@list.txt` (one INPUT per
line; relative paths are relative to the current directory). `--dataset PATH`: a local Hugging Face `datasets`
dataset (a `save_to_disk` folder, or parquet file(s) / a folder of parquet files) with an image column; id = the
row index. Ids must be unique (a clash is refused, never renamed).

Without `--out` nothing is written: the images are encoded and a table of what each costs is printed (the demo).
With `--out DIR`, every `--shard-size` images of a process become one shard `DIR/train-r<rank>-<seq>.<ext>`,
written to a temporary name, fsynced and renamed: the ids in complete shards are the done set, so rerunning the
same command after a crash or a kill encodes exactly the rest. `DIR/_manifest.json` fingerprints the settings that
change the features (model config and weights, processor settings, features, pool, normalize, format, dtype: the
one `--dtype auto` resolved to on this machine);
a rerun with other settings is refused (`--overwrite` starts over). Unreadable inputs are recorded in
`DIR/errors.jsonl` (`{"id", "error", "source"}` per line) and skipped; the run goes on (`--strict`: exit status 1
when any input has an error record). Under `torchrun` / `accelerate launch` each rank takes the ids whose stable
hash falls to it and writes its own shards; any world size resumes any other's output.

Loads the processor and model through the Auto API with `trust_remote_code=True`; a folder without safetensors
weights runs randomly initialised weights (seeded, announced loudly).
"""

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # a loadable model folder itself: its config.json, random weights
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .webp .bmp .gif .tif .tiff .ppm .pgm .pbm .pnm .tga .avif .heic".split()
)
FORMAT_EXT = {"safetensors": ".safetensors", "parquet": ".parquet"}
MANIFEST = "_manifest.json"
ERRORS = "errors.jsonl"
SHOWN_ERRORS = 20  # bad inputs named in the summary (all of them are in DIR/errors.jsonl)
LOCK = ".lock"
SHARD_RE = re.compile(r"^train-r(\d{5,})-(\d{6,})\.(safetensors|parquet)$")  # zero-padded, may outgrow the padding
TMP_PREFIX = ".tmp-"
MANIFEST_VERSION = 1
DEFAULT_SHARD_SIZE = {"pooled": 10000, "tokens": 100}  # a shard is held in memory until it is written
# Test hook: "<point>:<n>" SIGKILLs this process at the n-th occurrence of a point (after_shard, before_rename,
# mid_error, after_batch). Used by the kill-and-resume tests; never set it otherwise.
KILL_ENV = "SIGLIP2_NAVIT_ENCODE_KILL_AT"


class UsageError(Exception):
    """A problem with the command line or the output folder: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split("\n\n")  # title, usage (argparse writes its own), then the behaviour: the epilog
    parser = argparse.ArgumentParser(description=paragraphs[0], epilog="\n\n".join(paragraphs[2:]),
                                     formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("inputs", nargs="*", metavar="INPUT", help="image files, folders, quoted globs, @list.txt")
    add("--dataset", default=None, help="a local datasets folder (save_to_disk) or parquet file(s)/folder")
    add("--image-column", default="image", help="image column of --dataset (default: image)")
    add("--split", default=None, help="split of a saved DatasetDict (default: its only split, or 'train')")
    add("--out", default=None, help="output folder (without it: encode and print the table, write nothing)")
    add("--model", default=str(PACKAGE_DIR), help="model folder or Hub id (default: the package's own SigLIP2 config, random weights)")
    add("--format", default="safetensors", choices=sorted(FORMAT_EXT), help="shard format (default safetensors)")
    add("--features", default="tokens", choices=["tokens", "pooled"],
        help="tokens: last_hidden_state rows per image; pooled: one embedding per image (default tokens)")
    add("--pool", default="auto", choices=["auto", "head", "mean"],
        help="pooled features: head = the model's pooler_output, mean = mean of the tokens, "
        "auto = head when the model has one (default)")
    add("--normalize", action="store_true", help="L2-normalise pooled embeddings")
    add("--shard-size", type=int, default=None,
        help=f"images per shard (default {DEFAULT_SHARD_SIZE['tokens']} for tokens, "
        f"{DEFAULT_SHARD_SIZE['pooled']} for pooled)")
    add("--workers", type=int, default=0, help="DataLoader worker processes that decode and preprocess (default 0)")
    add("--max-tokens", type=int, default=16384, help="patch (ViT token) budget per batch (default 16384)")
    add("--min-pixels", type=int, default=None, help="per-image lower pixel budget (default: processor's)")
    add("--max-pixels", type=int, default=None, help="per-image upper pixel budget (default: processor's)")
    add("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
        help="model dtype; auto (default): bf16 on a CUDA GPU or a CPU with native bf16 matmuls (AVX512-BF16/AMX), "
        "fp32 elsewhere")
    add("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"], help="attention backend")
    add("--device", default=None, help="device (default: cuda:<LOCAL_RANK> when CUDA is available, else cpu)")
    add("--strict", action="store_true", help="exit with status 1 when any input could not be encoded")
    add("--overwrite", action="store_true", help="delete this tool's files in --out first and start over")
    add("--retry-errors", action="store_true", help="forget DIR/errors.jsonl and try those inputs again")
    add("--table", action=argparse.BooleanOptionalAction, default=None,
        help="print one row per image (default: only without --out)")
    add("--seed", type=int, default=0, help="seed for random initialisation (folders without weights)")
    add("--config-overrides", default=None,
        help="comma-separated key=value config changes for a randomly initialised model, e.g. "
        "'hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128' (tests, quick demos)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad values before anything is loaded."""
    for name in ("max_tokens", "shard_size", "min_pixels", "max_pixels"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not args.inputs and args.dataset is None:
        raise UsageError("no input: give image files, folders, globs, @list.txt or --dataset PATH")
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r} is not a folder (expected a converted model folder)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UsageError(f"--model {args.model!r} has no config.json (expected a converted model folder)")
    if args.out is not None:
        if args.out.endswith((".safetensors", ".parquet")):
            raise UsageError(f"--out is an output folder, got a file name {args.out!r}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out!r} exists and is not a folder")
    if args.features == "tokens" and (args.pool != "auto" or args.normalize):
        raise UsageError("--pool and --normalize apply to --features pooled only")
    if args.format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise UsageError('--format parquet needs pyarrow: pip install "siglip2-navit[encode]"') from None
    if args.out is None and (args.overwrite or args.retry_errors):
        raise UsageError("--overwrite and --retry-errors need --out")


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    overrides: Dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UsageError(f"--config-overrides: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One input: a stable id and where its bytes are (a file path, or a row of the --dataset)."""

    id: str
    path: Optional[str] = None
    row: Optional[int] = None

    @property
    def source(self) -> str:
        return self.path if self.path is not None else f"dataset row {self.row}"


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def walk_folder(folder: str) -> List[Item]:
    """Image files under `folder` (recursively, hidden entries skipped), sorted by id = relative POSIX path."""
    items = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if is_image_name(name):
                path = os.path.join(root, name)
                items.append(Item(Path(os.path.relpath(path, folder)).as_posix(), path=path))
    return sorted(items, key=lambda item: item.id)


def expand_input(token: str, from_list: bool = False) -> List[Item]:
    """Files, folders, globs and (not nested) @lists, in the order given."""
    if token.startswith("@") and not from_list:
        list_path = token[1:]
        if not os.path.isfile(list_path):
            raise UsageError(f"no such list file: {list_path}")
        with open(list_path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        return [item for line in lines if line and not line.startswith("#") for item in expand_input(line, True)]
    if os.path.isdir(token):
        return walk_folder(token)
    if os.path.isfile(token):
        return [Item(token, path=token)]
    if glob.has_magic(token):
        matches = sorted(glob.glob(token, recursive=True))
        return [item for m in matches for item in (walk_folder(m) if os.path.isdir(m) else [Item(m, path=m)])]
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


def open_dataset(path: str, split: Optional[str], column: str):
    """The --dataset as a datasets.Dataset holding only the image column (not decoded: bytes/path per row)."""
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
    if column not in ds.column_names:
        raise UsageError(f"--dataset {path} has no column {column!r} (columns: {ds.column_names}); "
                         "choose one with --image-column")
    ds = ds.select_columns([column])
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def collect_inputs(args: argparse.Namespace) -> Tuple[List[Item], Any]:
    items = [item for token in args.inputs for item in expand_input(token)]
    dataset = None
    if args.dataset is not None:
        dataset = open_dataset(args.dataset, args.split, args.image_column)
        items += [Item(str(row), row=row) for row in range(len(dataset))]
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


def open_source(item: Item, dataset: Any) -> Any:
    """A file-like object or path for PIL."""
    if item.path is not None:
        return item.path
    value = dataset[item.row][dataset.column_names[0]]
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, str):
        return value
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
    import PIL.Image
    import PIL.ImageOps

    with PIL.Image.open(open_source(item, dataset)) as image:
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
        try:
            image = decode_image(item, self.dataset)
            size = image.size
            batch = self.processor(images=[image], return_tensors="pt", **self.budget)
        except Exception as error:  # noqa: BLE001 - any failure of one input is recorded, the run goes on
            return {"index": index, "error": f"{type(error).__name__}: {error}"}
        return {"index": index, "pixel_values": batch["pixel_values"], "grid": batch["grid_thws"], "size": size}


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


# ----------------------------------------------------------------------------------------------------------------------
# output folder: manifest, shards, errors
# ----------------------------------------------------------------------------------------------------------------------


def maybe_kill(point: str, count: int) -> None:
    if os.environ.get(KILL_ENV) == f"{point}:{count}":
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, write: Any, kill_point: Optional[Tuple[str, int]] = None) -> None:
    """Write through `write(fileobj)` to a temporary name in the same folder, fsync, rename, fsync the folder.
    The file gets the umask's normal permissions (0644), and either exists complete or not at all."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if kill_point is not None:
            maybe_kill(*kill_point)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder or ".")


def write_json_durable(path: str, content: Dict[str, Any]) -> None:
    write_durable(path, lambda f: f.write((json.dumps(content, indent=2, sort_keys=True) + "\n").encode("utf-8")))


def shard_ids(path: str) -> List[str]:
    """The ids a complete shard holds (reads only the safetensors header / the parquet id column)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return json.loads(f.metadata()["ids"])
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def list_shards(out: str) -> List[str]:
    return sorted(os.path.join(out, n) for n in os.listdir(out) if SHARD_RE.match(n))


def read_errors(out: str) -> Tuple[Dict[str, Dict[str, Any]], bool]:
    """Records of DIR/errors.jsonl by id (first wins), and whether the file needs repair (a torn or bad line)."""
    path = os.path.join(out, ERRORS)
    records: Dict[str, Dict[str, Any]] = {}
    damaged = False
    if not os.path.isfile(path):
        return records, False
    with open(path, "rb") as f:
        data = f.read()
    damaged = bool(data) and not data.endswith(b"\n")
    for line in data.splitlines():
        try:
            record = json.loads(line)
            item_id = record["id"]
        except (ValueError, KeyError, TypeError):
            damaged = True
            continue
        damaged = damaged or item_id in records
        records.setdefault(item_id, record)
    return records, damaged


def error_line(record: Dict[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def append_error(out: str, record: Dict[str, Any], count: int) -> None:
    """One O_APPEND write per record (ranks may share the file), fsynced. The kill hook can tear the line."""
    line = error_line(record)
    fd = os.open(os.path.join(out, ERRORS), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.environ.get(KILL_ENV) == f"mid_error:{count}":
            os.write(fd, line[: len(line) // 2])
            os.fsync(fd)
            maybe_kill("mid_error", count)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


_HELD_LOCKS: List[int] = []


def lock_output(out: str) -> None:
    """Hold an exclusive advisory lock on DIR/.lock for the life of this process (rank 0 of a job), so that a
    second job writing into the same folder at the same time is refused. The kernel drops it when the process
    ends, even by SIGKILL (local filesystems; NFS may not honour it)."""
    import fcntl

    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"another encode.py job is writing into {out}; wait for it or use another --out") from None
    _HELD_LOCKS.append(fd)


def release_locks() -> None:
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


def prepare_output(out: str, fingerprint: Dict[str, Any], overwrite: bool, retry_errors: bool) -> None:
    """Rank 0, before any other rank touches the folder: take the folder's lock, start over if asked, check or
    write the manifest, remove temporary files of killed runs, repair errors.jsonl."""
    os.makedirs(out, exist_ok=True)
    lock_output(out)
    ours = [n for n in os.listdir(out) if SHARD_RE.match(n) or n.startswith(TMP_PREFIX) or n in (MANIFEST, ERRORS)]
    if overwrite:  # the manifest goes last: a kill half-way leaves a folder that still describes itself
        for name in sorted(ours, key=lambda n: n == MANIFEST):
            os.remove(os.path.join(out, name))
        ours = []
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            old = json.load(f)
        if old != fingerprint:
            raise UsageError(f"{out} holds features made with other settings ({describe_differences(old, fingerprint)});"
                             " rerun with the same settings to resume, --overwrite to start over, or another --out")
    elif any(SHARD_RE.match(n) or n == ERRORS for n in ours):
        raise UsageError(f"{out} holds shards but no {MANIFEST}: not written by this tool, or damaged; "
                         "use --overwrite to start over, or another --out")
    else:
        write_json_durable(manifest_path, fingerprint)
    for name in os.listdir(out):
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(out, name))
    records, damaged = read_errors(out)
    if retry_errors and records:
        records, damaged = {}, True
    if damaged:
        write_durable(os.path.join(out, ERRORS), lambda f: f.write(b"".join(error_line(r) for r in records.values())))


def done_ids(out: str) -> Tuple[Set[str], Set[str], int]:
    """(ids in complete shards, ids with an error record, number of shards)."""
    done: Set[str] = set()
    shards = list_shards(out)
    for path in shards:
        try:
            ids = shard_ids(path)
        except Exception as error:  # noqa: BLE001
            raise UsageError(f"cannot read shard {path} ({error}); delete it to encode its images again") from error
        duplicates = done.intersection(ids)
        if duplicates:
            raise UsageError(f"{path} repeats ids of other shards (e.g. {sorted(duplicates)[0]!r}): two runs wrote "
                             "into this folder at once; delete the newer shard")
        done.update(ids)
    return done, set(read_errors(out)[0]), len(shards)


def next_shard_seq(out: str, rank: int) -> int:
    seqs = [int(m.group(2)) for m in map(SHARD_RE.match, os.listdir(out)) if m and int(m.group(1)) == rank]
    return max(seqs, default=0) + 1


def safetensors_writer(records: List[Dict[str, Any]], meta: Dict[str, str]):
    from safetensors.torch import save

    tensors = {r["id"]: r["feature"].contiguous() for r in records}
    metadata = dict(meta, ids=json.dumps([r["id"] for r in records]),
                    grid_thws=json.dumps([r["grid"] for r in records]), sizes=json.dumps([r["size"] for r in records]))
    return lambda f: f.write(save(tensors, metadata=metadata))


def parquet_writer(records: List[Dict[str, Any]], meta: Dict[str, str]):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def int_lists(rows: List[List[int]]) -> Any:
        return pa.array(rows, type=pa.list_(pa.int32()))

    flat = [r["feature"].float().reshape(-1).numpy() for r in records]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in flat])])
    values = pa.array(np.concatenate(flat), type=pa.float32())
    list_type = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray  # int32 offsets while they fit
    table = pa.table({
        "id": pa.array([r["id"] for r in records], type=pa.string()),
        "embedding": list_type.from_arrays(pa.array(offsets.astype(np.int32 if list_type is pa.ListArray else np.int64)),
                                           values),
        "shape": int_lists([list(r["feature"].shape) for r in records]),
        "grid_thws": int_lists([r["grid"] for r in records]),
        "width": pa.array([r["size"][0] for r in records], type=pa.int32()),
        "height": pa.array([r["size"][1] for r in records], type=pa.int32()),
    }).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    return lambda f: pq.write_table(table, f)


class ShardSink:
    """Collects one chunk's features and writes them as one durable shard; records errors as they come."""

    def __init__(self, out: Optional[str], fmt: str, rank: int, meta: Dict[str, str]) -> None:
        self.out, self.fmt, self.rank, self.meta = out, fmt, rank, meta
        self.records: List[Dict[str, Any]] = []
        self.seq = next_shard_seq(out, rank) if out else 0
        self.shards_written = 0
        self.errors_written = 0

    def add(self, record: Dict[str, Any]) -> None:
        if self.out is not None:
            self.records.append(record)

    def error(self, record: Dict[str, Any]) -> None:
        if self.out is not None:
            self.errors_written += 1
            append_error(self.out, record, self.errors_written)

    def flush(self) -> None:
        if self.out is None or not self.records:
            return
        writer = safetensors_writer if self.fmt == "safetensors" else parquet_writer
        name = f"train-r{self.rank:05d}-{self.seq:06d}{FORMAT_EXT[self.fmt]}"
        self.shards_written += 1
        write_durable(os.path.join(self.out, name), writer(self.records, self.meta),
                      kill_point=("before_rename", self.shards_written))
        maybe_kill("after_shard", self.shards_written)
        self.seq += 1
        self.records = []


# ----------------------------------------------------------------------------------------------------------------------
# model, settings fingerprint, distributed setup
# ----------------------------------------------------------------------------------------------------------------------


def has_weights(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES)


def load_config(args: argparse.Namespace):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=True)
    overrides = parse_overrides(args.config_overrides)
    if overrides and has_weights(args.model):
        raise UsageError("--config-overrides only applies to randomly initialised models; the folder has weights")
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UsageError(f"--config-overrides: the config has no field {key!r}")
        setattr(config, key, value)
    return config


def load_model(args: argparse.Namespace, config: Any, device: str, announce: bool) -> Tuple[Any, str]:
    import torch
    import transformers
    from transformers import AutoModel

    dtype = getattr(torch, DTYPES[args.dtype])
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    if has_weights(args.model):
        transformers.utils.logging.disable_progress_bar()  # this job shows its own progress; errors stay one line
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, attn_implementation=args.attn,
                                          use_safetensors=True, **{dtype_kw: dtype})
        source = "pretrained weights"
    else:
        if announce:
            bar = "!" * 100
            print(f"{bar}\n!! WARNING: no weights in {args.model} (looked for {' / '.join(WEIGHT_FILES)}).\n"
                  f"!! Running with RANDOMLY INITIALISED weights (seed {args.seed}): shapes, token counts and speed "
                  f"are real, the features are not.\n!! Point --model at a converted checkpoint for real features.\n"
                  f"{bar}", file=sys.stderr, flush=True)
        torch.manual_seed(args.seed)
        model = AutoModel.from_config(config, trust_remote_code=True, attn_implementation=args.attn).to(dtype)
        source = f"random init (seed {args.seed})"
    return model.to(device).eval(), source


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_digest(args: argparse.Namespace) -> str:
    """sha256 over the safetensors weight files (or the seed of a randomly initialised model)."""
    if not has_weights(args.model):
        return f"random init, seed {args.seed}"
    digest = hashlib.sha256()
    for name in sorted(os.listdir(args.model)):
        if name.endswith(".safetensors"):
            with open(os.path.join(args.model, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def make_fingerprint(args: argparse.Namespace, config: Any, processor: Any, pool: Optional[str]) -> Dict[str, Any]:
    """The settings that change the stored features (and, for --dataset, what the row-index ids refer to); a resumed
    run must match them exactly. `pool` is the resolved pooling ('head' / 'mean'), not the --pool request."""
    volatile = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation_internal",
                "_attn_implementation_autoset", "attn_implementation", "_commit_hash")
    config_dict = {k: v for k, v in config.to_dict().items() if k not in volatile}
    processor_dict = {k: v for k, v in processor.to_dict().items() if not k.startswith("_") and k != "auto_map"}
    return {
        "version": MANIFEST_VERSION,
        "model": os.path.abspath(args.model),
        "config_sha256": sha256_json(config_dict),
        "weights": weights_digest(args),
        "processor_sha256": sha256_json(processor_dict),
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
        "features": args.features,
        "pool": pool,
        "normalize": args.normalize,
        "dataset": None if args.dataset is None else [os.path.abspath(args.dataset), args.split, args.image_column],
        "format": args.format,
        "dtype": args.dtype,
    }


@dataclasses.dataclass
class Dist:
    """This process's place in a torchrun / accelerate launch job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dist = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1:
            import torch.distributed

            torch.distributed.init_process_group(backend="gloo")  # CPU collectives for coordination only
        return dist

    def broadcast(self, value: Any) -> Any:
        if self.world_size == 1:
            return value
        import torch.distributed

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> List[Any]:
        if self.world_size == 1:
            return [value]
        import torch.distributed

        out: List[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed

            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def choose_device(requested: Optional[str], dist: Dist) -> str:
    import torch

    if requested is None:
        return f"cuda:{dist.local_rank}" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        index = int(requested.split(":")[1]) if ":" in requested else dist.local_rank
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{index}"
    if requested != "cpu":
        raise UsageError(f"--device {requested}: expected cpu, cuda or cuda:N")
    return requested


def on_rank0(dist: Dist, action: Any) -> Any:
    """Run `action()` on rank 0 and share its result; a UsageError there stops every rank with the same message."""
    result: Tuple[Optional[str], Any] = (None, None)
    if dist.rank == 0:
        try:
            result = (None, action())
        except UsageError as error:
            result = (str(error), None)
        except Exception as error:  # noqa: BLE001 - e.g. a permission error: the other ranks must not wait forever
            result = (f"preparing the output folder failed: {type(error).__name__}: {error}", None)
    message, value = dist.broadcast(result)
    if message is not None:
        raise UsageError(message)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------------------


def check_budget(args: argparse.Namespace, processor: Any) -> None:
    """--min-pixels / --max-pixels must make a valid budget with the processor's defaults (one line, before any work:
    otherwise every image would fail alike)."""
    try:
        processor.smart_resize(64, 64, **budget_of(args))
    except ValueError as error:
        raise UsageError(f"pixel budget: {error}") from None


def resolve_pool(args: argparse.Namespace, model: Any, processor: Any, device: str) -> Optional[str]:
    """'head' or 'mean' for pooled features (auto: head when one tiny forward returns a pooler_output)."""
    import numpy as np
    import PIL.Image
    import torch

    if args.features != "pooled" or args.pool == "mean":
        return None if args.features != "pooled" else "mean"
    probe = processor(images=[PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8))], return_tensors="pt",
                      **budget_of(args))
    with torch.inference_mode():
        pooled = model(probe["pixel_values"].to(device, model.dtype), probe["grid_thws"]).pooler_output
    if pooled is not None:
        return "head"
    if args.pool == "head":
        raise UsageError("--pool head: this model has no pooling head (its pooler_output is None); use --pool mean")
    return "mean"


def budget_of(args: argparse.Namespace) -> Dict[str, int]:
    return {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}


def per_image_features(output: Any, grids: Any, features: str, pool: Optional[str], normalize: bool) -> List[Any]:
    """Split a packed forward's output into one tensor per image: tokens [patches, D], or pooled [D] ([t, D]
    when the model pools per frame and an image has t > 1 frames)."""
    import torch

    counts = grids.prod(-1).tolist()
    hidden = output.last_hidden_state
    if hidden.shape[0] != sum(counts):
        raise RuntimeError(f"last_hidden_state has {hidden.shape[0]} rows for {sum(counts)} patches")
    tokens = torch.split(hidden, counts)
    if features == "tokens":
        return list(tokens)
    if pool == "mean":
        pooled = [t.float().mean(0).to(hidden.dtype) for t in tokens]
    else:
        head = output.pooler_output
        frames = grids[:, 0].tolist()
        if head.shape[0] == len(counts):
            pooled = list(head)
        elif head.shape[0] == sum(frames):
            pooled = [p[0] if p.shape[0] == 1 else p for p in torch.split(head, frames)]
        else:
            raise RuntimeError(f"pooler_output has {head.shape[0]} rows for {len(counts)} images")
    if normalize:
        pooled = [torch.nn.functional.normalize(p.float(), dim=-1).to(hidden.dtype) for p in pooled]
    return pooled


# ----------------------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------------------


def format_table(rows: List[Dict[str, Any]]) -> str:
    headers = ["file", "original (WxH)", "resized (WxH)", "grid (t,h,w)", "patches", "tokens"]
    body = [[r["file"], "{}x{}".format(*r["orig"]), "{}x{}".format(*r["resized"]), "({},{},{})".format(*r["grid"]),
             str(r["patches"]), str(r["tokens"])] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(headers)]
    align = ["<", ">", ">", ">", ">", ">"]

    def line(cells: List[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(b) for b in body])


def table_row(item_id: str, size: Tuple[int, int], grid: List[int], processor: Any,
              budget: Dict[str, int]) -> Dict[str, Any]:
    patch = processor.patch_size
    count = processor.get_num_tokens(size[1], size[0], **budget)
    return dict(file=item_id, orig=tuple(size), resized=(grid[2] * patch, grid[1] * patch), grid=tuple(grid),
                patches=grid[0] * grid[1] * grid[2], tokens=int(count.num_tokens))


@dataclasses.dataclass
class Stats:
    images: int = 0
    patches: int = 0
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)  # the first (id, error) of this run


def print_summary(args: argparse.Namespace, stats: List[Stats], rows: List[Dict[str, Any]], header: str,
                  skipped: int, total_errors: int, shards: int) -> None:
    wall = max(s.seconds for s in stats)
    images, patches, tokens = (sum(getattr(s, k) for s in stats) for k in ("images", "patches", "tokens"))
    errors = sum(s.errors for s in stats)
    print(header)
    if rows:
        print(format_table(sorted(rows, key=lambda r: r["file"])))
    print(f"images: {images}  total patches: {patches}  total merged tokens: {tokens}")
    print(f"wall time: {wall:.3f} s  throughput: {patches / max(wall, 1e-9):.1f} patches/s "
          f"({tokens / max(wall, 1e-9):.1f} merged tokens/s, {images / max(wall, 1e-9):.2f} images/s)")
    failed = [pair for s in stats for pair in s.failed]
    for item_id, message in failed[:SHOWN_ERRORS]:
        print(f"error: {item_id}: {message}", file=sys.stderr)
    if errors > len(failed[:SHOWN_ERRORS]):
        print(f"... and {errors - len(failed[:SHOWN_ERRORS])} more errors", file=sys.stderr)
    where = f"; output: {args.out} ({shards} shards)" if args.out else ""
    error_note = f" (see {os.path.join(args.out, ERRORS)})" if args.out and total_errors else ""
    print(f"encoded {images} images, skipped {skipped} already done, {errors} errors in this run, "
          f"{total_errors} inputs with errors in total{error_note}{where}")


# ----------------------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodeJob:
    """One process's share of the work: decode (in workers), batch by token budget, run the model, hand the
    features to the sink shard by shard, keep the counts (and the table rows when asked)."""

    args: argparse.Namespace
    dataset: Any
    processor: Any
    model: Any
    device: str
    pool: Optional[str]
    sink: ShardSink
    keep_rows: bool
    stats: Stats = dataclasses.field(default_factory=Stats)
    rows: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def loader(self, pending: List[Item]):
        from torch.utils.data import DataLoader

        budget = budget_of(self.args)
        return DataLoader(
            EncodeInputs(pending, self.dataset, self.processor, budget),
            batch_sampler=TokenBudgetBatches(pending, self.dataset, self.processor, budget, self.args.max_tokens,
                                             self.args.shard_size),
            num_workers=self.args.workers, collate_fn=collate, pin_memory=self.device.startswith("cuda"),
            prefetch_factor=4 if self.args.workers else None,
        )

    def run(self, pending: List[Item], show_progress: bool) -> None:
        import torch
        from tqdm.auto import tqdm

        progress = tqdm(total=len(pending), unit="img", file=sys.stderr, disable=not show_progress,
                        mininterval=1.0, desc="encoding")
        start, chunk = time.perf_counter(), 0
        with torch.inference_mode():
            for step, batch in enumerate(self.loader(pending), 1):
                first = (batch["indices"] or [i for i, _ in batch["errors"]])[0]
                if first // self.args.shard_size != chunk:  # batches come chunk by chunk: the last one is complete
                    self.sink.flush()
                    chunk = first // self.args.shard_size
                self.record_errors(batch, pending)
                if batch["indices"]:
                    self.encode_batch(batch, pending)
                maybe_kill("after_batch", step)
                progress.update(len(batch["indices"]) + len(batch["errors"]))
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress.set_postfix_str(f"{self.stats.images / elapsed:.1f} img/s, "
                                         f"{self.stats.patches / elapsed:.0f} tok/s, errors {self.stats.errors}",
                                         refresh=False)
            self.sink.flush()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        progress.close()
        self.stats.seconds = time.perf_counter() - start

    def record_errors(self, batch: Dict[str, Any], pending: List[Item]) -> None:
        for index, message in batch["errors"]:
            self.stats.errors += 1
            item = pending[index]
            self.sink.error({"id": item.id, "error": message, "source": item.source})
            if len(self.stats.failed) < SHOWN_ERRORS:
                self.stats.failed.append((item.id, message))

    def encode_batch(self, batch: Dict[str, Any], pending: List[Item]) -> None:
        grids = batch["grid_thws"]
        pixels = batch["pixel_values"].to(self.device, self.model.dtype, non_blocking=True)
        output = self.model(pixels, grids)
        feats = per_image_features(output, grids, self.args.features, self.pool, self.args.normalize)
        feats = [f.to("cpu", copy=True) for f in feats]  # own storage: shards never hold views of the batch
        budget = budget_of(self.args)
        for index, feature, grid, size in zip(batch["indices"], feats, grids.tolist(), batch["sizes"]):
            item_id = pending[index].id
            self.sink.add({"id": item_id, "feature": feature, "grid": grid, "size": list(size)})
            row = table_row(item_id, size, grid, self.processor, budget)
            self.stats.patches += row["patches"]
            self.stats.tokens += row["tokens"]
            if self.keep_rows:
                self.rows.append(row)
        self.stats.images += len(batch["indices"])


def run(args: argparse.Namespace, dist: Dist) -> int:
    import torch
    from transformers import AutoImageProcessor

    from .dtypes import resolve_dtype

    device = choose_device(args.device, dist)
    args.dtype, dtype_line = resolve_dtype(args.dtype, device)  # concrete before the manifest records it
    items, dataset = collect_inputs(args)
    config = load_config(args)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    check_budget(args, processor)
    # Everything that can still refuse the command (model, attention backend, pooling) comes before DIR is touched.
    if dist.world_size > 1 and device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    try:
        model, source = load_model(args, config, device, announce=dist.rank == 0)
    except ImportError as error:  # e.g. --attn flash_attention_2 without flash-attn
        raise UsageError(str(error).strip().splitlines()[0]) from None
    pool = resolve_pool(args, model, processor, device)
    if args.out is not None:
        # rank 0 alone hashes the weights and prepares the folder; the other ranks wait for its verdict
        on_rank0(dist, lambda: prepare_output(args.out, make_fingerprint(args, config, processor, pool),
                                              args.overwrite, args.retry_errors))
        done, errored, _ = done_ids(args.out)
    else:
        done, errored = set(), set()
    mine = [item for item in items if owner_rank(item.id, dist.world_size) == dist.rank]
    pending = [item for item in mine if item.id not in done and item.id not in errored]
    skipped = sum(dist.gather(len(mine) - len(pending)))
    meta = {"features": args.features, "pool": str(pool), "normalize": str(args.normalize),
            "model": os.path.abspath(args.model), "weights": source, "dtype": args.dtype}
    keep_rows = args.table if args.table is not None else args.out is None
    job = EncodeJob(args, dataset, processor, model, device, pool, ShardSink(args.out, args.format, dist.rank, meta),
                    keep_rows)
    job.run(pending, show_progress=dist.rank == 0)

    all_stats = dist.gather(job.stats)  # also waits until every rank has written its last shard
    all_rows = [row for part in dist.gather(job.rows) for row in part]
    if dist.rank != 0:
        return 0  # rank 0 reports, and its exit status carries --strict
    total_errors, shards = sum(s.errors for s in all_stats), 0
    if args.out is not None:
        _, errored_now, shards = done_ids(args.out)
        total_errors = len(errored_now & {item.id for item in items})
    header = (f"model: {args.model} ({source}), attn={args.attn}, dtype={args.dtype}, device={device}, "
              f"processes={dist.world_size}, features={args.features}" + (f", pool={pool}" if pool else ""))
    print_summary(args, all_stats, all_rows, f"{header}\n{dtype_line}", skipped, total_errors, shards)
    return 1 if args.strict and total_errors else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_args(args)
        if args.shard_size is None:
            args.shard_size = DEFAULT_SHARD_SIZE[args.features]
        dist = Dist.from_env()
        try:
            return run(args, dist)
        finally:
            release_locks()
            dist.close()
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
