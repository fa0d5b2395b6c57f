"""Crash-safe file writes: a file holds either its old content or its complete new content, never a mix.

The new content goes to a temporary file in the target's directory (same file system, so the rename is atomic), is
flushed and ``fsync``'ed, then ``os.replace``'d over the target, and the directory is ``fsync``'ed so that the rename
itself survives a power loss. A process killed at any point leaves the target as it was, plus at most one stale
temporary file (``.<name>.<random>.tmp``), which :func:`remove_stale_temporaries` deletes.
"""
import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, List, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"


def _create_temporary(path: Path) -> "tuple[int, Path]":
    """A new, empty file next to ``path`` (created with the umask's permissions, unlike ``tempfile.mkstemp``)."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


def _fsync_path(path: PathLike) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_directory(directory: PathLike) -> None:
    """Make the directory's entries (a rename, a deletion) durable."""
    _fsync_path(directory)


def fsync_file(path: PathLike) -> None:
    """Flush a file that was written and closed elsewhere (e.g. by a library) to the disk."""
    _fsync_path(path)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path, "w") as handle: ...``: ``path`` gets the new content only if the block finishes.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    descriptor, temporary = _create_temporary(path)
    try:
        with os.fdopen(descriptor, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_torch_save(obj, path: PathLike) -> None:
    """``torch.save(obj, path)``, atomically: a reader (or a crash) never sees a half-written file."""
    import torch
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def replace_durably(source: PathLike, target: PathLike) -> None:
    """Move a complete file that was written elsewhere (same file system) over ``target``, flushed first."""
    fsync_file(source)
    os.replace(source, target)
    fsync_directory(Path(target).parent)


def remove_stale_temporaries(directory: PathLike) -> List[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``directory``; returns them.

    Only call this while no other process writes into ``directory`` (e.g. while holding its lock).
    """
    stale = [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "replace_durably", "fsync_file",
           "fsync_directory", "remove_stale_temporaries"]
