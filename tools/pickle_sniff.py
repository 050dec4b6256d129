# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""What kind of pickle a checkpoint file is, for a clear message: nothing is ever unpickled (opcodes are only
disassembled, a zip archive only listed).

This is no safety gate. The converters read safetensors only (anything else fails to parse), and `navit-push`
publishes only files of an allow-list of formats checked by content (`file_safety`). The recognition here names the
common pickle checkpoints (by name, a binary pickle, a `torch.save` zip, a numpy object array) when a source is
refused, so that the message says how to re-save it instead of "invalid safetensors header".
"""

import ast
import io
import pickletools
import zipfile
from pathlib import Path
from typing import List, Optional


# Suffixes of files that are (or usually are) pickles.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
_SNIFF_BYTES = 4096  # bytes of a file looked at
_PICKLE_MEMBER_SUFFIXES = (".pkl", ".pickle")  # torch.save zips hold `<archive>/data.pkl`


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


def _npy_holds_objects(head: bytes) -> bool:
    """A `.npy` array whose dtype holds Python objects: its data is a pickle. The header is parsed as a literal and
    its `descr` turned into a dtype; no data is loaded."""
    if not head.startswith(b"\x93NUMPY") or len(head) < 10:
        return False
    length_bytes = 2 if head[6] == 1 else 4  # format version 1: uint16 header length; 2 and 3: uint32
    start = 8 + length_bytes
    text = head[start : start + int.from_bytes(head[8:start], "little")].decode("latin-1")
    try:
        import numpy as np

        return bool(np.dtype(ast.literal_eval(text)["descr"]).hasobject)
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError):
        return "O" in text


def _torch_zip_member(path: Path) -> Optional[str]:
    """The pickle member of a `torch.save` zip archive (`<archive>/data.pkl`), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            return next((n for n in archive.namelist() if n.lower().endswith(_PICKLE_MEMBER_SUFFIXES)), None)
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, EOFError):
        return None


def pickle_reason(path: Path) -> Optional[str]:
    """What kind of pickle the file at `path` is, judged by its name and its first bytes, or None."""
    path = Path(path)
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        return f"named like a pickle ({path.suffix})"
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    if _is_binary_pickle(head):
        return f"a pickle (protocol {head[1]})"
    if _npy_holds_objects(head):
        return "a numpy array of Python objects (stored as a pickle)"
    member = _torch_zip_member(path) if head.startswith(b"PK\x03\x04") else None
    return f"a zip archive holding the pickle {member!r} (torch.save format)" if member else None


def pickle_files(folder: Path) -> List[str]:
    """Relative paths of the files under `folder` that are pickles by name or content (see `pickle_reason`)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and pickle_reason(p))
