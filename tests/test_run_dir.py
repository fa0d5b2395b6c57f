"""The ``pyprune prune`` output directory as a small database (issue 13, items 1-4).

Nothing finished is lost: a failed ``--resume`` changes no file, a fresh run never clobbers a run that is there, two
runs never share a directory, a process killed while writing a checkpoint leaves the previous one loadable, and a
broken checkpoint is reported in one line naming the file, never with PyTorch's advice to load it unsafely.
"""
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

from pyprune import cli
from pyprune.training.run_dir import (CheckpointError, RunDirectoryError, RunDirectoryLock, check_start,
                                      load_checkpoint, run_state)
from pyprune.utils.files import atomic_write, atomic_write_text, remove_stale_temporaries

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
from pyprune import cli

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
