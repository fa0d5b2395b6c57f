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
from typing import Any, Dict, Optional, Tuple

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
# Options whose values must be the same when a run is resumed (the checkpoint stores them as its signature).
RESUME_KEYS = ("model", "data", "target_ratio", "target_flops", "target_params", "target_latency", "allocation",
               "prune_times", "step_freq", "unit_type", "epochs",
               "finetune_epochs", "batch_size", "image_size", "seed", "lr", "weight_decay", "train_samples",
               "val_samples", "amp", "channels_last")
BUDGET_METRICS = ("flops", "params", "latency")


@dataclass(frozen=True)
class JobConfig:
    """Every option of ``pyprune prune`` (``pyprune prune --help`` describes each), after defaults.

    Counts given as ``None`` take :data:`QUICK` (with ``quick``) or :data:`DEFAULTS`; ``image_size`` defaults to 224
    with ``data`` and 32 on the synthetic set; ``target_ratio`` to 0.5 unless a ``target_flops`` /
    ``target_params`` / ``target_latency`` budget is given; ``resume='auto'`` means ``output_dir/checkpoint.pt``.
    ``argv``: the command line as typed (for ``summary.json``).
    """
    model: str = DEFAULT_MODEL
    data: Optional[str] = None                 # ImageFolder root; None: the synthetic shapes
    target_ratio: Optional[float] = None       # kept channel fraction per unit, (0, 1]
    target_flops: Optional[float] = None       # budget: a fraction (0, 1] of the full model's or a count
    target_params: Optional[float] = None
    target_latency: Optional[float] = None
    allocation: Optional[str] = None           # 'uniform' | 'global' (a budget only); None: uniform
    prune_times: Optional[int] = None
    step_freq: Optional[int] = None            # None: one epoch of iterations between pruning steps
    unit_type: str = "L1MutableChannelUnit"
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
    argv: Tuple[str, ...] = ()

    def __post_init__(self):
        presets = dict(DEFAULTS, **(QUICK if self.quick else {}))
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
        if not budget and self.target_ratio is None:
            self._set("target_ratio", DEFAULT_TARGET_RATIO)
        self._set("argv", tuple(self.argv))
        self._check_model()
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
        return f"budget {limits} ({self.allocation or 'uniform'} allocation)"

    def resume_signature(self) -> Dict[str, Any]:
        """The values of :data:`RESUME_KEYS`: a checkpoint is resumed only by a job with the same ones."""
        return {key: getattr(self, key) for key in RESUME_KEYS}

    # -------------------------------------------------------------------------------------------------- checks
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


__all__ = ["JobConfig", "DEFAULTS", "QUICK", "RESUME_KEYS", "prepare_output_dir"]
