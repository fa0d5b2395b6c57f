"""Image files of an ImageFolder dataset: a loader that names the file it cannot read, and an up-front check.

A truncated or corrupt file must stop the job at the start, with its path, not hours later (a val/ file is first
read after the whole pretraining) and not as a bare ``OSError: Truncated File Read``. Decoding every file up front
would cost as much as an epoch, so :func:`check_image_files` reads only each file's last bytes: a complete JPEG ends
with its end-of-image marker and a complete PNG with its ``IEND`` chunk. Only files that fail that test (and files of
other formats) are decoded, and only a failed decode is an error, so unusual but valid files still load.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, List, Optional

from ...errors import PyPruneError

_TAIL_BYTES = 64
_JPEG_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif")


class CorruptImageError(PyPruneError):
    """An image file cannot be decoded (truncated, corrupt, or not an image)."""


def _describe(path: str, error: BaseException) -> CorruptImageError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CorruptImageError(f"{path}: cannot read this image ({reason}); remove or replace the file")


def load_rgb_image(path: str):
    """``ImageFolder``'s loader, except that a file PIL cannot decode raises :class:`CorruptImageError` naming it."""
    from PIL import Image
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")  # decodes the whole file now, while its path is known
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises SyntaxError for some broken headers
        raise _describe(path, error) from None



def _ends_like_a_complete_file(path: str) -> Optional[bool]:
    """True / False for JPEG and PNG (whether the file's last bytes are its format's end marker); None otherwise."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - _TAIL_BYTES))
        tail = handle.read().rstrip(b"\x00")  # some writers pad after the end marker
    if head.startswith(b"\xff\xd8") or path.lower().endswith(_JPEG_EXTENSIONS):
        return tail.endswith(b"\xff\xd9")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" in tail[-12:]
    return None


def check_image_file(path: "os.PathLike | str") -> None:
    """Raise :class:`CorruptImageError` if ``path`` cannot be decoded (cheap for complete JPEG / PNG files)."""
    path = os.fspath(path)
    try:
        if _ends_like_a_complete_file(path):
            return
    except OSError as error:
        raise _describe(path, error) from None
    load_rgb_image(path)


def check_image_files(paths: "Iterable[os.PathLike | str]", threads: int = 8) -> None:
    """Check every file (in parallel: the work is mostly reading); the first bad one in ``paths`` order raises."""
    paths: List[str] = [os.fspath(path) for path in paths]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        errors = list(pool.map(_error_of, paths))
    for error in errors:
        if error is not None:
            raise error


def _error_of(path: str) -> Optional[CorruptImageError]:
    try:
        check_image_file(path)
    except CorruptImageError as error:
        return error
    return None


__all__ = ["CorruptImageError", "load_rgb_image", "check_image_file", "check_image_files"]
