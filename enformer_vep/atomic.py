"""Files on disk: written so that they appear whole or not at all (a temporary name, fsync, rename),
and their SHA-256 checksums."""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to, in ``directory`` (default: beside ``path``) and
    named after ``path`` and this process, so two processes (a rerun and a dying worker of the run
    before) never write into the same one. When the block succeeds it is fsync'ed and renamed to
    ``path``; when it fails it is removed: ``path`` is always absent, old or complete."""
    path = Path(path)
    tmp = Path(directory or path.parent) / f"{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
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


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
