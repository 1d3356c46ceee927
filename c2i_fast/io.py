"""Files and provenance: atomic writes, atomically built directories, the device's name, library versions.

Nothing here imports torch or transformers at module level, so ``report.py`` (and anything that only renders
or copies results) stays light. Atomic means a reader sees the old file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())      # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a new directory under a temp name beside ``directory``; on a clean exit rename it into place.

    Yields the temp directory to fill. On an exception nothing appears at ``directory``. If ``directory``
    already exists it is removed first when ``replace`` is true (a cache being refreshed), else the rename
    fails with the OS's error (callers check for an existing directory before doing the work).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        os.chmod(work, 0o777 & ~umask())     # mkdtemp makes 0700; the final directory gets the usual mode
        yield work
        if replace and directory.exists():
            shutil.rmtree(directory)
        os.replace(work, directory)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def device_name() -> str:
    """The GPU's name when torch sees one, else the CPU model from /proc/cpuinfo (results name their device)."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """c2i_fast, torch, transformers, Python and platform versions (a result's provenance)."""
    import torch
    import transformers
    from . import __version__
    return {"c2i_fast": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
