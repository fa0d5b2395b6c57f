"""The output directory of ``pyprune prune`` as a small database: one writer, atomic files, a completion marker.

A directory is in one of four states, read from the files it holds:

* ``empty``: no run file (other files are left alone),
* ``unfinished``: ``checkpoint.pt`` without ``summary.json`` (a stopped, interrupted or failed run),
* ``finished``: ``summary.json``, written last by a run whose outputs were reloaded and verified,
* ``leftovers``: other output files of an earlier run, but neither of the two above.

The rules: a run holds an exclusive lock (``fcntl.flock`` on ``.lock``) for its whole life, and a second run into the
same directory is refused; a fresh run only starts in an ``empty`` directory unless ``--overwrite`` is given; a
``--resume`` never changes a file before its checkpoint has been loaded and checked; files are replaced atomically
(:mod:`pyprune.utils.files`), and ``summary.json`` is removed only once something validated is about to replace
what it describes.
"""
import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...errors import PyPruneError
from ...utils.files import disk_full_reported, fsync_directory, remove_stale_temporaries

CHECKPOINT_FILE, SUMMARY_FILE, LOCK_FILE = "checkpoint.pt", "summary.json", ".lock"
HF_MODEL_DIR = "hf_model"  # the language-model job's save_pretrained folder
# what a run leaves besides its checkpoint and summary (a directory holding any of them is not empty); the names
# are spelled here, not imported, so that the options module imports without torch; fix_subnet.json is what
# pyprune.algorithms.group_fisher.FIX_SUBNET_FILE names (tests/test_run_dir.py checks they agree)
OUTPUT_FILES = ("pruned_model.pt", "structure.json", "metrics.csv", "metrics.json", "pruning_curve.png",
                "fix_subnet.json", HF_MODEL_DIR)
STAGING_PREFIX = ".staging-"
CHECKPOINT_KEYS = ("signature", "position", "rows", "pending", "wall_s", "model", "optimizer", "algorithm", "rng")


class RunDirectoryError(PyPruneError):
    """The output directory cannot be used as asked (in use, or holds a run this command would clobber)."""


class CheckpointError(PyPruneError):
    """A checkpoint file cannot be read or is not a ``pyprune prune`` checkpoint."""


class RunDirectoryLock:
    """Exclusive, non-blocking lock on ``directory/.lock`` for the life of one run (``with`` or acquire/release).

    The holder writes its pid into the file so that a refused run can name it, and deletes the file when it is
    done (a killed holder leaves it behind, unlocked). Deleting is safe because a locker checks, once it holds the
    lock, that the file it locked is still the one at the path, and starts over if not.
    """

    def __init__(self, directory: os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._handle = None

    def acquire(self) -> "RunDirectoryLock":
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunDirectoryError(f"--output-dir {self.directory} is in use by another pyprune run (pid "
                                        f"{holder}); wait for it to end or choose another --output-dir") from None
            if self._still_at_path(handle):
                break
            handle.close()  # its holder deleted it after we opened it: lock the current file instead
        try:
            with disk_full_reported(self.path):
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
        except BaseException:
            self.path.unlink(missing_ok=True)  # still ours (locked): nobody is left holding a half-written lock
            with contextlib.suppress(OSError):  # closing flushes the unwritten pid again
                handle.close()
            raise
        self._handle = handle
        return self

    def _still_at_path(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so nobody can be holding the old file
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunDirectoryLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def run_state(directory: os.PathLike) -> str:
    """``'empty'``, ``'unfinished'``, ``'finished'`` or ``'leftovers'`` (see the module docstring)."""
    directory = Path(directory)
    if (directory / SUMMARY_FILE).exists():
        return "finished"
    if (directory / CHECKPOINT_FILE).exists():
        return "unfinished"
    if any((directory / name).exists() for name in OUTPUT_FILES):
        return "leftovers"
    return "empty"


def check_start(directory: os.PathLike, resume: Optional[str], overwrite: bool) -> None:
    """Refuse (``RunDirectoryError``, one line) a start that would clobber the run ``directory`` holds.

    Allowed: a fresh run into an ``empty`` directory; ``--resume`` of the directory's own checkpoint; anything
    with ``overwrite``. Reads only.
    """
    directory = Path(directory)
    state = run_state(directory)
    if overwrite or state == "empty":
        return
    own_checkpoint = directory / CHECKPOINT_FILE
    if resume is not None and Path(resume).resolve() == own_checkpoint.resolve():
        return
    what = {"finished": "a finished run (summary.json)",
            "unfinished": "an unfinished run (checkpoint.pt without summary.json)",
            "leftovers": "files of an earlier run (" + ", ".join(
                n for n in OUTPUT_FILES if (directory / n).exists()) + ")"}[state]
    if resume is not None:
        raise RunDirectoryError(f"--output-dir {directory} holds {what}; resuming {resume} there would replace it: "
                                f"choose another --output-dir or pass --overwrite")
    hint = "continue it with --resume, " if state == "unfinished" else ""
    raise RunDirectoryError(f"--output-dir {directory} holds {what}; {hint}choose another --output-dir, or pass "
                            f"--overwrite to replace it")


def remove_leftovers(directory: os.PathLike) -> None:
    """Delete what killed runs left behind: temporary files and staging folders. Call with the lock held."""
    remove_stale_temporaries(directory)
    for staging in Path(directory).glob(STAGING_PREFIX + "*"):
        shutil.rmtree(staging, ignore_errors=True)


def unmark_finished(directory: os.PathLike) -> None:
    """Remove ``summary.json``: from here on the directory's files no longer describe one complete run."""
    path = Path(directory) / SUMMARY_FILE
    if path.exists():
        path.unlink()
        fsync_directory(directory)


def _unreadable_reason(error: BaseException) -> str:
    """What was wrong with a file ``torch.load`` refused, without PyTorch's advice to load it unsafely."""
    import pickle
    if isinstance(error, (pickle.UnpicklingError, UnicodeDecodeError)):
        return "not a torch.save archive of tensors"
    if isinstance(error, EOFError):
        return "the file ends early"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = first.split(". ")[0].rstrip(".")
    if "weights_only" in first:
        return "not a torch.save archive of tensors"
    return first


def load_checkpoint(path: os.PathLike, map_location=None) -> Dict[str, Any]:
    """Load a ``pyprune prune`` checkpoint with ``weights_only=True``; any failure is one ``CheckpointError`` line
    naming the file."""
    import torch
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, pickle and I/O errors all mean the same to the user
        raise CheckpointError(f"{path} is truncated or corrupt: {_unreadable_reason(error)}; restore it from a copy, "
                              f"or start over with --overwrite") from None
    missing: List[str] = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pyprune prune checkpoint (missing {', '.join(missing)})")
    return state


__all__ = ["CHECKPOINT_FILE", "HF_MODEL_DIR", "SUMMARY_FILE", "LOCK_FILE", "OUTPUT_FILES", "STAGING_PREFIX", "RunDirectoryError",
           "CheckpointError", "RunDirectoryLock", "run_state", "check_start", "remove_leftovers", "unmark_finished",
           "load_checkpoint"]
