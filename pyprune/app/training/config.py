"""The options of one ``pyprune prune`` job as a typed, checked value: :class:`JobConfig`.

The command line's parsed namespace becomes a ``JobConfig`` in one place (:meth:`JobConfig.from_arguments`); the
job reads ``config.x`` and nothing else. Construction fills the defaults that depend on other options (``--quick``,
``--data``, a budget) and refuses inconsistent or impossible options with one ``ConfigError`` line naming the
option; it reads the environment (paths, CUDA, ``WORLD_SIZE``) but writes nothing. :meth:`from_arguments` also
creates the output directory and proves it writable.
"""
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from ...errors import ConfigError
from .run_dir import CHECKPOINT_FILE

DEFAULT_MODEL = "small_resnet"  # the built-in model (pyprune.app.training.models)
# Language models (task 'lm', pyprune.app.training.lm): trained from scratch on the standard library's source.
LANGUAGE_MODELS = ("tiny-llama",)
DEFAULT_LR = {"classification": 0.1, "lm": 3e-3}  # SGD (momentum 0.9) / AdamW
# Counts a job takes when not given: full runs, and the seconds-long ``--quick`` smoke run.
DEFAULTS = dict(epochs=4, finetune_epochs=3, prune_times=4, train_samples=5000, val_samples=1000, batch_size=64)
QUICK = dict(epochs=1, finetune_epochs=1, prune_times=2, step_freq=3, train_samples=256, val_samples=64,
             batch_size=32, image_size=16)
DEFAULT_TARGET_RATIO = 0.5
DEFAULT_UNIT_TYPE = "L1MutableChannelUnit"
ACTIVATION_UNIT = "ActivationMutableChannelUnit"  # scored from calibration batches before each pruning step
DEFAULT_CALIBRATION_BATCHES = 8
# The pruning algorithms of the job: ItePruneAlgorithm's schedule (--prune-times steps of --step-freq iterations) or
# GroupFisher (one channel every --gf-interval iterations until the budget is met).
ALGORITHMS = ("ite", "group-fisher")
GROUP_FISHER_UNIT = "GroupFisherChannelUnit"
GROUP_FISHER_DEFAULTS = dict(gf_interval=10, gf_normalization="act")  # act: as mmrazor's published configs
GROUP_FISHER_NORMALIZATIONS = ("flops", "act")
DEFAULT_GROUP_FISHER_FLOPS = 0.5  # group-fisher without a budget: half the full model's FLOPs
# Options whose values must be the same when a run is resumed (the checkpoint stores them as its signature).
RESUME_KEYS = ("model", "data", "target_ratio", "target_flops", "target_params", "target_latency", "allocation",
               "floor", "prune_times", "step_freq", "unit_type", "epochs",
               "finetune_epochs", "batch_size", "image_size", "seed", "lr", "weight_decay", "train_samples",
               "val_samples", "amp", "channels_last", "algorithm", "gf_interval", "gf_normalization",
               "gf_mutate_linear", "calibration_batches")
# What a checkpoint written before a key was in RESUME_KEYS had for it (such a run was an ite run).
RESUME_KEY_DEFAULTS = {"algorithm": "ite", "gf_interval": None, "gf_normalization": None, "gf_mutate_linear": False,
                       "calibration_batches": None, "floor": None}
BUDGET_METRICS = ("flops", "params", "latency")
# How a budget is spread over the units when --allocation is not given: uniform, because in the benchmark
# (benchmarks/RESULTS.md, "Pruning algorithms at 50 % FLOPs") global allocation did not beat it (docs/BUDGETS.md).
DEFAULT_ALLOCATION = "uniform"


@dataclass(frozen=True)
class JobConfig:
    """Every option of ``pyprune prune`` (``pyprune prune --help`` describes each), after defaults.

    Counts given as ``None`` take :data:`QUICK` (with ``quick``) or :data:`DEFAULTS`; ``image_size`` defaults to 224
    with ``data`` and 32 on the synthetic set; ``target_ratio`` to 0.5 unless a ``target_flops`` /
    ``target_params`` / ``target_latency`` budget is given; ``resume='auto'`` means ``output_dir/checkpoint.pt``.
    ``algorithm='group-fisher'`` takes a FLOPs / params budget (default ``target_flops=0.5``), its own unit type,
    ``gf_interval`` 10 and ``gf_normalization`` ``'act'``, and no ite schedule (``prune_times`` / ``step_freq`` stay
    None).
    ``argv``: the command line as typed (for ``summary.json``).
    """
    model: str = DEFAULT_MODEL
    data: Optional[str] = None                 # ImageFolder root; None: the synthetic shapes
    target_ratio: Optional[float] = None       # kept channel fraction per unit, (0, 1]
    target_flops: Optional[float] = None       # budget: a fraction (0, 1] of the full model's or a count
    target_params: Optional[float] = None
    target_latency: Optional[float] = None
    allocation: Optional[str] = None           # 'uniform' | 'global' (a budget only); None: DEFAULT_ALLOCATION
    floor: Optional[Union[str, float]] = None  # fewest channels per unit, 'auto' or a fraction (a budget only); None: auto
    prune_times: Optional[int] = None
    step_freq: Optional[int] = None            # None: one epoch of iterations between pruning steps
    unit_type: Optional[str] = None            # None: L1MutableChannelUnit (ite), GroupFisherChannelUnit
    epochs: Optional[int] = None
    finetune_epochs: Optional[int] = None
    lr: Optional[float] = None                 # None: DEFAULT_LR of the task
    weight_decay: float = 5e-4
    batch_size: Optional[int] = None
    image_size: Optional[int] = None
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    workers: int = 0
    device: str = "auto"
    output_dir: str = "pyprune_output"
    overwrite: bool = False
    seed: int = 0
    resume: Optional[str] = None
    threads: Optional[int] = None
    max_iterations: Optional[int] = None
    quick: bool = False
    no_progress: bool = False
    no_compact: bool = False
    cuda_graphs: bool = False
    amp: Optional[str] = None                  # None | 'bf16' | 'fp16'
    channels_last: bool = False
    algorithm: str = "ite"                     # 'ite' | 'group-fisher' (ALGORITHMS)
    gf_interval: Optional[int] = None          # group-fisher: iterations between two channel removals
    gf_normalization: Optional[str] = None     # group-fisher: 'flops' | 'act'
    gf_mutate_linear: bool = False             # group-fisher: also prune channels that feed a linear layer
    calibration_batches: Optional[int] = None  # activation units: training batches scored before each step
    argv: Tuple[str, ...] = ()

    def __post_init__(self):
        self._check_algorithm()  # first: it reads which options were given, before the presets fill them
        presets = dict(DEFAULTS, **(QUICK if self.quick else {}))
        if self.group_fisher:  # no ite schedule
            presets = {k: v for k, v in presets.items() if k not in ("prune_times", "step_freq")}
        for key, value in presets.items():
            if getattr(self, key) is None:
                self._set(key, value)
        if self.image_size is None:
            self._set("image_size", 224 if self.data else 32)
        budget = [f"--target-{k}" for k in BUDGET_METRICS if getattr(self, f"target_{k}") is not None]
        if budget and self.target_ratio is not None:
            raise ConfigError(f"--target-ratio and {' / '.join(budget)} are alternatives: give one of them")
        if self.allocation is not None and not budget:
            raise ConfigError("--allocation needs a budget: --target-flops, --target-params or --target-latency")
        if self.floor is not None and not budget:
            raise ConfigError("--floor needs a budget: --target-flops, --target-params or --target-latency")
        if self.floor is not None and self.floor != "auto" and (
                isinstance(self.floor, bool) or not isinstance(self.floor, (int, float))
                or not 0.0 < self.floor <= 1.0):
            raise ConfigError(f"--floor must be 'auto' or a fraction in (0, 1] of each unit's channels, got "
                              f"{self.floor!r}")
        if not budget and self.target_ratio is None:
            if self.group_fisher:
                self._set("target_flops", DEFAULT_GROUP_FISHER_FLOPS)
            else:
                self._set("target_ratio", DEFAULT_TARGET_RATIO)
        self._set("argv", tuple(self.argv))
        self._check_model()
        self._check_calibration()
        if self.lr is None:
            self._set("lr", DEFAULT_LR[self.task])
        if self.data is not None:
            if not os.path.isdir(self.data):
                raise ConfigError(f"--data {self.data}: no such directory")
            self._set("data", os.path.abspath(self.data))
        if self.cuda_graphs:
            self._check_cuda_graphs()
        if self.amp:
            self._check_amp()
        if self.resume == "auto":
            self._set("resume", os.path.join(self.output_dir, CHECKPOINT_FILE))

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # frozen for the job; filled here once

    @classmethod
    def from_arguments(cls, namespace, argv=()) -> "JobConfig":
        """The config of a parsed ``pyprune prune`` namespace (entries that are no option, e.g. ``command``, are
        ignored); creates ``output_dir`` and proves it writable, then checks that a ``--resume`` file exists.
        Bad input: ``ConfigError`` (one line)."""
        names = {field.name for field in dataclasses.fields(cls)} - {"argv"}
        config = cls(**{key: value for key, value in vars(namespace).items() if key in names}, argv=tuple(argv))
        prepare_output_dir(config.output_dir)
        if config.resume is not None and not os.path.isfile(config.resume):
            raise ConfigError(f"--resume: no checkpoint at {config.resume}")
        return config

    # ------------------------------------------------------------------------------------------------- derived
    @property
    def budget(self) -> Optional[Dict[str, float]]:
        """``{'flops': ..., 'params': ..., 'latency': ...}`` (the limits given), or None: prune to the ratio."""
        limits = {k: getattr(self, f"target_{k}") for k in BUDGET_METRICS}
        return {k: v for k, v in limits.items() if v is not None} or None

    @property
    def group_fisher(self) -> bool:
        return self.algorithm == "group-fisher"

    @property
    def task(self) -> str:
        """``'lm'`` for a language model (:data:`LANGUAGE_MODELS`), else ``'classification'``."""
        return "lm" if self.model in LANGUAGE_MODELS else "classification"

    @property
    def compact(self) -> bool:
        """Pruned layers train compact between pruning steps and while finetuning (unless ``--no-compact``)."""
        return not self.no_compact

    def target_text(self) -> str:
        """The target in words, e.g. ``kept ratio 0.5`` or ``budget flops 50% (uniform allocation)``."""
        budget = self.budget
        if budget is None:
            return f"kept ratio {self.target_ratio}"
        limits = ", ".join(f"{k} {v:.0%}" if v <= 1 else f"{k} {v:,.0f}" for k, v in budget.items())
        if self.group_fisher:
            return f"budget {limits}"
        return f"budget {limits} ({self.allocation or DEFAULT_ALLOCATION} allocation)"

    def algorithm_text(self) -> str:
        """The algorithm in words, e.g. ``ite`` or ``group-fisher (interval 10, act normalization)``."""
        if not self.group_fisher:
            return self.algorithm
        linear = ", linear inputs pruned" if self.gf_mutate_linear else ""
        return f"group-fisher (interval {self.gf_interval}, {self.gf_normalization} normalization{linear})"

    def resume_signature(self) -> Dict[str, Any]:
        """The values of :data:`RESUME_KEYS`: a checkpoint is resumed only by a job with the same ones."""
        return {key: getattr(self, key) for key in RESUME_KEYS}

    # -------------------------------------------------------------------------------------------------- checks
    def _check_algorithm(self) -> None:
        """The algorithm and the options that belong to it; fills the unit type and GroupFisher's defaults."""
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"--algorithm {self.algorithm!r}: choose from {', '.join(ALGORITHMS)}")
        if not self.group_fisher:
            given = [option for option, value in (("--gf-interval", self.gf_interval),
                                                  ("--gf-normalization", self.gf_normalization),
                                                  ("--gf-mutate-linear", self.gf_mutate_linear))
                     if value not in (None, False)]
            if given:
                raise ConfigError(f"{given[0]} needs --algorithm group-fisher (--algorithm is {self.algorithm})")
            if self.unit_type is None:
                self._set("unit_type", DEFAULT_UNIT_TYPE)
            return
        interval = self.gf_interval
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ConfigError(f"--gf-interval must be an integer >= 1, got {interval!r}")
        if self.gf_normalization is not None and self.gf_normalization not in GROUP_FISHER_NORMALIZATIONS:
            raise ConfigError(f"--gf-normalization must be one of {', '.join(GROUP_FISHER_NORMALIZATIONS)}, got "
                              f"{self.gf_normalization!r}")
        schedule = "GroupFisher removes one channel every --gf-interval iterations until the budget is met"
        conflicts = (
            ("--target-ratio", self.target_ratio is not None,
             "GroupFisher prunes to a FLOPs / params budget (--target-flops / --target-params)"),
            ("--target-latency", self.target_latency is not None,
             "GroupFisher prunes against counted FLOPs / params, not measured latency"),
            ("--allocation", self.allocation is not None,
             "GroupFisher ranks the channels of all units together (an allocation of its own)"),
            ("--floor", self.floor is not None, "GroupFisher prunes one channel at a time down to the units' minimum"),
            ("--prune-times", self.prune_times is not None, schedule),
            ("--step-freq", self.step_freq is not None, schedule),
            ("--unit-type", self.unit_type not in (None, GROUP_FISHER_UNIT),
             f"GroupFisher measures importance with its own {GROUP_FISHER_UNIT}"),
            ("--cuda-graphs", self.cuda_graphs,
             "its importance needs hooks on every forward and backward, which a replayed graph does not run"),
            ("--amp fp16", self.amp == "fp16",
             "the activation gradients its Fisher information comes from are loss-scaled; use --amp bf16"),
        )
        for option, given, reason in conflicts:
            if given:
                raise ConfigError(f"{option} and --algorithm group-fisher cannot be combined: {reason}")
        self._set("unit_type", GROUP_FISHER_UNIT)
        for key, value in GROUP_FISHER_DEFAULTS.items():
            if getattr(self, key) is None:
                self._set(key, value)

    def _check_calibration(self) -> None:
        """``calibration_batches`` belongs to the activation unit type (default 8 there)."""
        count = self.calibration_batches
        if self.unit_type != ACTIVATION_UNIT:
            if count is not None:
                raise ConfigError(f"--calibration-batches needs --unit-type activation (the unit type is "
                                  f"{self.unit_type})")
            return
        if count is None:
            self._set("calibration_batches", DEFAULT_CALIBRATION_BATCHES)
        elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"--calibration-batches must be an integer >= 1, got {count!r}")

    def _check_model(self) -> None:
        from .models import classification_model_names
        if self.task == "lm":
            self._check_language_model()
        elif self.model not in classification_model_names():
            raise ConfigError(f"unknown model {self.model!r}: use {DEFAULT_MODEL!r}, a language model "
                              f"({', '.join(LANGUAGE_MODELS)}) or a torchvision classification model name (e.g. "
                              f"resnet18, mobilenet_v3_small)")

    def _check_language_model(self) -> None:
        """A language model trains on token blocks of the built-in text corpus: image options do not apply."""
        for option, given in (("--data", self.data is not None), ("--channels-last", self.channels_last),
                              ("--cuda-graphs", self.cuda_graphs)):
            if given:
                raise ConfigError(f"{option} does not apply to the language model {self.model!r} (it trains on "
                                  f"token blocks of the Python standard library's source)")

    def _on_cuda(self) -> bool:
        import torch
        return self.device.startswith("cuda") or (self.device == "auto" and torch.cuda.is_available())

    def _check_cuda_graphs(self) -> None:
        """A CUDA device, one process, gather mode (compact training swaps the tensors a graph reads), eager
        precision and layout (the captured steps run without autocast or a channels_last batch)."""
        if not self.no_compact:
            raise ConfigError("--cuda-graphs needs --no-compact: compact training swaps the tensors a captured graph "
                              "reads")
        if not self._on_cuda():
            raise ConfigError(f"--cuda-graphs needs a CUDA device (--device {self.device} runs on the CPU here)")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--cuda-graphs runs in one process only (not under torchrun with several ranks)")
        if self.channels_last:
            raise ConfigError("--channels-last and --cuda-graphs cannot be combined yet: the captured steps take the "
                              "batch as it comes")

    def _check_amp(self) -> None:
        """fp16 needs CUDA (its GradScaler and kernels); neither precision is captured into --cuda-graphs steps."""
        if self.cuda_graphs:
            raise ConfigError("--amp and --cuda-graphs cannot be combined yet: the captured steps run without "
                              "autocast")
        if self.amp == "fp16" and not self._on_cuda():
            raise ConfigError(f"--amp fp16 needs a CUDA device (--device {self.device} runs on the CPU here); use "
                              f"--amp bf16 on the CPU")


def prepare_output_dir(path: str) -> None:
    """Create ``path`` if needed and prove it is writable (a probe file is written and removed)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--output-dir {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"--output-dir {path}: not writable ({error.strerror or error})") from None


__all__ = ["JobConfig", "DEFAULTS", "QUICK", "RESUME_KEYS", "RESUME_KEY_DEFAULTS", "ALGORITHMS",
           "GROUP_FISHER_DEFAULTS", "prepare_output_dir"]
