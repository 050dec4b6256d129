# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Pickle detection by content: nothing is ever unpickled (opcodes are only disassembled, archives only listed).
"""


import ast
import bz2
import io
import lzma
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Tuple



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
