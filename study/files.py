"""File helpers shared by every stage: atomic writes, so a crash never leaves a half-written
result, checkpoint or model that a later run would take as finished; and SHA-256 digests, so a
later stage (or a resumed run) can tell that a finished stage's file is still the one it wrote."""

from __future__ import annotations

import contextlib
import hashlib
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


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 digest (64 lowercase hex characters) of the file at ``path``, read in
    ``chunk_bytes`` chunks (``hashlib.sha256``). Raises OSError when the file cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DigestMismatchError(ValueError):
    """A file that a finished stage recorded has changed or gone since; the message is one line
    naming the file."""


def check_digests(expected: dict[str, str], paths: dict[str, str | os.PathLike], remedy: str) -> None:
    """Check that every file ``paths[name]`` still has the SHA-256 digest ``expected[name]``
    (hex, as ``sha256_file`` returns it), for every name in ``expected``.

    Raises DigestMismatchError on the first file that differs or is missing: one line naming the
    file, both digests (first 12 hex digits) and ``remedy`` (what the user can do about it).
    Returns None when all match.
    """
    for name, digest in expected.items():
        path = Path(paths[name])
        if not path.is_file():
            raise DigestMismatchError(f"{path} is missing (recorded with sha256 {digest[:12]}...); {remedy}")
        actual = sha256_file(path)
        if actual != digest:
            raise DigestMismatchError(
                f"{path} has changed since it was exported (sha256 {actual[:12]}... instead of the "
                f"recorded {digest[:12]}...); {remedy}")
