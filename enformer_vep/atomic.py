"""Files on disk: written so that they appear whole or not at all (a temporary name, fsync, rename),
with the permissions a plain ``open``/``mkdir`` would give them, and their SHA-256 checksums."""
from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to, in ``directory`` (default: beside ``path``) and
    named after ``path`` and this process, so two processes (a rerun and a dying worker of the run
    before) never write into the same one. When the block succeeds it is fsync'ed, given the mode a
    plain ``open(path, "w")`` would leave (``path``'s own mode when it exists, else 0o666 less the
    umask: writers such as safetensors create their temporary files 0600) and renamed to ``path``;
    when it fails it is removed: ``path`` is always absent, old or complete."""
    path = Path(path)
    tmp = Path(directory or path.parent) / f"{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        _set_mode(tmp, _replacement_mode(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is None:  # writers such as numpy and HDF5 do not say which file failed
            error.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write ``path`` through ``write(binary file)``, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's
    /proc/self/status), else by setting and restoring it under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def default_mode(*, directory: bool = False) -> int:
    """The permissions ``open(..., "w")`` (0o666) or ``mkdir`` (0o777) give a new file or directory
    under the current umask."""
    return (0o777 if directory else 0o666) & ~umask()


def fix_directory_mode(path: str | os.PathLike) -> None:
    """Give a directory made by :func:`tempfile.mkdtemp` (always 0700) the mode ``mkdir`` would give it."""
    _set_mode(path, default_mode(directory=True))


def _replacement_mode(path: Path) -> int:
    try:
        info = os.stat(path)
    except OSError:
        return default_mode()
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else default_mode()


def _set_mode(target: int | str | os.PathLike, mode: int) -> None:
    try:
        os.chmod(target, mode)
    except OSError:  # file systems without Unix permissions (some FUSE, CIFS mounts): keep what they give
        pass


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
