# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Which files of a model folder may be published: an allow-list of formats, each checked by its content.

A file is published only when it is one of
  * this project's remote code (`code_files`; the caller checks them byte for byte against the package's copies),
  * safetensors weights whose header parses and whose tensors exactly fill the file,
  * JSON (UTF-8),
  * UTF-8 text, by name (`TEXT_SUFFIXES`, `TEXT_NAMES`: Markdown, .txt, LICENSE, .gitattributes, ...),
  * a PNG, JPEG, WebP or GIF image that Pillow verifies, with nothing appended after it.
Anything else is refused with its name: pickles under any name or behind any prefix, numpy arrays, archives, YAML,
native modules, unknown formats. A format is accepted for what its content is, never for what it is not, so no
disguise of a pickle or of code gets through. None of the accepted formats is ever unpickled or run by a loader (a
protocol-0 pickle is ASCII, so it passes as a `.txt` or `.md` file, where nothing unpickles it; as `weights.npy`,
which `np.load(allow_pickle=True)` would unpickle, it is refused).

Before any content is read, credential files (by name), files the user cannot read and hard links shared with files
outside the folder are refused; then every file's text (JSON strings decoded, a safetensors header) is searched for
Hugging Face tokens and private keys. Nothing is imported, unpickled or executed.
"""

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Collection, Dict, Iterator, List, Optional, Sequence, Tuple


# -- credentials ---------------------------------------------------------------------------------------------------
CREDENTIAL_NAMES = frozenset(
    {".env", "hf_token", "token", ".netrc", "_netrc", ".git-credentials", "credentials", "credentials.json",
     ".pypirc", ".npmrc", ".dockercfg", "stored_tokens", ".htpasswd"}
)  # compared lower-case
CREDENTIAL_PREFIXES = (".env.", "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")
CREDENTIAL_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".jks", ".keystore")
CREDENTIAL_FOLDERS = frozenset({".huggingface", ".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure", ".config"})
HUB_TOKEN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")

# -- formats -------------------------------------------------------------------------------------------------------
NATIVE_MODULE = re.compile(r"\.(so(\.\d+)*|pyd|dylib|dll)$", re.IGNORECASE)
from .pickle_sniff import PICKLE_SUFFIXES  # noqa: E402 (named for what they usually hold)
TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".cff")
TEXT_NAMES = frozenset({".gitattributes", ".gitignore", "license", "licence", "notice", "copying", "authors"})
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF"}
_IMAGE_MAGIC = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "GIF": (b"GIF87a", b"GIF89a")}
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk with its CRC: nothing may follow it
_TEXT_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # C0 controls other than \t \n \f \r, and DEL
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too

# Refusal kinds, in the order the message gives them, each with what the user should know and do.
_KINDS = {
    "credential": "Credentials are never published: {items}. Remove them from the folder (and revoke a token that "
    "may have been shared).",
    "access": "Files you could not publish: {items}. Every published file must be readable by you and yours to "
    "share; copy the file into the folder if you mean to publish it.",
    "native": "Native modules are never published: {items}. Compiled code runs unchecked on the machine of whoever "
    "imports it; only this project's Python remote code is shipped.",
    "pickle": "Pickle files are not published (loading them runs arbitrary code): {items}. Keep only safetensors "
    "weights.",
    "format": "Files that are not of a published format: {items}. Only safetensors weights, JSON, UTF-8 text "
    "(Markdown, .txt, LICENSE, .gitattributes, ...), PNG/JPEG/WebP/GIF images and this project's remote code are "
    "published, each checked by its content: anything else may hide a pickle or code. Convert or remove them.",
}


class UnpublishableFiles(ValueError):
    """Some files of a folder must not be published; the message names each with its reason."""


@dataclass(frozen=True)
class Refusal:
    name: str  # relative POSIX path in the folder
    kind: str  # a key of _KINDS
    reason: str


def check_publishable(folder: Path, files: Sequence[str], code_files: Collection[str]) -> None:
    """Raise `UnpublishableFiles` naming every file of `files` (relative POSIX paths under `folder`) that must not
    be published; `code_files` are accepted as code without a format check."""
    found = refusals(Path(folder), files, code_files)
    if found:
        by_kind: Dict[str, List[str]] = {}
        for refusal in found:
            by_kind.setdefault(refusal.kind, []).append(f"{refusal.name} ({refusal.reason})")
        raise UnpublishableFiles(
            " ".join(_KINDS[kind].format(items=", ".join(items)) for kind, items in _sorted_kinds(by_kind))
        )


def _sorted_kinds(by_kind: Dict[str, List[str]]) -> List[Tuple[str, List[str]]]:
    return [(kind, by_kind[kind]) for kind in _KINDS if kind in by_kind]


def refusals(folder: Path, files: Sequence[str], code_files: Collection[str]) -> List[Refusal]:
    """Every refused file of `files` with the first reason found (name, then access, then content)."""
    shared_outside = _hard_links_out_of(folder, files)
    found = []
    for name in files:
        reason = _credential_name(name) or _access(folder / name, name in shared_outside)
        if reason is None and NATIVE_MODULE.search(name):
            reason = ("native", "a native module")
        if reason is None and name not in code_files:
            reason = _content(folder / name)
        if reason is not None:
            found.append(Refusal(name, *reason))
    return found


# -- names and access ----------------------------------------------------------------------------------------------


def _credential_name(name: str) -> Optional[Tuple[str, str]]:
    path = PurePosixPath(name)
    base = path.name.lower()
    folders = {part.lower() for part in path.parts[:-1]}
    if base in CREDENTIAL_NAMES or base.startswith(CREDENTIAL_PREFIXES) or base.endswith(CREDENTIAL_SUFFIXES):
        return "credential", "a credential file name"
    if folders & CREDENTIAL_FOLDERS:
        return "credential", f"in a credential folder ({sorted(folders & CREDENTIAL_FOLDERS)[0]}/)"
    return None


def _hard_links_out_of(folder: Path, files: Sequence[str]) -> set:
    """Files of `files` that are hard links with names outside `folder` (a link to someone else's file, a secret,
    ...): their link count exceeds the names the folder itself holds for them."""
    stats = {name: _stat(folder / name) for name in files}
    linked = {name: info for name, info in stats.items() if info is not None and info.st_nlink > 1}
    if not linked:
        return set()
    names_inside: Counter = Counter()  # (device, inode) -> names in the folder, links not followed
    for root, _, names in os.walk(folder):
        for entry in names:
            info = os.lstat(os.path.join(root, entry))
            names_inside[(info.st_dev, info.st_ino)] += 1
    return {name for name, info in linked.items() if names_inside[(info.st_dev, info.st_ino)] < info.st_nlink}


def _stat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except OSError:
        return None


def _access(path: Path, shared_outside: bool) -> Optional[Tuple[str, str]]:
    info = _stat(path)
    if info is None or not os.access(path, os.R_OK):
        return "access", "not readable by you"
    if shared_outside:
        return "access", f"a hard link to a file with names outside the folder (owner uid {info.st_uid})"
    return None


# -- content -------------------------------------------------------------------------------------------------------


def _content(path: Path) -> Optional[Tuple[str, str]]:
    """The format refusal or credential found in the content of `path`, or None when it is a published format."""
    name = path.name.lower()
    try:
        if name.endswith(".safetensors"):
            return _checked(*_safetensors(path))
        data = path.read_bytes()
    except OSError as err:
        return "access", f"cannot be read: {err.strerror or err}"
    if name.endswith(".json"):
        return _checked(data, *_json(data))
    if name.endswith(TEXT_SUFFIXES) or name in TEXT_NAMES:
        return _checked(data, [], _text(data))
    suffix = PurePosixPath(name).suffix
    if suffix in IMAGE_FORMATS:
        return _checked(data, [], _image(path, data, IMAGE_FORMATS[suffix]))
    if name.endswith(PICKLE_SUFFIXES):
        return "pickle", f"named like a pickle ({suffix})"
    return "format", f"{suffix or 'a name without a suffix'} is not a published format"


def _checked(data: bytes, strings: List[str], problem: Optional[str]) -> Optional[Tuple[str, str]]:
    """`problem` as a format refusal; else a credential found in the raw `data` or the decoded `strings`."""
    if problem is not None:
        return "format", problem
    for text in [data, *(s.encode("utf-8", "surrogatepass") for s in strings)]:
        if HUB_TOKEN.search(text):
            return "credential", "holds a Hugging Face token (hf_...)"
        if PRIVATE_KEY.search(text):
            return "credential", "holds a private key"
    return None


def _json_strings(value: Any) -> Iterator[str]:
    """Every string of a decoded JSON document, keys included (escapes such as \\u0068f_ are decoded by then)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _json_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_strings(item)


def _json(data: bytes) -> Tuple[List[str], Optional[str]]:
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        return [], f"not UTF-8 (byte {err.start})"
    except (ValueError, RecursionError) as err:
        return [], f"not valid JSON: {str(err).splitlines()[0][:200]}"
    return list(_json_strings(value)), None


def _text(data: bytes) -> Optional[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte {err.start})"
    control = _TEXT_CONTROLS.search(text)
    if control:
        return f"not plain text (control character {control.group()!r} at character {control.start()})"
    return None


def _image(path: Path, data: bytes, expected: str) -> Optional[str]:
    """`data` is exactly one image of the `expected` Pillow format: its signature, Pillow's own check of its
    structure, and nothing appended after its end."""
    magic_ok = (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP" if expected == "WEBP" else data.startswith(_IMAGE_MAGIC[expected])
    )
    if not magic_ok:
        return f"not a {expected} image (its first bytes are {data[:8]!r})"
    trailing = {
        "PNG": not data.endswith(_PNG_END),
        "JPEG": not data.endswith(b"\xff\xd9"),
        "GIF": not data.endswith(b";"),
        "WEBP": len(data) - 8 - int.from_bytes(data[4:8], "little") not in (0, 1),  # RIFF size (+ a pad byte)
    }[expected]
    if trailing:
        return f"a {expected} image with data appended after its end"
    try:
        from PIL import Image

        with Image.open(path) as image:
            found = image.format
            image.verify()
    except Exception as err:  # Pillow raises many kinds (SyntaxError, struct.error, DecompressionBombError, ...)
        return f"not a valid {expected} image: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}"
    if found != expected:
        return f"a {found} image named like {expected}"
    return None


def _safetensors(path: Path) -> Tuple[bytes, List[str], Optional[str]]:
    """The header bytes, its decoded strings and the problem (None: valid) of a safetensors file: a JSON header of
    known dtypes and shapes whose data ranges tile the rest of the file exactly (no byte unaccounted for)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, _SAFETENSORS_MAX_HEADER):
            return b"", [], f"not safetensors: a header of {length} bytes in a file of {size}"
        header = f.read(length)
    strings, problem = _json(header)
    if problem is not None:
        return header, [], f"not safetensors: the header is {problem}"
    return header, strings, _safetensors_layout(json.loads(header), size - 8 - length)


def _safetensors_layout(header: Any, data_size: int) -> Optional[str]:
    if not isinstance(header, dict):
        return "not safetensors: the header is not a JSON object"
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "not safetensors: __metadata__ must map names to strings"
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            return f"not safetensors: the entry of {name!r} is not {{dtype, shape, data_offsets}}"
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_ITEMSIZE:
            return f"not safetensors: {name!r} has the unknown dtype {dtype!r}"
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            return f"not safetensors: {name!r} has a malformed shape or data_offsets"
        begin, end = offsets
        if end - begin != math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]:
            return f"not safetensors: {name!r} spans {end - begin} bytes, its dtype and shape need another size"
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            return f"not safetensors: {name!r} starts at byte {begin} of the data, expected {position}"
        position = end
    if position != data_size:
        return f"not safetensors: the tensors cover {position} bytes of a data section of {data_size}"
    return None


def _ints(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
