"""Crash-safe file writes: a file holds either its old content or its complete new content, never a mix.

The new content goes to a temporary file in the target's directory (same file system, so the rename is atomic), is
flushed and ``fsync``'ed, then ``os.replace``'d over the target, and the directory is ``fsync``'ed so that the rename
itself survives a power loss. A process killed at any point leaves the target as it was, plus at most one stale
temporary file (``.<name>.<random>.tmp``), which :func:`remove_stale_temporaries` deletes.

A write that runs out of space (``ENOSPC`` / ``EDQUOT``, or the ``RuntimeError`` torch's zip writer raises after a
failed write: ``[enforce fail at inline_container.cc:...] . unexpected pos ...``) is one :class:`DiskFullError`
naming the file; the temporary file is removed and the target keeps its old content.
"""
import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, List, Union

from ..errors import PyPruneError

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# What torch's zip writer (caffe2/serialize/inline_container.cc) says when a write it made did not complete.
_ZIP_WRITER_FAILURES = ("unexpected pos", "file write failed", "errno 28", "no space left on device")


class DiskFullError(PyPruneError):
    """No space was left on the device while writing ``path``. ``advice`` says what to do (the message ends with
    it); an atomic write that fails this way leaves ``path`` as it was."""

    def __init__(self, path: PathLike, advice: str = "free space there, then write it again"):
        self.path, self.advice = Path(path), advice
        super().__init__(f"cannot write {path}: the disk is full (no space left on its device); {advice}")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an exception it was raised from or while handling, says the device is out of space.

    An ``OSError`` in the chain decides by its errno (another errno, e.g. ``EIO``, is not a full disk); without one,
    torch's zip-writer ``RuntimeError`` (its messages name no errno) counts as a full disk.
    """
    seen, current, zip_writer = set(), error, False
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno in _NO_SPACE
        if isinstance(current, RuntimeError):
            text = str(current).lower()
            zip_writer = zip_writer or any(marker in text for marker in _ZIP_WRITER_FAILURES)
        current = current.__cause__ or current.__context__
    return zip_writer


@contextlib.contextmanager
def disk_full_reported(path: PathLike) -> Iterator[None]:
    """``with disk_full_reported(path): ...``: a full disk inside the block becomes one :class:`DiskFullError`
    naming ``path`` (any other exception passes through unchanged)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:  # noqa: BLE001 - only re-raised as another type when it is a full disk
        if is_disk_full(error):
            raise DiskFullError(path) from error
        raise


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

    On an exception the temporary file is removed and ``path`` is untouched; a full disk (while writing, flushing,
    ``fsync``-ing or closing) is raised as :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    with disk_full_reported(path):
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
    """Move a complete file that was written elsewhere (same file system) over ``target``, flushed first (a flush
    that finds the disk full is a :class:`DiskFullError` naming ``target``, which is then unchanged)."""
    with disk_full_reported(target):
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


__all__ = ["DiskFullError", "is_disk_full", "disk_full_reported", "atomic_write", "atomic_write_text",
           "atomic_torch_save", "replace_durably", "fsync_file", "fsync_directory", "remove_stale_temporaries"]
