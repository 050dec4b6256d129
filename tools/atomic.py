# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""Atomic replacement of a destination folder: written beside it, swapped in, recovered after a killed run.
"""


import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Tuple


from .families import ConversionError


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
