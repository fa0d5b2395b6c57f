"""pyprune.graphs: one captured training step / eval forward per subnet.

Without a GPU the bookkeeping runs on ``backend='eager'`` (the same cache, warm-up, static buffers and optimizer
preparation; every "replay" re-runs the step eagerly), checked against a plain training loop. The real CUDA graphs
are checked by the ``cuda``-marked tests at the end, which skip cleanly here.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.app.bench.model_bench import TinyNet, prepare
from pyprune.graphs import GraphedEval, GraphedTrainStep
from pyprune.mutators import ChannelMutator

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SUBNETS = (0.5, 0.75, 1.0)


def prepared_tiny(device="cpu"):
    torch.manual_seed(0)
    model = TinyNet()
    mutator = prepare(model, 16)
    return model.to(device), mutator


def set_ratio(mutator, ratio):
    mutator.set_choices({u.name: ratio for u in mutator.mutable_units})


def batch(device="cpu", n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    return x.to(device), torch.randint(0, 10, (n,), generator=generator).to(device)


def mirror_selection(copy_of_model, model):
    """Give a deep copy of a prepared model the live model's layer selections (its units drive only the model)."""
    for name, module in copy_of_model.named_modules():
        if hasattr(module, "set_out_index"):
            live = model.get_submodule(name)
            module.set_out_index(live.out_index)
            if not module._one_selection():
                module.set_in_index(live.in_index)


def plain_step(model, optimizer, x, y):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ----------------------------------------------------------------------------------------------- bookkeeping
def test_eager_backend_trains_exactly_like_a_plain_loop_across_subnets_and_lr_changes():
    model, mutator = prepared_tiny()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager")
    for i in range(7):
        set_ratio(mutator, SUBNETS[i % 3])
        mirror_selection(reference, model)
        if i == 4:  # a schedule writes a float learning rate between steps
            for group in optimizer.param_groups + ref_optimizer.param_groups:
                group["lr"] = 0.05
        x, y = batch(seed=i)
        torch.testing.assert_close(step(x, y), plain_step(reference, ref_optimizer, x, y))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.05)
    assert step.stats == {"replays": 4, "captures": 3, "warmup": 3, "eager": 0, "evictions": 0}


def test_a_subnet_warms_up_then_is_captured_then_replayed():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager",
                            warmup_steps=2)
    set_ratio(mutator, 0.5)
    history = []
    for _ in range(4):
        step(*batch())
        history.append((step.stats["warmup"], step.stats["captures"], step.stats["replays"]))
    assert history == [(1, 0, 0), (2, 0, 0), (2, 1, 1), (2, 1, 2)]


def test_the_cache_is_keyed_by_subnet_lru_bounded_and_evicts():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager",
                            cache_size=2)
    keys = {}
    for ratio in (0.5, 0.75, 0.5, 1.0):
        set_ratio(mutator, ratio)
        keys[ratio] = step._key()
        step(*batch())
    assert len(step) == 2 and step.keys() == [keys[0.5], keys[1.0]]  # 0.75 was least recently used
    assert step.stats["evictions"] == 1 and len(set(keys.values())) == 3


def test_changing_a_baked_hyper_parameter_makes_a_new_graph():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager")
    step(*batch())
    step(*batch())
    optimizer.param_groups[0]["momentum"] = 0.5
    step(*batch())
    assert len(step) == 2 and step.stats["warmup"] == 2
    optimizer.param_groups[0]["lr"] = 0.5  # the learning rate is not baked in: same graph
    step(*batch())
    assert len(step) == 2 and step.stats["warmup"] == 2


def test_a_batch_of_another_shape_runs_eagerly():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(n=4), mutator=mutator, backend="eager")
    loss = step(*batch(n=3))
    assert step.stats["eager"] == 1 and len(step) == 0 and loss.dim() == 0


def test_a_graph_keeps_the_index_tensors_it_was_captured_with():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager")
    set_ratio(mutator, 0.5)
    step(*batch())
    step(*batch())  # captured now
    captured_index = model.expand[0].out_index
    entry = step._graphs[step._key()]
    assert any(t is captured_index for t in entry.held)
    set_ratio(mutator, 0.75)
    set_ratio(mutator, 0.5)  # same subnet, a freshly built index tensor
    assert model.expand[0].out_index is not captured_index
    assert step._key() in step._graphs and torch.equal(model.expand[0].out_index, captured_index)


def test_eval_caches_are_dropped_after_a_replay():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager")
    set_ratio(mutator, 0.5)
    step(*batch())
    model.eval()
    with torch.no_grad():
        model(batch()[0])
    assert model.expand[0].tensor_provider.cache is not None
    step(*batch())
    assert model.expand[0].tensor_provider.cache is None


def test_graphed_eval_eager_backend_follows_subnets_and_training():
    model, mutator = prepared_tiny()
    x, _ = batch()
    forward = GraphedEval(model, x, mutator=mutator, backend="eager", cache_size=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(5):
        set_ratio(mutator, SUBNETS[i % 3])
        plain_step(model, optimizer, *batch(seed=i))
        model.eval()
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(forward(x), expected)
    assert forward.stats["warmup"] == 3 and forward.stats["replays"] == 2 and len(forward) == 3


# ---------------------------------------------------------------------------------------------- refusals
def test_cuda_graph_backend_needs_cuda():
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(RuntimeError, match="needs CUDA.*cpu"):
        GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        GraphedEval(model, batch()[0], mutator=mutator)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cache_size=0), ValueError, "cache_size"),
    (dict(warmup_steps=0), ValueError, "warmup_steps"),
    (dict(backend="cudagraphs"), ValueError, "backend"),
    (dict(mutator=None), ValueError, "mutator="),
    (dict(mutator=3), TypeError, "mutator must be"),
])
def test_bad_arguments_are_refused(kwargs, error, match):
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    args = {"mutator": mutator, "backend": "eager", **kwargs}
    with pytest.raises(error, match=match):
        GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), **args)
    assert isinstance(optimizer.param_groups[0]["lr"], float)  # nothing was prepared


def test_a_plain_model_needs_no_mutator():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), backend="eager")
    for _ in range(3):
        step(*batch())
    assert step.stats["replays"] == 2 and len(step) == 1


# ------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_reduce_overhead_compile_of_a_prepared_model_matches_eager():
    """On CPU ``mode='reduce-overhead'`` is plain inductor; the pyprune ops compile as extern kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 3))
    mutator = ChannelMutator("SequentialMutableChannelUnit", parse_cfg=dict(demo_input=(1, 3, 6, 6)))
    mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), mutator.export(model)(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@requires_cuda
def test_cuda_graphed_training_equals_eager_training_across_subnets():
    model, mutator = prepared_tiny("cuda")
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, fused=True)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch("cuda"), mutator=mutator, cache_size=2)
    sequence = (0.5, 0.75, 0.5, 0.75, 1.0, 0.5, 0.75, 0.5)  # hits, a capture, an eviction, a re-capture
    for i, ratio in enumerate(sequence):
        set_ratio(mutator, ratio)
        mirror_selection(reference, model)
        x, y = batch("cuda", seed=i)
        torch.testing.assert_close(step(x, y), plain_step(reference, ref_optimizer, x, y), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert step.stats["replays"] >= 4 and step.stats["evictions"] >= 1


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_replay_never_syncs_and_eval_graph_follows_the_weights():
    model, mutator = prepared_tiny("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch("cuda")
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, (x, y), mutator=mutator)
    forward = GraphedEval(model, x, mutator=mutator)
    set_ratio(mutator, 0.5)
    for _ in range(2):  # warm-up, capture
        step(x, y)
        forward(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(x, y)
            out = forward(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert optimizer.param_groups[0]["capturable"] is True


@pytest.mark.cuda
@requires_cuda
def test_cuda_reduce_overhead_compile_of_a_prepared_model_matches_eager():
    model, mutator = prepared_tiny("cuda")
    set_ratio(mutator, 0.5)
    model.eval()
    x, _ = batch("cuda")
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):  # cudagraph trees record on the second / third call
            out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_benchmark_graph_runner_times_replays_only():
    """The model benchmark's pyprune-graph runner: every timed call is a replay (warm-up and capture of a new subnet
    or input shape happen inside its first call); checked with the eager graph backend."""
    from pyprune.app.bench.model_bench import GraphRunner
    model, mutator = prepared_tiny()
    runner = GraphRunner(model, mutator, "torch", cache_size=2, graph_backend="eager")
    for ratio in (0.5, 0.75, 0.5):
        set_ratio(mutator, ratio)
        runner.train_step(*batch())
        runner.eval_step(batch()[0])
    runner.train_step(*batch(n=2))  # another batch size: its own graphs
    train = runner._graphed[("train", (4, 3, 16, 16))]
    assert train.stats == {"replays": 3, "captures": 2, "warmup": 2, "eager": 0, "evictions": 0}
    assert runner._graphed[("eval", (4, 3, 16, 16))].stats["replays"] == 3
    assert runner._graphed[("train", (2, 3, 16, 16))].stats["replays"] == 1


# ------------------------------------------------------------------------------------------ pyprune prune --cuda-graphs
@pytest.mark.parametrize("extra, message", [
    ([], "--cuda-graphs needs --no-compact"),
    (["--no-compact", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
])
def test_prune_cuda_graphs_refuses_what_it_cannot_graph(tmp_path, capsys, extra, message):
    from pyprune.app.cli import main
    out = tmp_path / "run"
    assert main(["prune", "--quick", "--cuda-graphs", "--output-dir", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.cuda
@requires_cuda
def test_cuda_prune_job_with_cuda_graphs(tmp_path):
    import json
    from pyprune.app.cli import main
    out = tmp_path / "run"
    assert main(["prune", "--quick", "--cuda-graphs", "--no-compact", "--device", "cuda", "--no-progress",
                 "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_exported"] <= 1.0 and summary["params_after"] < summary["params_before"]


def test_a_failed_capture_names_the_subnet_and_drops_its_entry(monkeypatch):
    import pyprune.graphs as graphs
    model, mutator = prepared_tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = GraphedTrainStep(model, F.cross_entropy, optimizer, batch(), mutator=mutator, backend="eager")
    step(*batch())  # warm-up

    def failing_capture(body, device, backend):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "_Captured", failing_capture)
    with pytest.raises(RuntimeError, match=r"capturing the step of subnet .* failed.*not permitted"):
        step(*batch())
    assert len(step) == 0 and step.stats["captures"] == 0
    monkeypatch.undo()
    step(*batch())  # the subnet starts over: warm-up again
    assert step.stats["warmup"] == 2 and len(step) == 1
