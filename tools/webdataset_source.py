# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-encode, WebDataset input: `.tar` shards (local paths, or any URL fsspec can open) become one item per sample.

A sample is the members of a shard sharing a key (the member path up to the first dot of its file name, as WebDataset
names them: `000010005.jpg`, `000010005.json` -> key `000010005`). Its image is the first member with an image
extension; its optional `.json` member can be carried as a `meta` string. Its id is `<shard>/<key>`, where `<shard>`
is the shard's file name without `.tar` (or, for a shard found in a folder, its path relative to that folder).

A shard is never extracted: listing it reads the member headers in one forward pass (the data is skipped by seeking),
and a sample's image is read later by its byte range. A sample without an image member, or the damaged tail of a
truncated shard, becomes an item with a `problem`: decoding it fails with that message, so it lands in errors.jsonl
under its id while the rest of the shard is encoded.
"""

import dataclasses
import glob
import os
import posixpath
import tarfile
from typing import IO, Dict, List, Optional

from .encode_inputs import IMAGE_EXTENSIONS, Item, TarMember, UsageError, is_url, printable_id, regular_file


TAR_SUFFIX = ".tar"


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIX) and not os.path.basename(name).startswith(".")


def shard_stem(name: str) -> str:
    """`a/b/shard-00001.tar` -> `a/b/shard-00001` (the id prefix of its samples)."""
    return name[: -len(TAR_SUFFIX)]


def fsspec_module():
    try:
        import fsspec
    except ImportError:
        raise UsageError('URL inputs need fsspec: pip install "siglip2-navit[encode]"') from None
    return fsspec


def open_binary(path: str) -> IO[bytes]:
    """A local regular file (never a FIFO: it would block) or an fsspec URL, opened for reading bytes."""
    if is_url(path):
        return fsspec_module().open(path, "rb").open()
    return open(regular_file(path), "rb")


def expand_url(token: str) -> List[Item]:
    """The samples of a `.tar` URL, or of every `.tar` a URL glob matches (sorted)."""
    fsspec = fsspec_module()
    fs, _, paths = fsspec.get_fs_token_paths(token)  # a glob is expanded (listing); a plain URL is checked once
    urls = sorted(fs.unstrip_protocol(p) for p in paths)
    if not urls or (not glob.has_magic(token) and not fs.exists(paths[0])):
        raise UsageError(f"no such file: {token}")
    not_tar = [u for u in urls if not is_tar_name(u)]
    if not_tar:
        raise UsageError(f"URL inputs must be WebDataset .tar shards, got {not_tar[0]}")
    return [item for url in urls for item in list_samples(url, shard_stem(posixpath.basename(url)))]


def split_member_name(name: str) -> Optional[tuple]:
    """(key, extension) of a member as WebDataset splits it, or None for a name without an extension or a hidden one."""
    folder, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem), ext.lower()


def is_image_extension(ext: str) -> bool:
    return "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS  # `seg.png` is an image too


def list_samples(path: str, prefix: str) -> List[Item]:
    """One item per sample of the shard at `path`, in the order of the shard, ids `<prefix>/<key>`."""
    samples: Dict[str, Dict[str, TarMember]] = {}  # key -> extension -> its first member
    problem = None
    try:
        with open_binary(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                parts = split_member_name(info.name) if info.isfile() else None
                if parts is not None:
                    samples.setdefault(parts[0], {}).setdefault(parts[1], TarMember(info.name, info.offset_data,
                                                                                    info.size))
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:  # a damaged or truncated shard
        problem = f"unreadable WebDataset shard after {len(samples)} samples: {type(error).__name__}: {error}"
    items = [sample_item(path, prefix, key, members) for key, members in samples.items()]
    if problem is not None:
        items.append(Item(printable_id(prefix), path=path, problem=problem))
    return items


def sample_item(path: str, prefix: str, key: str, members: Dict[str, TarMember]) -> Item:
    image = next((m for ext, m in members.items() if is_image_extension(ext)), None)
    problem = None if image is not None else (
        f"sample has no image member (found {', '.join(sorted(members))}; expected an extension among "
        f"{' '.join(sorted(IMAGE_EXTENSIONS))})")
    return Item(printable_id(f"{prefix}/{key}"), path=path, member=image, meta=members.get("json"), problem=problem)


def read_member(path: str, member: TarMember) -> bytes:
    """The bytes of one member, read by its byte range."""
    with open_binary(path) as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise ValueError(f"member {member.name} is truncated ({len(data)} of {member.size} bytes)")
    return data


def read_meta(item: Item) -> Optional[str]:
    """The sample's `.json` member as text (None when it has none or is no WebDataset sample)."""
    if item.meta is None or item.path is None:
        return None
    return read_member(item.path, item.meta).decode("utf-8", "replace")


def item_as_dict(item: Item) -> Dict[str, object]:
    """An item as plain data (JSON-able: ids and paths travel as text to other processes)."""
    return dataclasses.asdict(item)


def item_from_dict(data: Dict[str, object]) -> Item:
    fields = dict(data)
    for name in ("member", "meta"):
        if fields.get(name) is not None:
            fields[name] = TarMember(**fields[name])  # type: ignore[arg-type]
    return Item(**fields)  # type: ignore[arg-type]
