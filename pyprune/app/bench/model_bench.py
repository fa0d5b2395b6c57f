"""Model-level benchmark: whole networks at several channel ratios, all backends side by side in one run.

Backends (each row's ``vs_dense`` is its time over the exported dense model's, same model / batch / ratio / workload):

* ``pyprune-ext``   : the prepared (dynamic) model, kernels on the compiled extension,
* ``pyprune-torch`` : the same model on the pure-torch kernel fallback,
* ``pyprune-compact``: a copy of the dynamic model in compact training mode (:mod:`pyprune.ops.compact`: the pruned
  tensors *are* compact, nothing is gathered or scattered), with its optimizer's state following,
* ``pyprune-sliced``: a copy of the dynamic model trained by :class:`pyprune.ops.kept_slice_sgd.KeptSliceSGD` (same
  lr / momentum): gradients of the compact tensors only, the update applied to the kept channels only ("lazy"
  momentum for dropped channels, see that module), on the default kernel backend,
* ``mmrazor-ref``   : the same subnet on mmrazor-style boolean-slicing layers (:mod:`.mmrazor_reference`),
* ``dense``         : ``mutator.export(model)``, plain torch layers with compact weights,
* ``pyprune-compile``: the dynamic model under ``torch.compile``,
* ``pyprune-batched`` (opt-in, :data:`OPTIONAL_BACKENDS`): the ``pyprune-ext`` model with
  :func:`pyprune.ops.batched_gather` on, so a training step gathers every op's tensors in one call (eval is unchanged),
* ``pyprune-graph`` / ``dense-graph`` (CUDA only, :data:`GRAPH_BACKENDS`): the dynamic / exported dense model with
  the whole step (train: forward, loss, backward, SGD step; eval: forward) replayed from one CUDA graph per subnet
  (:mod:`pyprune.graphs`; warm-up and capture happen in the untimed warm-up calls). Skipped ("needs CUDA") on CPU.

Models: torchvision classifiers on images ``[N, 3, S, S]``, ``tiny`` (:class:`TinyNet`), and ``llama`` (a Llama-style
causal LM from :mod:`.language_models`, on token ids ``[N, seq_len]`` with the next-token loss; mmrazor-ref and
pyprune-sliced are skipped for it, with the reason in the row).

The eval / train backends of one (model, batch, ratio) are timed in turn, repetition by repetition, so that load
from other processes hits them alike. Workloads: ``eval`` (no-grad forward in eval mode), ``train`` (forward +
cross-entropy + backward + SGD step) at fixed ratios, and ``switch`` (a training step on a new random subnet every
iteration: the subnets are drawn once with ``mutator.sample_choices()`` and replayed identically for every backend;
the dense baseline runs each subnet's pre-exported model, export time excluded; ``pyprune-compact`` changes the
subnet with its session paused, so the step includes writing back and re-compacting weights and momentum; the
backends take turns pass by pass, one pass = one step on every subnet, timed with ``cfg.clock``).
``enter+exit`` (``pyprune-compact`` only): one ``session.exit(); session.enter()`` at the fixed ratio, with momentum
state (``vs_dense`` = over one dense train step).
"""
import copy
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ...ops.selection import prefix_index
from ..training.step import TrainStep
from .language_models import build_language_model, is_language_model, token_batch
from .mmrazor_reference import build_reference_model
from .timing import Measurement, measure, synchronize

BACKENDS = ("pyprune-ext", "pyprune-torch", "pyprune-compact", "pyprune-sliced", "mmrazor-ref", "dense",
            "pyprune-compile")
GRAPH_BACKENDS = ("pyprune-graph", "dense-graph")  # CUDA only; in the CUDA default config, not in BACKENDS
OPTIONAL_BACKENDS = ("pyprune-batched",)  # only when asked for (--backends)
WORKLOADS = ("eval", "train")
CLOCKS = ("wall", "thread")
MODEL_NAMES = ("resnet18", "resnet50", "mobilenet_v2", "vit_b_16")
NUM_CLASSES = 1000


@dataclass
class ModelBenchConfig:
    """What to run.

    ``compile_models`` / ``compile_batch_sizes`` / ``compile_ratios``: where the ``pyprune-compile`` backend runs
    (``None`` = everywhere). Every subnet and batch size is a fresh compile of a minute or more, so the defaults
    keep it to one batch size.
    """
    device: torch.device
    models: Sequence[str] = MODEL_NAMES
    batch_sizes: Sequence[int] = (1, 8, 64)
    ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25)
    image_size: int = 224
    seq_len: int = 128  # tokens per sequence of a language model (:mod:`.language_models`)
    warmup: int = 3
    reps: int = 10
    backends: Sequence[str] = BACKENDS
    compile_models: Optional[Sequence[str]] = None        # None = every model
    compile_batch_sizes: Optional[Sequence[int]] = (8,)
    compile_ratios: Optional[Sequence[float]] = None
    compile_backend: str = "inductor"
    switch_subnets: int = 4
    switch_passes: int = 3
    seed: int = 0
    clock: str = "wall"  # CLOCKS; "thread": CPU time of the calling thread (CPU, one intra-op thread)
    extra: Dict[str, object] = field(default_factory=dict)


def quick_config(device: torch.device) -> ModelBenchConfig:
    """Seconds, not minutes: a tiny CNN, tiny inputs, one warm-up, two repetitions."""
    return ModelBenchConfig(device=device, models=("tiny",), batch_sizes=(2,), image_size=16, seq_len=16, warmup=1,
                            reps=2,
                            compile_backend="aot_eager", compile_batch_sizes=None, switch_subnets=2,
                            switch_passes=1)


def default_config(device: torch.device) -> ModelBenchConfig:
    if device.type == "cuda":
        # Fits the 10-minute-per-command budget when run one model per command (see benchmarks/RESULTS.md).
        return ModelBenchConfig(device=device, compile_models=("resnet18", "resnet50"), compile_ratios=(1.0, 0.5),
                                backends=BACKENDS + GRAPH_BACKENDS)
    # Two shared CPU cores: reduced images and batches; compile only the smallest ResNet at one point.
    return ModelBenchConfig(device=device, batch_sizes=(1, 8), image_size=96, warmup=2, reps=5,
                            compile_models=("resnet18",), compile_ratios=(0.5,))


# ------------------------------------------------------------------------------------------------------------ models
class TinyNet(nn.Module):
    """A small residual CNN with a depthwise conv and a linear head: x [N, 3, H, W] -> logits [N, 10]."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False),
                                       nn.BatchNorm2d(2 * width), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.depthwise(self.expand(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_supernet(name: str, image_size: int) -> nn.Module:
    """Randomly initialised model (never downloads weights): ``tiny``, a language model of
    :data:`.language_models.LANGUAGE_MODELS` (token ids in, flat logits out) or a torchvision classifier."""
    if name == "tiny":
        return TinyNet()
    if is_language_model(name):
        return build_language_model(name)
    import torchvision
    kwargs = {"image_size": image_size} if name.startswith("vit") else {}
    return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)


def num_classes_of(name: str) -> int:
    return 10 if name == "tiny" else NUM_CLASSES


def batch_of(cfg: ModelBenchConfig, name: str, batch: int):
    """``(inputs, labels)`` of one step of model ``name``: images ``[batch, 3, S, S]`` and class labels
    ``[batch]``, or for a language model token ids ``[batch, seq_len]`` and next-token labels ``[batch * seq_len]``."""
    if is_language_model(name):
        return token_batch(name, batch, cfg.seq_len, cfg.device)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=cfg.device)
    return x, torch.randint(0, num_classes_of(name), (batch,), device=cfg.device)


def prepare_named(model: nn.Module, name: str, cfg: ModelBenchConfig):
    """:func:`prepare` with model ``name``'s demo input (an image, or ``seq_len`` token ids)."""
    if is_language_model(name):
        return prepare(model, cfg.image_size, demo_input={"input_ids": torch.zeros(1, cfg.seq_len, dtype=torch.int64)})
    return prepare(model, cfg.image_size)


def prepare(model: nn.Module, image_size: int, demo_input=None):
    """Prepare ``model`` in place with a prefix (sequential) ChannelMutator; returns the mutator. ``demo_input``
    (default: one ``image_size`` image) is what the tracer runs."""
    from ...mutators import ChannelMutator
    if demo_input is None:
        demo_input = (1, 3, image_size, image_size)
    mutator = ChannelMutator(
        channel_unit_cfg=dict(type="SequentialMutableChannelUnit", default_args=dict(choice_mode="ratio")),
        parse_cfg=dict(type="ChannelAnalyzer", demo_input=demo_input, tracer_type="auto"))
    mutator.prepare_from_supernet(model)
    return mutator


# --------------------------------------------------------------------------------------------------------- workloads
def extension_available() -> bool:
    return bool(getattr(kernels, "extension_available", lambda: False)())


def _use_backend(name: str):
    if hasattr(kernels, "use_backend"):
        return kernels.use_backend(name)
    import contextlib
    return contextlib.nullcontext()


class Runner:
    """One backend's model, optimizer and kernel backend; ``eval_step`` / ``train_step`` are the timed bodies (the
    training step is the job's eager :class:`pyprune.app.training.step.TrainStep`)."""

    def __init__(self, model: nn.Module, kernel_backend: str, forward: Optional[Callable] = None):
        self.model = model
        self.kernel_backend = kernel_backend
        self.forward = model if forward is None else forward
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.step = TrainStep(model, self.optimizer, forward=self.forward)
        self.session = None  # the CompactTraining session of a pyprune-compact runner

    @classmethod
    def sliced(cls, model: nn.Module) -> "Runner":
        """A runner whose ``model`` (not shared with other runners: the optimizer hooks it) trains with
        :class:`~pyprune.ops.kept_slice_sgd.KeptSliceSGD` at the other runners' lr / momentum."""
        from ...ops.kept_slice_sgd import KeptSliceSGD
        runner = cls(model, dynamic_backend_name())
        runner.optimizer = KeptSliceSGD(model, lr=1e-3, momentum=0.9)
        runner.step = TrainStep(model, runner.optimizer, forward=runner.forward)
        return runner

    @classmethod
    def compact(cls, model: nn.Module) -> "Runner":
        """A runner whose ``model`` (not shared with other runners) trains in compact mode."""
        from ...ops import compact_training
        runner = cls(model, dynamic_backend_name())
        runner.session = compact_training(model, runner.optimizer)
        return runner

    def enter_exit(self) -> None:
        """Leave compact mode (everything written back) and enter it again."""
        self.session.exit()
        self.session.enter()

    def eval_step(self, x: torch.Tensor) -> None:
        self.model.eval()
        with torch.no_grad(), _use_backend(self.kernel_backend):
            self.forward(x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with _use_backend(self.kernel_backend):
            self.step(x, y)


class BatchedRunner(Runner):
    """A runner on a model shared with others, with :func:`pyprune.ops.batched_gather` switched on only during its
    own training steps."""

    def __init__(self, model: nn.Module, kernel_backend: str):
        from ...ops import batched_gather
        super().__init__(model, kernel_backend)
        self.batched = batched_gather(model)
        self.batched.enabled = False

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.batched.enabled = True
        try:
            super().train_step(x, y)
        finally:
            self.batched.enabled = False


class GraphRunner:
    """A runner whose steps replay CUDA graphs (:mod:`pyprune.graphs`): one graph per subnet and input shape. A
    subnet's first call also runs its eager warm-up step and the capture, so the timed calls are replays."""

    def __init__(self, model: nn.Module, mutator, kernel_backend: str, cache_size: int = 8,
                 graph_backend: str = "cuda-graph"):
        self.model, self.mutator, self.kernel_backend, self.cache_size = model, mutator, kernel_backend, cache_size
        self.graph_backend = graph_backend  # 'eager' runs the same bookkeeping without CUDA (tests)
        self.forward = model  # check_same_subnet compares the eager forward (the graphs run the same module)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self._graphed: Dict[tuple, object] = {}

    def eval_step(self, x: torch.Tensor) -> None:
        from ...graphs import GraphedEval
        with _use_backend(self.kernel_backend):
            key = ("eval", tuple(x.shape))
            if key not in self._graphed:
                self._graphed[key] = GraphedEval(self.model, x, mutator=self.mutator, cache_size=self.cache_size,
                                                 backend=self.graph_backend)
            _replayed(self._graphed[key], x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from ...graphs import GraphedTrainStep
        with _use_backend(self.kernel_backend):
            key = ("train", tuple(x.shape))
            if key not in self._graphed:
                self._graphed[key] = GraphedTrainStep(self.model, F.cross_entropy, self.optimizer, (x, y),
                                                      mutator=self.mutator, cache_size=self.cache_size,
                                                      backend=self.graph_backend)
            _replayed(self._graphed[key], x, y)


def _replayed(graphed, *args) -> None:
    """Call ``graphed`` until one call was a replay (a new subnet's warm-up and capture calls come first)."""
    for _ in range(graphed.warmup_steps + 2):
        before = graphed.stats["replays"]
        graphed(*args)
        if graphed.stats["replays"] > before:
            return
    raise RuntimeError(f"{type(graphed).__name__} never replayed (stats {graphed.stats})")


# What a language model (tied input / output embeddings, RMSNorm, attention heads) does not run on, and why:
# mmrazor's dynamic ops have no embedding, RMSNorm or attention-head slicing, and neither has the reference;
# KeptSliceSGD refuses a tensor two layers slice.
UNSUPPORTED_BY_LANGUAGE_MODELS = {
    "mmrazor-ref": "skipped: the mmrazor-style reference has no embedding / RMSNorm / attention-head layers",
    "pyprune-sliced": "skipped: KeptSliceSGD does not step a tensor shared by two layers (tied embeddings)",
}


def _runs(backend: str, model_name: str) -> bool:
    """Whether ``backend`` can run model ``name`` at all (see :data:`UNSUPPORTED_BY_LANGUAGE_MODELS`)."""
    return not (is_language_model(model_name) and backend in UNSUPPORTED_BY_LANGUAGE_MODELS)


def _skip_reason(backend: str, model_name: str = "") -> str:
    if not _runs(backend, model_name):
        return UNSUPPORTED_BY_LANGUAGE_MODELS[backend]
    return "skipped: needs CUDA" if backend in GRAPH_BACKENDS else "skipped: extension not built"


def dynamic_backend_name() -> str:
    """The kernel backend a compiled or "best" dynamic model runs on."""
    return "ext" if extension_available() else "torch"


def check_same_subnet(runners: Dict[str, Runner], x: torch.Tensor, label: str, tolerance: float = 1e-3) -> None:
    """Every runner's eval output must match the dense export's (catches a benchmark of the wrong subnet)."""
    outputs = {}
    for name, runner in runners.items():
        if name == "pyprune-compile":
            continue  # same module as pyprune-*; compiling it just for a check is not worth the time
        runner.model.eval()
        with torch.no_grad(), _use_backend(runner.kernel_backend):
            outputs[name] = runner.forward(x).float()
    reference = outputs["dense"]
    scale = reference.abs().max().clamp_min(1.0)
    for name, out in outputs.items():
        if out.shape != reference.shape or (out - reference).abs().max() > tolerance * scale:
            raise AssertionError(f"{label}: {name} does not compute the same subnet as the exported dense model")


# ------------------------------------------------------------------------------------------------------------- grid
def _result_row(cfg: ModelBenchConfig, model: str, batch: int, ratio, backend: str, workload: str,
                result: Optional[Measurement], status: str = "ok") -> Dict[str, object]:
    # a language model's row leaves image_size empty (its sequence length is the run header's seq_len)
    image_size = None if is_language_model(model) else cfg.image_size
    return {"model": model, "batch": batch, "image_size": image_size, "ratio": ratio, "backend": backend,
            "workload": workload,
            "median_ms": float("nan") if result is None else result.median_s * 1e3,
            "times_ms": [] if result is None else [t * 1e3 for t in result.times_s],
            "syncs_per_step": None if result is None else result.syncs_per_call,
            "vs_dense": float("nan"), "status": status}


def _fill_vs_dense(rows: List[Dict[str, object]]) -> None:
    """``vs_dense``: for the interleaved eval / train cells the median over repetition rounds of this backend's time
    over dense's in the same round (a paired ratio: load that changes between rounds cancels out), otherwise the
    ratio of the medians. The switch cost of compact mode (``enter+exit``) is counted in dense training steps."""
    dense = {(r["model"], r["batch"], r["ratio"], r["workload"]): r for r in rows
             if r["backend"] == "dense" and r["status"] == "ok"}
    for row in rows:
        workload = "train" if row["workload"] == "enter+exit" else row["workload"]
        base = dense.get((row["model"], row["batch"], row["ratio"], workload))
        if base is None or row["status"] != "ok":
            continue
        paired = row["workload"] in WORKLOADS and len(row["times_ms"]) == len(base["times_ms"]) > 0
        row["vs_dense"] = statistics.median(t / d for t, d in zip(row["times_ms"], base["times_ms"])) if paired \
            else row["median_ms"] / base["median_ms"]


def _compiles(cfg: ModelBenchConfig, model_name: str, ratio: Optional[float] = None,
              batch: Optional[int] = None) -> bool:
    """Whether ``pyprune-compile`` runs for this model (and ratio / batch size, when given)."""
    wanted = [(cfg.compile_models, model_name), (cfg.compile_ratios, ratio), (cfg.compile_batch_sizes, batch)]
    return "pyprune-compile" in cfg.backends and all(
        allowed is None or value is None or value in allowed for allowed, value in wanted)


def _backends_for(cfg: ModelBenchConfig, model_name: str, ratio: Optional[float] = None,
                  batch: Optional[int] = None) -> List[str]:
    return [b for b in cfg.backends if b != "pyprune-compile" or _compiles(cfg, model_name, ratio, batch)]


def _make_runners(model: nn.Module, mutator, backends: Sequence[str], cfg: ModelBenchConfig,
                  model_name: str = "") -> Dict[str, Runner]:
    device = cfg.device
    runners = {}
    if "pyprune-ext" in backends and extension_available():
        runners["pyprune-ext"] = Runner(model, "ext")
    if "pyprune-torch" in backends:
        runners["pyprune-torch"] = Runner(model, "torch")
    if "pyprune-compact" in backends:
        runners["pyprune-compact"] = Runner.compact(copy.deepcopy(model))
    if "pyprune-sliced" in backends and _runs("pyprune-sliced", model_name):
        runners["pyprune-sliced"] = Runner.sliced(copy.deepcopy(model))
    if "mmrazor-ref" in backends and _runs("mmrazor-ref", model_name):
        runners["mmrazor-ref"] = Runner(build_reference_model(model, mutator).model.to(device), "torch")
    runners["dense"] = Runner(mutator.export(copy.deepcopy(model)).to(device), "torch")
    if "pyprune-compile" in backends:
        torch._dynamo.reset()  # a fresh cache per subnet: recompiling is part of the warm-up, not of a timed step
        compiled = torch.compile(model, backend=cfg.compile_backend, dynamic=False)
        runners["pyprune-compile"] = Runner(model, dynamic_backend_name(), forward=compiled)
    if device.type == "cuda" and "pyprune-graph" in backends:
        runners["pyprune-graph"] = GraphRunner(model, mutator, dynamic_backend_name())
    if "pyprune-batched" in backends:
        runners["pyprune-batched"] = BatchedRunner(model, dynamic_backend_name())
    if device.type == "cuda" and "dense-graph" in backends:
        runners["dense-graph"] = GraphRunner(copy.deepcopy(runners["dense"].model), None, "torch")
    return runners


def bench_fixed_ratios(cfg: ModelBenchConfig, model_name: str, progress: Callable) -> List[Dict[str, object]]:
    """eval / train rows for every batch size, ratio and backend of one model."""
    torch.manual_seed(cfg.seed)
    model = build_supernet(model_name, cfg.image_size)
    mutator = prepare_named(model, model_name, cfg)
    model.to(cfg.device)
    rows = []
    for ratio in cfg.ratios:
        mutator.set_global_ratio(ratio)
        runners = _make_runners(model, mutator, _backends_for(cfg, model_name, ratio), cfg, model_name)
        # Checked before any training step: afterwards the backends' weights drift apart (each trains its own).
        probe, _ = batch_of(cfg, model_name, 2)
        check_same_subnet(runners, probe, f"{model_name} ratio {ratio}")
        for batch in cfg.batch_sizes:
            x, y = batch_of(cfg, model_name, batch)
            for workload in WORKLOADS:
                backends = _backends_for(cfg, model_name, ratio, batch)
                rows += _time_cell(cfg, runners, backends, workload, model_name, batch, ratio, x, y)
                progress(len(backends))
        if "pyprune-compact" in runners:  # after the train rows, so the optimizer has momentum state to move
            rows.append(_time_enter_exit(cfg, runners["pyprune-compact"], model_name, cfg.batch_sizes[-1], ratio))
    return rows


def _time_enter_exit(cfg, runner: Runner, model_name: str, batch: int, ratio) -> Dict[str, object]:
    """The switch cost of compact mode: leave it (write back weights, statistics, momentum) and enter it again."""
    result = measure(runner.enter_exit, cfg.device, warmup=cfg.warmup, reps=cfg.reps)
    return _result_row(cfg, model_name, batch, ratio, "pyprune-compact", "enter+exit", result)


def _time_cell(cfg, runners, backends, workload, model_name, batch, ratio, x, y) -> List[Dict[str, object]]:
    """Rows of one (model, batch, ratio, workload) cell, in ``backends`` order. After each backend's warm-up, the
    repetitions go round the backends one at a time, so that other load on a shared machine hits them alike (timed
    back to back, a burst of load lands on one backend's whole run). Each timed call follows an untimed call of the
    same backend: its caches are as warm as in a training loop, not cold from the previous backend's model (which
    cost a small compact model 10 % after the full-size gather-mode one)."""
    steps = {b: _step(runners[b], workload, x, y) for b in backends if b in runners}
    times: Dict[str, List[float]] = {b: [] for b in steps}
    syncs, failed = {}, {}
    for repetition in range(-1, cfg.reps):  # -1: each backend's warm-up and sync count
        for backend, step in list(steps.items()):
            try:
                result = _measure_once(step, cfg, warmup=cfg.warmup if repetition < 0 else 1, syncs=repetition < 0)
            except Exception as error:  # one failing backend (e.g. a compile error) must not hide the others'
                failed[backend] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
                del steps[backend]
                continue
            if repetition < 0:
                syncs[backend] = result.syncs_per_call
            else:
                times[backend] += result.times_s
    rows = []
    for backend in backends:
        if backend not in runners:
            rows.append(_result_row(cfg, model_name, batch, ratio, backend, workload, None,
                                    _skip_reason(backend, model_name)))
        elif backend in failed:
            rows.append(_result_row(cfg, model_name, batch, ratio, backend, workload, None, failed[backend]))
        else:
            result = Measurement(times_s=times[backend], syncs_per_call=syncs[backend])
            rows.append(_result_row(cfg, model_name, batch, ratio, backend, workload, result))
    return rows


def _measure_once(step: Callable[[], None], cfg: ModelBenchConfig, warmup: int, syncs: bool) -> Measurement:
    """One timed call of ``step`` after ``warmup`` untimed ones. ``cfg.clock == "thread"`` times the calling
    thread's CPU time: with one intra-op thread on the CPU the whole step (autograd's CPU backward included) runs on
    it, and time other processes take from the core is not counted, which wall time on a shared machine is."""
    if cfg.clock == "wall":
        return measure(step, cfg.device, warmup=warmup, reps=1, syncs=syncs)
    for _ in range(warmup):
        step()
    start = time.thread_time()
    step()
    return Measurement(times_s=[time.thread_time() - start])


def check_clock(cfg: ModelBenchConfig) -> None:
    """ValueError when ``cfg.clock`` cannot time this configuration."""
    if cfg.clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {cfg.clock!r}")
    if cfg.clock == "thread" and (cfg.device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(f"--clock thread times one CPU thread: it needs --device cpu and --threads 1 (got "
                         f"{cfg.device.type}, {torch.get_num_threads()} threads)")


def _step(runner, workload: str, x, y) -> Callable[[], None]:
    return (lambda: runner.eval_step(x)) if workload == "eval" else (lambda: runner.train_step(x, y))


# ----------------------------------------------------------------------------------------------------------- switch
SWITCH_BACKENDS = ("pyprune-ext", "pyprune-torch", "pyprune-compact", "pyprune-sliced", "mmrazor-ref", "dense")


def bench_switch(cfg: ModelBenchConfig, model_name: str, batch: int) -> List[Dict[str, object]]:
    """Training steps on a new random subnet every iteration (same subnet sequence for every backend)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_supernet(model_name, cfg.image_size)
    mutator = prepare_named(model, model_name, cfg)
    model.to(cfg.device)
    subnets = [mutator.sample_choices() for _ in range(cfg.switch_subnets)]

    with_reference = "mmrazor-ref" in cfg.backends and _runs("mmrazor-ref", model_name)
    if with_reference:
        reference = build_reference_model(model, mutator)
        reference.model.to(cfg.device)
        ref_runner = Runner(reference.model, "torch")
    prefix_counts, dense_models = [], []
    for choices in subnets:
        mutator.set_choices(choices)
        prefix_counts.append(_unit_prefix_counts(mutator))
        dense_models.append(mutator.export(copy.deepcopy(model)).to(cfg.device))
    x, y = batch_of(cfg, model_name, batch)

    dynamic = {name: Runner(model, backend) for name, backend in (("pyprune-ext", "ext"), ("pyprune-torch", "torch"))
               if name in cfg.backends and (backend == "torch" or extension_available())}
    dense_runners = [Runner(m, "torch") for m in dense_models]
    # Each step runs subnet i (an index into ``subnets``); every backend walks the same sequence.
    steps: Dict[str, Callable[[int], None]] = {}
    for name, runner in dynamic.items():
        steps[name] = lambda i, runner=runner: (mutator.set_choices(subnets[i]), runner.train_step(x, y))
    if with_reference:
        steps["mmrazor-ref"] = lambda i: (reference.set_unit_prefixes(prefix_counts[i]), ref_runner.train_step(x, y))
    steps["dense"] = lambda i: dense_runners[i].train_step(x, y)
    if "pyprune-compact" in cfg.backends:
        compact_mutator, compact = _compact_switch_runner(cfg, model_name)
        steps["pyprune-compact"] = lambda i: (_set_paused(compact, compact_mutator, subnets[i]),
                                              compact.train_step(x, y))
    if "pyprune-sliced" in cfg.backends and _runs("pyprune-sliced", model_name):
        sliced_mutator, sliced_model = _second_supernet(cfg, model_name)
        sliced = Runner.sliced(sliced_model)
        steps["pyprune-sliced"] = lambda i: (sliced_mutator.set_choices(subnets[i]), sliced.train_step(x, y))

    if "pyprune-batched" in cfg.backends:
        batched = BatchedRunner(model, dynamic_backend_name())
        steps["pyprune-batched"] = lambda i: (mutator.set_choices(subnets[i]), batched.train_step(x, y))
    if cfg.device.type == "cuda" and "pyprune-graph" in cfg.backends:
        graph_runner = GraphRunner(model, mutator, dynamic_backend_name(), cache_size=len(subnets))
        steps["pyprune-graph"] = lambda i: (mutator.set_choices(subnets[i]), graph_runner.train_step(x, y))
    if cfg.device.type == "cuda" and "dense-graph" in cfg.backends:
        dense_graphs = [GraphRunner(m, None, "torch") for m in dense_models]
        steps["dense-graph"] = lambda i: dense_graphs[i].train_step(x, y)

    order = [name for name in SWITCH_BACKENDS + GRAPH_BACKENDS + OPTIONAL_BACKENDS if name in steps]
    times = _time_switch_passes(cfg, {name: steps[name] for name in order}, len(subnets))
    rows = []
    for name in SWITCH_BACKENDS + GRAPH_BACKENDS + OPTIONAL_BACKENDS:
        if name in steps:
            rows.append(_result_row(cfg, model_name, batch, "switch", name, "switch",
                                    Measurement(times_s=times[name], inner=len(subnets))))
        elif name in cfg.backends:
            rows.append(_result_row(cfg, model_name, batch, "switch", name, "switch", None,
                                    _skip_reason(name, model_name)))
    return rows


def _time_switch_passes(cfg: ModelBenchConfig, steps: Dict[str, Callable[[int], None]],
                        count: int) -> Dict[str, List[float]]:
    """Per backend, ``cfg.switch_passes`` times of one step (each the mean over a pass of ``count`` steps, one on
    every subnet in turn). The passes go round the backends one at a time (load from other processes hits them
    alike, as in :func:`_time_cell`), each after one untimed step of the same backend; a warm-up pass over every
    subnet comes first. ``cfg.clock`` picks wall or calling-thread CPU time."""
    position = {name: 0 for name in steps}

    def run(name: str, n: int) -> None:
        for _ in range(n):
            steps[name](position[name] % count)
            position[name] += 1

    times: Dict[str, List[float]] = {name: [] for name in steps}
    for name in steps:
        run(name, count)
    for _ in range(cfg.switch_passes):
        for name in steps:
            run(name, 1)
            synchronize(cfg.device)
            clock = time.thread_time if cfg.clock == "thread" else time.perf_counter
            start = clock()
            run(name, count)
            synchronize(cfg.device)
            times[name].append((clock() - start) / count)
    return times


def _second_supernet(cfg: ModelBenchConfig, model_name: str):
    """(mutator, model): a second prepared copy of the supernet, same seed (a prepared mutator cannot be
    deep-copied)."""
    torch.manual_seed(cfg.seed)
    model = build_supernet(model_name, cfg.image_size)
    mutator = prepare_named(model, model_name, cfg)
    return mutator, model.to(cfg.device)


def _compact_switch_runner(cfg: ModelBenchConfig, model_name: str):
    """(mutator, compact runner) on a second copy of the supernet."""
    mutator, model = _second_supernet(cfg, model_name)
    return mutator, Runner.compact(model)


def _set_paused(runner: Runner, mutator, choices) -> None:
    """A subnet change in compact mode: full tensors while the units choose, then compact again."""
    with runner.session.paused():
        mutator.set_choices(choices)


def _unit_prefix_counts(mutator) -> Dict[str, int]:
    """Active channel count per unit; sequential units keep a prefix (of every block, for units with ``groups``),
    which is checked here."""
    counts = {}
    for unit in mutator.units:
        count = unit.active_channels
        expected = prefix_index(count, unit.num_channels, unit.groups, torch.device("cpu"))
        if not torch.equal(unit.current_index.cpu(), torch.arange(count) if expected is None else expected):
            raise AssertionError(f"unit {unit.name}: expected a prefix selection from a sequential unit")
        counts[unit.name] = count
    return counts


# -------------------------------------------------------------------------------------------------------------- run
def run(cfg: ModelBenchConfig, progress_factory: Callable) -> List[Dict[str, object]]:
    """The whole grid; ``progress_factory(total, desc)`` returns a callable advancing a progress bar by n."""
    check_clock(cfg)
    total = sum(len(WORKLOADS) * len(_backends_for(cfg, m, r, b))
                for m in cfg.models for r in cfg.ratios for b in cfg.batch_sizes)
    rows = []
    bar, advance = progress_factory(total, "models")
    try:
        for model_name in cfg.models:
            bar.set_postfix_str(model_name)
            rows += bench_fixed_ratios(cfg, model_name, advance)
            for batch in cfg.batch_sizes:
                rows += bench_switch(cfg, model_name, batch)
    finally:
        bar.close()
    _fill_vs_dense(rows)
    return rows


# ---------------------------------------------------------------------------------------------------------- targets
def evaluate_targets(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """pyprune's speed targets against the exported dense model and the mmrazor-style reference (benchmarks/
    RESULTS.md), each with the numbers behind met / missed (absent data: "n/a")."""
    ok = [r for r in rows if r["status"] == "ok"]
    dyn = "pyprune-ext" if any(r["backend"] == "pyprune-ext" for r in ok) else "pyprune-torch"

    def pick(**where):
        return [r for r in ok if all(r[k] == v for k, v in where.items())]

    targets = []
    train50 = pick(model="resnet50", ratio=0.5, workload="train", backend=dyn)
    worst = max(train50, key=lambda r: r["vs_dense"], default=None)
    targets.append(_target("train step <= 1.25x exported dense (ResNet-50, 50 %)", dyn,
                           None if worst is None else worst["vs_dense"] <= 1.25,
                           "" if worst is None else f"worst {worst['vs_dense']:.2f}x (batch {worst['batch']})"))

    compact_train = pick(workload="train", backend="pyprune-compact")
    worst = max(compact_train, key=lambda r: r["vs_dense"], default=None)
    targets.append(_target("compact train step <= 1.03x exported dense (every model / batch / ratio)",
                           "pyprune-compact", None if worst is None else worst["vs_dense"] <= 1.03,
                           "" if worst is None else f"worst {worst['vs_dense']:.2f}x at {worst['model']} "
                                                    f"b{worst['batch']} r{worst['ratio']}"))

    llama = pick(model="llama", ratio=0.5, workload="train", backend="pyprune-compact")
    worst = max(llama, key=lambda r: r["vs_dense"], default=None)
    targets.append(_target("compact train step <= 1.05x exported (Llama, 50 %)", "pyprune-compact",
                           None if worst is None else worst["vs_dense"] <= 1.05,
                           "" if worst is None else f"worst {worst['vs_dense']:.2f}x (batch {worst['batch']})"))

    speedups = []
    for ref in pick(backend="mmrazor-ref"):
        ours = pick(model=ref["model"], batch=ref["batch"], ratio=ref["ratio"], workload=ref["workload"], backend=dyn)
        if ours:
            speedups.append((ref["median_ms"] / ours[0]["median_ms"], ref))
    small = [s for s, r in speedups if r["model"] == "resnet18" and r["batch"] == 8 and r["workload"] != "eval"]
    targets.append(_target(">= 2x faster than mmrazor-ref (ResNet-18, batch 8, train + switch)", dyn,
                           None if not small else min(small) >= 2.0,
                           "" if not small else f"min {min(small):.2f}x, max {max(small):.2f}x"))
    slowest = min(speedups, key=lambda s: s[0], default=None)
    targets.append(_target("never slower than mmrazor-ref (every row)", dyn,
                           None if slowest is None else slowest[0] >= 1.0,
                           "" if slowest is None else
                           f"min speedup {slowest[0]:.2f}x at {slowest[1]['model']} b{slowest[1]['batch']} "
                           f"r{slowest[1]['ratio']} {slowest[1]['workload']}"))

    # the kept-slice optimizer on a new subnet every step, against the exported subnets and mmrazor-ref, same run
    for model in ("resnet18", "resnet50"):
        sliced = pick(model=model, batch=8, workload="switch", backend="pyprune-sliced")
        ref = pick(model=model, batch=8, workload="switch", backend="mmrazor-ref")
        met, numbers = None, ""
        if sliced and ref:
            speedup = ref[0]["median_ms"] / sliced[0]["median_ms"]
            met = sliced[0]["vs_dense"] <= 1.3 and speedup >= 1.25
            numbers = f"{sliced[0]['vs_dense']:.2f}x dense, {speedup:.2f}x faster than mmrazor-ref"
        targets.append(_target(f"switch step <= 1.3x exported and >= 1.25x faster than mmrazor-ref ({model}, "
                               f"batch 8)", "pyprune-sliced", met, numbers))

    evals = pick(workload="eval", backend=dyn)
    worst_eval = max(evals, key=lambda r: r["vs_dense"], default=None)
    targets.append(_target("eval forward <= 1.05x exported dense (every model / batch / ratio)", dyn,
                           None if worst_eval is None else worst_eval["vs_dense"] <= 1.05,
                           "" if worst_eval is None else
                           f"worst {worst_eval['vs_dense']:.2f}x at {worst_eval['model']} b{worst_eval['batch']} "
                           f"r{worst_eval['ratio']}"))
    return targets


def _target(name: str, backend: str, met: Optional[bool], numbers: str) -> Dict[str, object]:
    return {"target": name, "backend": backend, "result": "n/a" if met is None else ("met" if met else "MISSED"),
            "numbers": numbers or "no data in this run"}


MODEL_COLUMNS = ("model", "batch", "image_size", "ratio", "workload", "backend", "median_ms", "vs_dense",
                 "syncs_per_step", "status")
TARGET_COLUMNS = ("target", "backend", "result", "numbers")


def is_finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0
