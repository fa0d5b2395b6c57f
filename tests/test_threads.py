"""CPU threads per process of the main job: a share of the cores per torchrun rank, ``OMP_NUM_THREADS`` respected,
``--threads`` wins."""
import pytest
import torch

from pyprune.app import cli
from pyprune.app.training import distributed
from pyprune.app.training.distributed import configure_threads, default_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_default_is_a_share_of_the_usable_cores_per_local_rank(monkeypatch):
    monkeypatch.setattr(distributed, "usable_cores", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # torch's own default: the physical cores
    assert default_threads(1) == 8          # never more than torch's default
    assert default_threads(4) == 4
    assert default_threads(32) == 1         # at least one


def test_omp_num_threads_is_respected_and_threads_wins(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_threads(None, local_world_size=1) == 1 and torch.get_num_threads() == 1
    assert configure_threads(2, local_world_size=1) == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert configure_threads(None, local_world_size=1) == default_threads(1) == torch.get_num_threads()


def test_the_job_reports_the_thread_count_and_refuses_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["prune", "--threads", "0", "--output-dir", str(tmp_path / "zero")])
    assert done.value.code == 2 and "--threads: must be >= 1" in capsys.readouterr().err
    assert cli.main(["prune", "--quick", "--no-progress", "--train-samples", "32", "--val-samples", "8",
                     "--batch-size", "8", "--max-iterations", "1", "--threads", "1",
                     "--output-dir", str(tmp_path / "out")]) == 0
    assert "1 CPU threads per process" in capsys.readouterr().out
    assert torch.get_num_threads() == 1
