"""Small filesystem helpers: atomic writes, hashing, safe names."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_hashing(src: Path, dest: Path, chunk: int = 1 << 20) -> str:
    """Copy ``src`` to ``dest`` (replacing it) and return the sha256 of the bytes copied: one
    read of ``src``, none of ``dest``."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (from /proc, without changing it; else by setting and restoring)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(umask: int | None) -> None:
    """The ``UMASK`` setting (linuxserver.io convention): applied once per process by every
    entry point; None keeps the inherited one."""
    if umask is not None:
        os.umask(umask)


def file_mode() -> int:
    """Mode of a new file: 0644 with the usual umask 022 (media servers running as another
    user can read the outputs); ``mkstemp`` alone would leave 0600."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An ``OSError`` raised inside without a file name (a ``write`` that meets a full disk
    or a file size limit) gets ``path``, so the message says which file it was."""
    try:
        yield
    except OSError as exc:
        if exc.filename or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    The temporary name starts with a dot and ends in ``.part`` so that nothing
    scanning the folder mistakes it for a finished file. On error it is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem[:40]}.", suffix=f".part{final.suffix}",
                               dir=final.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming(final):
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')


def safe_filename(text: str, max_bytes: int = 180) -> str:
    """A single path component from arbitrary text: no separators, no control or
    Windows-reserved characters, no leading dots, bounded length ("AC/DC" -> "AC_DC")."""
    name = _UNSAFE.sub("_", text).strip().strip(".").strip()
    name = re.sub(r"\s+", " ", name)
    if not name:
        name = "Unknown"
    encoded = name.encode("utf-8")
    if len(encoded) > max_bytes:
        name = encoded[:max_bytes].decode("utf-8", "ignore").rstrip()
    return name


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: Path, dest: Path) -> None:
    """Atomic rename that refuses to replace an existing destination (plain rename()
    silently replaces an empty directory). Uses renameat2(RENAME_NOREPLACE) on Linux."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # unsupported filesystem: fall back
            raise OSError(err, os.strerror(err), str(src), None, str(dest))
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dest))
    os.rename(src, dest)
