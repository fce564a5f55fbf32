"""File helpers shared by every stage: atomic writes, so a crash never leaves a half-written
result, checkpoint or model that a later run would take as finished."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode() -> int:
    """Permissions of a new regular file under the current umask (mkstemp would make it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without error, the file is
    fsync-ed, given normal permissions and renamed over ``path`` (``os.replace``, atomic on POSIX).

    Readers see either the old file or the complete new one, never a partial write. On an error
    the temporary file is removed and ``path`` is left as it was. Creates missing parent folders.
    ``suffix`` is the temporary file's ending (some writers insist on one, e.g. ``.onnx``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_output``); returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy ``source`` to ``path`` atomically (see ``atomic_output``); returns the path."""
    with atomic_output(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)
