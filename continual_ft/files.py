"""Atomic file and folder writes: a kill at any moment leaves a file or folder old or new, never half written.

Run files are a record other people open, so they get the permissions a plain ``open()`` or
``mkdir()`` would give under the umask, not the private 0600/0700 of ``tempfile``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

__all__ = ["umask", "atomic_write", "atomic_dir", "follow_umask", "write_json", "write_yaml"]


def umask() -> int:
    """The process umask. Reading it means setting it, so it is put back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes ``mkdir()``/``open()`` give under the umask.

    ``tempfile.mkdtemp`` makes a folder 0700, and safetensors (0.8) writes its files 0600.
    """
    mask = umask()
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; it replaces ``path`` only if the block finishes.

    A kill at any moment leaves ``path`` as it was, or complete with the new files (or, between the
    two renames, absent, with the old files in a ``.<name>.*.old`` sibling): never half written.
    The new folder and its files get the umask's permissions (:func:`follow_umask`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        follow_umask(tmp)
        for f in tmp.rglob("*"):  # on disk before the rename makes them visible
            if f.is_file() and not f.is_symlink():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if not (path.exists() or path.is_symlink()):
            tmp.rename(path)
            return
        old = tmp.with_name(f"{tmp.name}.old")
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_yaml(path: Path, data: dict) -> None:
    atomic_write(path, yaml.safe_dump(data, sort_keys=False))
