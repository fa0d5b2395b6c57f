"""The ``pyprune prune`` output directory as a small database.

Nothing finished is lost: a failed ``--resume`` changes no file, a fresh run never clobbers a run that is there, two
runs never share a directory, a process killed while writing a checkpoint leaves the previous one loadable, a full
disk stops the job in one line naming the file (the previous checkpoint stays, ``--resume`` goes on), and a broken
checkpoint is reported in one line naming the file, never with PyTorch's advice to load it unsafely.
"""
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyprune.app import cli
from pyprune.app.training.run_dir import (CheckpointError, RunDirectoryError, RunDirectoryLock, check_start,
                                      load_checkpoint, run_state)
from pyprune.utils.files import (DiskFullError, atomic_torch_save, atomic_write, atomic_write_text, is_disk_full,
                                 remove_stale_temporaries)

REPO = Path(__file__).resolve().parents[1]
# A tiny run: 4 iterations per epoch, 14 in all; checkpoints at iterations 4 (pretrained), 7 and 10 (pruning
# steps), 12 and 14 (finetuning epoch end).
TINY = ("prune", "--quick", "--no-progress", "--train-samples", "64", "--val-samples", "16", "--batch-size", "16")


def run_tiny(out: Path, *extra: str) -> int:
    return cli.main([*TINY, "--output-dir", str(out), *extra])


def digests(directory: Path):
    """sha256 of every file in ``directory`` (hidden ones included)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pyprune prune: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run_tiny(out) == 0
    assert run_state(out) == "finished"
    return out


@pytest.fixture
def finished_copy(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    return out


# ------------------------------------------------------------------------------------------- a failed resume
def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _random_bytes(path: Path):
    path.write_bytes(os.urandom(1000))


def _empty(path: Path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _empty])
def test_a_corrupt_checkpoint_is_one_line_and_changes_no_file(finished_copy, damage, capsys):
    damage(finished_copy / "checkpoint.pt")
    before = digests(finished_copy)
    assert run_tiny(finished_copy, "--resume") == 1
    line = one_error_line(capsys)
    assert f"{finished_copy / 'checkpoint.pt'} is truncated or corrupt: " in line
    assert "weights_only" not in line and "arbitrary code" not in line
    assert digests(finished_copy) == before  # summary.json included: the finished run is still marked complete
    assert run_state(finished_copy) == "finished"


def test_a_resume_with_other_options_changes_no_file(finished_copy, capsys):
    before = digests(finished_copy)
    assert run_tiny(finished_copy, "--resume", "--target-ratio", "0.25") == 1
    assert "made with other options" in one_error_line(capsys)
    assert digests(finished_copy) == before


def test_a_valid_torch_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint.pt is not a pyprune prune checkpoint \(missing signature"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ fresh runs and states
def test_a_fresh_run_refuses_an_unfinished_run_and_resume_continues_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_tiny(out, "--max-iterations", "5") == 0
    before = digests(out)
    assert run_tiny(out, "--max-iterations", "3") == 2
    line = one_error_line(capsys)
    assert f"--output-dir {out} holds an unfinished run" in line and "--resume" in line
    assert digests(out) == before
    assert run_tiny(out, "--resume", "--max-iterations", "1") == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 6


def test_a_fresh_run_refuses_a_finished_run_unless_overwrite(finished_copy, capsys):
    before = digests(finished_copy)
    assert run_tiny(finished_copy) == 2
    line = one_error_line(capsys)
    assert "holds a finished run" in line and "--overwrite" in line
    assert digests(finished_copy) == before

    assert run_tiny(finished_copy, "--overwrite", "--max-iterations", "1") == 0
    # the new run started training: the old summary no longer describes the directory; the old outputs stay until
    # the new run replaces them
    assert run_state(finished_copy) == "unfinished"
    assert load_checkpoint(finished_copy / "checkpoint.pt")["position"] == 1
    after = digests(finished_copy)
    assert after["pruned_model.pt"] == before["pruned_model.pt"]


def test_resuming_a_finished_run_rewrites_its_outputs_and_marks_it_complete(finished_copy, capsys):
    before = digests(finished_copy)
    assert run_tiny(finished_copy, "--resume") == 0
    assert run_state(finished_copy) == "finished"
    after = digests(finished_copy)
    assert after["pruned_model.pt"] == before["pruned_model.pt"] and after["checkpoint.pt"] == before["checkpoint.pt"]
    assert not [p for p in finished_copy.iterdir() if p.name.startswith(".")]  # no lock, temporary or staging


@pytest.mark.parametrize("files, state", [
    ((), "empty"), (("notes.txt",), "empty"), (("checkpoint.pt",), "unfinished"),
    (("checkpoint.pt", "summary.json"), "finished"), (("pruned_model.pt",), "leftovers"),
    (("fix_subnet.json",), "leftovers"), (("hf_model",), "leftovers"),
])
def test_run_state_and_what_a_fresh_start_may_do(tmp_path, files, state):
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    assert run_state(tmp_path) == state
    check_start(tmp_path, None, overwrite=True)
    if state == "empty":
        check_start(tmp_path, None, overwrite=False)
    else:
        with pytest.raises(RunDirectoryError, match=f"--output-dir {tmp_path} holds"):
            check_start(tmp_path, None, overwrite=False)
        # resuming another run's checkpoint into this directory would replace this one too
        with pytest.raises(RunDirectoryError, match="resuming /elsewhere/checkpoint.pt there would replace it"):
            check_start(tmp_path, "/elsewhere/checkpoint.pt", overwrite=False)
    check_start(tmp_path, str(tmp_path / "checkpoint.pt"), overwrite=False)  # its own checkpoint: always


def test_the_output_names_are_the_writers_names():
    from pyprune.algorithms.group_fisher import FIX_SUBNET_FILE
    from pyprune.app.training.lm import HF_DIR
    from pyprune.app.training.run_dir import OUTPUT_FILES
    assert FIX_SUBNET_FILE in OUTPUT_FILES and HF_DIR in OUTPUT_FILES


# ------------------------------------------------------------------------------------------------ the lock
def test_the_lock_is_exclusive_within_one_process(tmp_path):
    with RunDirectoryLock(tmp_path):
        with pytest.raises(RunDirectoryError, match=f"pid {os.getpid()}"):
            RunDirectoryLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()  # released: removed, and free again
    with RunDirectoryLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_lock_file_deleted_by_its_holder_after_we_opened_it_is_not_trusted(tmp_path, monkeypatch):
    """The race deleting the lock file opens: we open .lock, its holder deletes it and unlocks, we lock the
    deleted file. The locker must notice and lock the file now at the path instead."""
    import builtins
    real_open, opened = builtins.open, []

    def open_then_lose_the_race(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if str(path).endswith(".lock") and not opened:
            opened.append(path)
            os.unlink(path)  # the old holder's release
        return handle

    monkeypatch.setattr(builtins, "open", open_then_lose_the_race)
    lock = RunDirectoryLock(tmp_path).acquire()
    monkeypatch.setattr(builtins, "open", real_open)
    try:
        assert len(opened) == 1 and (tmp_path / ".lock").exists()
        with pytest.raises(RunDirectoryError, match="in use"):  # the file at the path is the locked one
            RunDirectoryLock(tmp_path).acquire()
    finally:
        lock.release()


def test_a_second_run_into_a_locked_directory_is_refused_naming_the_other_pid(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # The other run, reduced to what it does to the directory (without importing torch): flock .lock, write its pid.
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            with open({str(out / ".lock")!r}, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                handle.write(str(os.getpid()))
                handle.flush()
                print("locked", flush=True)
                sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_tiny(out, "--max-iterations", "1") == 2
        line = one_error_line(capsys)
        assert f"--output-dir {out} is in use by another pyprune run (pid {holder.pid})" in line
        assert digests(out) == {".lock": hashlib.sha256(str(holder.pid).encode()).hexdigest()}  # untouched
    finally:
        holder.communicate("", timeout=30)
    assert run_tiny(out, "--max-iterations", "1") == 0  # the other run ended: the directory is free


# --------------------------------------------------------------------------------------------- fault injection
KILL_MID_WRITE = """
import io, os, signal, sys
import torch
from pyprune.app import cli

real_save, saves = torch.save, []

def save(obj, handle, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # the job's second checkpoint: half its bytes reach the disk, then the process dies
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, handle, *args, **kwargs)

torch.save = save
cli.main([*sys.argv[1].split(), "--output-dir", sys.argv[2]])
"""

KILL_BEFORE_RENAME = """
import os, signal, sys
import torch
from pyprune.utils.files import atomic_torch_save

path = sys.argv[1]
atomic_torch_save({"position": 1}, path)
os.replace = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)  # the new file is complete, not renamed
atomic_torch_save({"position": 2}, path)
"""


def _killed(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def _temporaries(directory: Path):
    return [p for p in directory.iterdir() if p.name.startswith(".checkpoint.pt.")]


def test_a_job_killed_while_writing_a_checkpoint_leaves_the_previous_one_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    _killed(KILL_MID_WRITE, " ".join(TINY), str(out))
    assert len(_temporaries(out)) == 1
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 4  # the first checkpoint, whole

    assert run_tiny(out, "--resume", "--max-iterations", "1") == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 5
    assert not _temporaries(out), "the stale temporary file was not removed"
    assert not (out / ".lock").exists()


def test_a_kill_between_the_write_and_the_rename_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _killed(KILL_BEFORE_RENAME, str(path))
    assert torch.load(path, weights_only=True) == {"position": 1}
    [temporary] = _temporaries(tmp_path)
    assert torch.load(temporary, weights_only=True) == {"position": 2}  # complete, but never took the name
    assert remove_stale_temporaries(tmp_path) == [temporary] and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------------------------------- atomic writes
def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(target, "w") as handle:
            handle.write("new, but never finished")
            raise RuntimeError("half way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_writes_get_the_umask_permissions_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------- a full disk
class _FullAfter:
    """A file object that takes ``room`` more bytes, then fails every write the way a full device does."""

    def __init__(self, handle, room: int):
        self._handle, self._room = handle, room

    def write(self, data):
        size = len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
        if size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._handle.close()


def _fill_the_disk_at(monkeypatch, call: int, room: int = 1000):
    """From the ``call``-th file :func:`atomic_write` opens on, the device takes ``room`` bytes and is then full
    (the write below torch.save fails with ENOSPC, and torch reports it as its zip writer does)."""
    real_fdopen, calls = os.fdopen, []

    def fdopen(descriptor, *args, **kwargs):
        calls.append(descriptor)
        handle = real_fdopen(descriptor, *args, **kwargs)
        return _FullAfter(handle, room) if len(calls) >= call else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


ZIP_WRITER_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 492992 vs 492880"


@pytest.mark.parametrize("how", ["torch_save_enospc", "zip_writer_message", "text_enospc"])
def test_an_atomic_write_on_a_full_disk_is_one_error_naming_the_file_and_keeps_the_old_one(tmp_path, monkeypatch,
                                                                                          how):
    path = tmp_path / ("checkpoint.pt" if how != "text_enospc" else "metrics.json")
    if how == "text_enospc":
        atomic_write_text(path, "old")
    else:
        atomic_torch_save({"position": 1}, path)
    before = digests(tmp_path)
    if how == "zip_writer_message":  # the bare RuntimeError, as from a zip writer that wrote to a path itself
        def save(*args, **kwargs):
            raise RuntimeError(ZIP_WRITER_ERROR)
        monkeypatch.setattr(torch, "save", save)
    else:
        _fill_the_disk_at(monkeypatch, call=1)
    with pytest.raises(DiskFullError) as raised:
        if how == "text_enospc":
            atomic_write_text(path, "new " * 1000)
        else:
            atomic_torch_save({"position": 2, "weights": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and f"cannot write {path}: the disk is full" in message
    assert "free space" in message and "inline_container" not in message
    assert raised.value.path == path
    assert digests(tmp_path) == before  # the old file, unchanged, and no temporary
    if how != "text_enospc":
        assert torch.load(path, weights_only=True) == {"position": 1}


def test_only_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
    other = RuntimeError(ZIP_WRITER_ERROR)
    other.__context__ = OSError(errno.EIO, "Input/output error")  # the write failed, but not for want of space
    assert not is_disk_full(other)

    def broken_save(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="Input/output error") as raised:
        atomic_torch_save({"position": 1}, tmp_path / "checkpoint.pt")
    assert not isinstance(raised.value, DiskFullError) and not list(tmp_path.iterdir())


def _assert_full_disk_line(capsys, out: Path) -> None:
    line = one_error_line(capsys)
    assert f"cannot write {out / 'checkpoint.pt'}: the disk is full" in line, line
    assert "nothing is lost (the previous checkpoint is unchanged): free space, then continue with --resume" in line


def test_a_job_that_fills_the_disk_stops_in_one_line_and_resume_continues(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _fill_the_disk_at(monkeypatch, call=2)  # the job's second checkpoint (iteration 7)
    assert run_tiny(out) == 1
    monkeypatch.undo()
    _assert_full_disk_line(capsys, out)
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 4  # the first checkpoint, whole
    assert not _temporaries(out) and not (out / ".lock").exists() and run_state(out) == "unfinished"

    assert run_tiny(out, "--resume", "--max-iterations", "1") == 0  # space again: it goes on where it was
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 5


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mounted at ``tmp_path / 'disk'`` (root only; the test is skipped where mounting is not allowed);
    yields a function that resizes it to a number of KiB."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(disk)], capture_output=True,
                              text=True)

    if shutil.which("mount") is None or mount("-o", "size=64k").returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and permission to mount)")

    def resize(kib: int) -> None:
        result = mount("-o", f"remount,size={kib}k")
        assert result.returncode == 0, result.stderr

    try:
        yield disk, resize
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_job_on_a_really_full_tmpfs_keeps_its_checkpoint_and_resumes(small_tmpfs, finished_run, capsys):
    disk, resize = small_tmpfs
    checkpoint_kib = (finished_run / "checkpoint.pt").stat().st_size // 1024
    resize(checkpoint_kib * 3 // 2)  # room for one checkpoint, not for its replacement next to it
    out = disk / "out"
    capsys.readouterr()
    assert run_tiny(out) == 1
    _assert_full_disk_line(capsys, out)
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 4
    assert not _temporaries(out) and not (out / ".lock").exists()

    resize(checkpoint_kib * 6)  # space freed
    assert run_tiny(out, "--resume", "--max-iterations", "1") == 0
    assert load_checkpoint(out / "checkpoint.pt")["position"] == 5
