# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-encode, the output folder: manifest, lock, shards (durable, checksummed), errors.jsonl and the done set a
rerun resumes from.
"""

import hashlib
import json
import os
import re
import signal
import sys
from typing import Any, Dict, List, Optional, Set, Tuple



from .encode_inputs import UsageError


FORMAT_EXT = {"safetensors": ".safetensors", "parquet": ".parquet"}
MANIFEST = "_manifest.json"
ERRORS = "errors.jsonl"
LOCK = ".lock"
CHECKSUM_KEY = "sha256"  # safetensors shards: in the header metadata (see with_checksum)
SHARD_RE = re.compile(r"^train-r(\d{5,})-(\d{6,})\.(safetensors|parquet)$")  # zero-padded, may outgrow the padding
TMP_PREFIX = ".tmp-"
MANIFEST_VERSION = 1
DEFAULT_SHARD_SIZE = {"pooled": 10000, "tokens": 100}  # a shard is held in memory until it is written
# Test hook: "<point>:<n>" SIGKILLs this process at the n-th occurrence of a point (after_shard, before_rename,
# mid_error, after_batch). Used by the kill-and-resume tests; never set it otherwise.
KILL_ENV = "SIGLIP2_NAVIT_ENCODE_KILL_AT"


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
    except OSError as error:  # e.g. the disk is full: say which file (a write or fsync error names none)
        raise OSError(error.errno, error.strerror, path) from None
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


def header_json(header: Dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def with_checksum(blob: bytes) -> Tuple[bytes, memoryview]:
    """A serialized safetensors shard -> (its header with CHECKSUM_KEY added to the metadata, its data section). The
    checksum is the sha256 of the header as `header_json` writes it without that key, then the data."""
    size = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8 : 8 + size]), memoryview(blob)[8 + size :]
    digest = hashlib.sha256(header_json(header))
    digest.update(data)
    header["__metadata__"][CHECKSUM_KEY] = digest.hexdigest()
    text = header_json(header)
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text, data


def shard_problem(path: str) -> Optional[str]:
    """Why a shard is not what was written (reads all of it), or None. safetensors: the checksum in its header
    (shards written before there was one pass); parquet: its page checksums. An OSError (e.g. a permission) is
    raised, never taken for corruption."""
    with open(path, "rb") as f:
        if not path.endswith(".safetensors"):
            import pyarrow.parquet as pq

            try:
                pq.read_table(f, page_checksum_verification=True)
            except Exception as error:  # noqa: BLE001 - any decoding failure: the content is damaged
                return f"unreadable: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            return None
        try:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            expected = header["__metadata__"].pop(CHECKSUM_KEY, None)
        except (ValueError, KeyError, TypeError, AttributeError, MemoryError):
            return "its header is unreadable"
        digest = hashlib.sha256(header_json(header))
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return None if expected in (None, digest.hexdigest()) else "its checksum does not match its content"


def remove_corrupt_shards(out: str) -> None:
    """Every shard checked against its checksum; a corrupt one is deleted, so that its images are encoded again."""
    for path in list_shards(out):
        problem = shard_problem(path)
        if problem is not None:
            os.remove(path)
            print(f"warning: {path} is corrupt ({problem}): deleted, its images are encoded again", file=sys.stderr)


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
    """One JSON line, UTF-8: a path or message with bytes that are not UTF-8 keeps them as backslash escapes."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def append_error(out: str, record: Dict[str, Any], count: int) -> None:
    """One O_APPEND write per record (ranks may share the file), fsynced. The kill hook can tear the line."""
    line, path = error_line(record), os.path.join(out, ERRORS)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.environ.get(KILL_ENV) == f"mid_error:{count}":
            os.write(fd, line[: len(line) // 2])
            os.fsync(fd)
            maybe_kill("mid_error", count)
        os.write(fd, line)
        os.fsync(fd)
    except OSError as error:  # e.g. the disk is full: say which file
        raise OSError(error.errno, error.strerror, path) from None
    finally:
        os.close(fd)


def describe_differences(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


_HELD_LOCKS: List[int] = []


def lock_output(out: str) -> None:
    """Hold an exclusive lock on DIR/.lock for the life of this process (rank 0 of a job), so that a second job
    writing into the same folder at the same time is refused. A POSIX record lock (`lockf`): it belongs to this
    process alone, so the DataLoader workers forked from it never hold it, and the kernel drops it when the process
    ends, even by SIGKILL while its orphaned workers are still exiting. The file holds the pid of the holder."""
    import fcntl

    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 20).decode("ascii", "replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise UsageError(f"another navit-encode job{pid} is writing into {out}; wait for it or use another --out"
                         ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    _HELD_LOCKS.append(fd)


def release_locks() -> None:
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


def prepare_output(out: str, fingerprint: Dict[str, Any], overwrite: bool, retry_errors: bool) -> None:
    """Rank 0, before any other rank touches the folder: take the folder's lock, start over if asked, check or
    write the manifest, remove temporary files of killed runs, repair errors.jsonl."""
    os.makedirs(out, exist_ok=True)
    for name in (LOCK, MANIFEST, ERRORS):
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UsageError(f"{path} is not a regular file (this tool writes it there): remove it, or use another "
                             "--out")
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
    remove_corrupt_shards(out)
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
    if "meta" in records[0]:  # --meta: each WebDataset sample's .json text (null when it has none)
        metadata["metas"] = json.dumps([r["meta"] for r in records])
    header, data = with_checksum(save(tensors, metadata=metadata))

    def write(f: Any) -> None:
        f.write(header)
        f.write(data)

    return write


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
    })
    if "meta" in records[0]:  # --meta: each WebDataset sample's .json text (null when it has none)
        table = table.append_column("meta", pa.array([r["meta"] for r in records], type=pa.string()))
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    return lambda f: pq.write_table(table, f, write_page_checksum=True)  # verified on resume (shard_problem)


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


