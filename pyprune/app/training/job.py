"""The main job behind ``pyprune prune``: train -> iterative pruning -> finetune -> export -> reload and verify.

Phases run on one stream of training iterations ``g`` (epoch ``g // N``, batch ``g % N``; ``N`` batches per epoch):
pretraining ``[0, E*N)``, pruning ``[E*N, P)``, finetuning ``F*N`` more. With ``--algorithm ite`` pruning is
``T`` steps of ``f`` iterations (``P = E*N + T*f``, an ItePruneAlgorithm step at the end of each interval's first
iteration); with ``--algorithm group-fisher`` a GroupFisherAlgorithm removes one channel every ``interval``
iterations, and ``P`` is the iteration after the one whose step met the budget. Everything a resumed run needs is in
``checkpoint.pt`` (weights, optimizer, algorithm, position, metrics, RNG), written at epoch ends and pruning steps.
Only rank 0 writes files, each atomically, while it holds the output directory's lock (:mod:`.run_dir`); the final
files are written to a staging folder, reloaded and verified, then moved in, and ``summary.json``, written last,
marks a complete run. A full disk stops the job with one line naming the file it could not write; the previous
checkpoint is untouched, so ``--resume`` continues once there is space.

The job reads its options from a :class:`.config.JobConfig` and trains through one :class:`.step.TrainStep`.
"""
import contextlib
import hashlib
import io
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ...algorithms import GroupFisherAlgorithm, ItePruneAlgorithm
from ...algorithms.group_fisher import FIX_SUBNET_FILE
from ...budget import full_width_export
from ..data.loaders import batches_per_epoch, build_datasets, make_train_loader
from ...mutators import ChannelMutator, GroupFisherChannelMutator, count_flops, count_params
from ...mutators.io import STRUCTURE_FILE, WEIGHTS_FILE, save_pruned
from ...ops.compact import rebuild_ddp
from ...tracing.example_inputs import as_call_args
from ...units.calibration import calibrate
from ...utils.files import DiskFullError, atomic_torch_save, fsync_directory, replace_durably
from .config import DEFAULT_ALLOCATION, RESUME_KEY_DEFAULTS, JobConfig
from .distributed import (DistributedContext, all_ranks_agree, broadcast_buffers, configure_threads,
                          setup_distributed, teardown_distributed)
from .loop import cosine_lr, evaluate, set_lr
from .models import build_model
from .pruned_run import load_pruned_run
from .report import plot_metrics, pruned_key, table_header, table_row, write_csv, write_json
from .run_dir import (CHECKPOINT_FILE, STAGING_PREFIX, SUMMARY_FILE, CheckpointError, RunDirectoryLock, check_start,
                      load_checkpoint, remove_leftovers, unmark_finished)
from .step import TrainStep

METRICS_CSV, METRICS_JSON, PLOT_FILE = "metrics.csv", "metrics.json", "pruning_curve.png"
PRUNE_LR_FRACTION = 0.1  # pruning and finetuning run at a tenth of the pretraining learning rate
# group-fisher: metrics rows while pruning, one each time another quarter of the way to the budget is done (the run
# may take hundreds of one-channel steps; each row exports the model and evaluates it)
GROUP_FISHER_ROWS = 4


class Run:
    """One ``pyprune prune`` run on one rank (all ranks build the same objects; rank 0 also writes)."""

    def __init__(self, config: JobConfig, context: DistributedContext):
        self.config, self.context, self.device = config, context, context.device
        self.start_time = time.perf_counter()
        self.out = Path(config.output_dir)
        torch.manual_seed(config.seed)
        self.train_set, self.val_set, self.num_classes = self.build_data()
        self.loader = make_train_loader(self.train_set, config.batch_size, config.seed, context.rank,
                                        context.world_size, config.workers)
        self.batches = batches_per_epoch(self.loader)
        self.step_freq = config.step_freq or self.batches
        self.input_shape = self.example_input()  # what the tracer runs and FLOPs are counted on

        self.model = build_model(config.model, self.num_classes).to(self.device)
        if config.channels_last:  # (the DynamicOps share these parameters, layout included)
            self.model = self.model.to(memory_format=torch.channels_last)
        parse_cfg = dict(type="ChannelAnalyzer", demo_input=self.input_shape)
        if config.group_fisher:  # mmrazor's GroupFisher units: number choices, one channel per step
            self.mutator = GroupFisherChannelMutator(channel_unit_cfg=dict(type=config.unit_type, default_args=dict(
                normalization_type=config.gf_normalization, mutate_linear=config.gf_mutate_linear)),
                parse_cfg=parse_cfg)
        else:
            self.mutator = ChannelMutator(channel_unit_cfg=dict(type=config.unit_type, default_args=dict(
                choice_mode="ratio")), parse_cfg=parse_cfg)
        self.mutator.prepare_from_supernet(self.model)
        full = full_width_export(self.model)  # the unpruned model, for "kept" fractions (before compact mode)
        self.wrapped: nn.Module = self.model
        if context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        budget = config.budget
        if config.group_fisher:
            self.example = as_call_args(self.input_shape, self.device)  # its channel costs and the budget's FLOPs
            self.algorithm = GroupFisherAlgorithm(self.wrapped, self.mutator, interval=config.gf_interval,
                                                  budget=budget, example_inputs=self.example)
            self.mutator.end_record_info()  # its hooks record in the pruning phase only (see record_fisher)
        else:
            self.algorithm = ItePruneAlgorithm(self.wrapped, self.mutator, None if budget else config.target_ratio,
                                               step_freq=self.step_freq, prune_times=config.prune_times,
                                               budget=budget, budget_cfg=self.budget_cfg() if budget else None)
        self.calibration = self.calibration_batches()
        self.optimizer = self.make_optimizer()
        if config.compact:  # pruned layers train compact between steps and in finetuning
            self.algorithm.start_compact_training(self.optimizer)
        self.step = TrainStep(self.wrapped, self.optimizer, **self.step_functions(), amp=config.amp,
                              channels_last=config.channels_last,
                              cuda_graphs=config.cuda_graphs, mutator=self.mutator, device_type=self.device.type)
        self.pre_end = config.epochs * self.batches
        self.finetune_length = config.finetune_epochs * self.batches
        if config.group_fisher:  # known once the budget is met (at once when the full model meets it)
            self.prune_end: Optional[int] = self.pre_end if self.algorithm.done else None
            # an upper bound on the pruning phase: every step that prunes removes at least one channel
            self.prune_limit = config.gf_interval * (1 + sum(u.num_channels for u in self.mutator.mutable_units))
        else:
            self.prune_end = self.pre_end + config.prune_times * self.step_freq
            self.example = as_call_args(self.input_shape, self.device)  # what FLOPs are counted on
        self.full_params, self.full_flops = count_params(full), count_flops(full, self.example)
        self.position, self.rows, self.pending = 0, [], None  # pending: the open pruning step's row
        self.elapsed_before = 0.0                             # wall time of earlier (resumed) sessions

    # -------------------------------------------------------------------------------------------------- task
    # What depends on the task: image classification here; a language model overrides these (.lm).
    metric = "accuracy"  # the validation metric of the rows and the summary

    def build_data(self):
        """``(train_set, val_set, num_classes)``; items are ``(input, target)``."""
        config = self.config
        return build_datasets(config.data, config.image_size, config.seed, config.train_samples,
                              config.val_samples)

    def example_input(self):
        """One sample's input as a ``demo_input`` (here a shape: a random image)."""
        return (1, 3, self.config.image_size, self.config.image_size)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.wrapped.parameters(), lr=self.config.lr, momentum=0.9, nesterov=True,
                               weight_decay=self.config.weight_decay)

    def step_functions(self) -> Dict[str, Any]:
        """Keyword arguments of :class:`.step.TrainStep` (``loss_fn``, ``forward``); none: cross-entropy of
        ``model(input)``."""
        return {}

    def score(self, model: Optional[nn.Module] = None) -> float:
        """The validation :attr:`metric` of ``model`` (default: the pruned dynamic model)."""
        return self.accuracy(model)

    def model_info(self) -> Dict[str, Any]:
        """What ``structure.json`` stores to rebuild the model (:func:`.pruned_run.load_pruned_run`)."""
        return {"name": self.config.model, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "unit_type": self.config.unit_type}

    task_outputs: Tuple[str, ...] = ()  # outputs besides the model files and metrics (verified in staging)

    def task_summary(self) -> Dict[str, Any]:
        """Entries ``summary.json`` adds for the task (none here)."""
        return {}

    def result_line(self, summary: Dict[str, Any]) -> str:
        """The last line the job prints."""
        return (f"accuracy {summary['accuracy_pretrained']:.1%} -> {summary['accuracy_final']:.1%} "
                f"(exported {summary['accuracy_exported']:.1%}); params {summary['params_kept']:.1%} and "
                f"FLOPs {summary['flops_kept']:.1%} of the original; {summary['wall_s']:.0f} s; outputs in "
                f"{self.out}")

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def main(self) -> bool:
        return self.context.is_main

    @property
    def total(self) -> Optional[int]:
        """Iterations of the whole run; None while a group-fisher run has not met its budget yet."""
        return None if self.prune_end is None else self.prune_end + self.finetune_length

    @property
    def prune_steps(self) -> int:
        """Pruning steps taken so far (group-fisher: channel removals)."""
        if self.config.group_fisher:
            return self.algorithm.channels_pruned
        return self.algorithm.steps_done

    def pruning(self, g: int) -> bool:
        return g >= self.pre_end and (self.prune_end is None or g < self.prune_end)

    def wall(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def print(self, text: str) -> None:
        if self.main:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def accuracy(self, model: Optional[nn.Module] = None) -> float:
        broadcast_buffers(self.model)  # every rank scores the same model (rank 0's BN statistics)
        return evaluate(model or self.model, self.val_set, max(self.config.batch_size, 256), self.device,
                        self.context.rank, self.context.world_size)

    def size(self) -> Dict[str, Any]:
        exported = self.mutator.export(self.model)
        params, flops = count_params(exported), count_flops(exported, self.example)
        return {"params": params, "params_kept": params / self.full_params, "flops": flops,
                "flops_kept": flops / self.full_flops}

    def kept_ratio(self, step: int) -> float:
        """Kept channel fraction at pruning step ``step``: as scheduled with --target-ratio; with a budget, the
        channels the prunable units keep over their channels."""
        if self.config.target_ratio is not None and not self.config.group_fisher:
            return 1 + (self.config.target_ratio - 1) * step / self.config.prune_times
        units = self.mutator.mutable_units
        return sum(u.active_channels for u in units) / max(1, sum(u.num_channels for u in units))

    def lr_at(self, g: int) -> float:
        lr = self.config.lr
        if g < self.pre_end:
            return cosine_lr(lr, g, self.pre_end)
        if self.pruning(g):
            return lr * PRUNE_LR_FRACTION
        return cosine_lr(lr * PRUNE_LR_FRACTION, g - self.prune_end, self.total - self.prune_end)

    def phase(self, g: int) -> str:
        return "pretrain" if g < self.pre_end else "prune" if self.pruning(g) else "finetune"

    def add_row(self, row: Dict[str, Any]) -> None:
        row.setdefault(pruned_key(self.metric), None)
        row["wall_s"] = round(self.wall(), 2)
        self.rows.append(row)
        if len(self.rows) == 1:
            self.print(f"algorithm {self.config.algorithm_text()}, {self.config.target_text()}")
            self.print(table_header(self.metric))
        self.print(table_row(row, self.metric))

    # ------------------------------------------------------------------------------------------- checkpoints
    def resume_signature(self) -> Dict[str, Any]:
        """The options a checkpoint must have been made with, and the world size."""
        signature = self.config.resume_signature()
        signature["world_size"] = self.context.world_size
        return signature

    def save_checkpoint(self) -> None:
        if not self.main:
            return
        state = {"signature": self.resume_signature(), "position": self.position, "rows": self.rows,
                 "pending": self.pending, "wall_s": self.wall(), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "algorithm": self.algorithm.state_dict(),
                 "scaler": self.step.scaler.state_dict(), "rng": torch.get_rng_state(),
                 "prune_end": self.prune_end}
        if self.config.group_fisher:  # its pruning steps (unit, FLOPs and params after each), for summary.json
            state["group_fisher_history"] = [dict(step) for step in self.algorithm.history]
        atomic_torch_save(state, self.out / CHECKPOINT_FILE)  # a kill mid-write leaves the previous one

    def load_checkpoint(self, path: str) -> None:
        """Load and check ``path`` into this run's objects; changes no file (a failure leaves the directory as
        it was)."""
        state = load_checkpoint(path, map_location=self.device)
        saved = {**RESUME_KEY_DEFAULTS, **state["signature"]}  # a checkpoint older than a key: the key's default
        differing = [f"{key} (checkpoint {saved.get(key)!r}, now {value!r})"
                     for key, value in self.resume_signature().items() if saved.get(key) != value]
        if differing:
            raise ValueError(f"--resume {path}: made with other options: {'; '.join(differing)}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.algorithm.load_state_dict(state["algorithm"])
            if state.get("scaler"):  # fp16 runs: the loss scale goes on where it was
                self.step.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{path} does not fit this run: {reason}") from None
        self.position, self.rows, self.pending = int(state["position"]), list(state["rows"]), state["pending"]
        if self.config.group_fisher:
            end = state.get("prune_end")
            self.prune_end = None if end is None else int(end)
            self.algorithm.history = [dict(step) for step in state.get("group_fisher_history", [])]
        self.elapsed_before = float(state["wall_s"])
        torch.set_rng_state(state["rng"].cpu())
        total = self.total if self.total is not None else "? (pruning until the budget is met)"
        self.print(f"resumed from {path} at iteration {self.position} of {total}")

    # ---------------------------------------------------------------------------------------------- training
    def batch_stream(self, g: int):
        """Batches from global iteration ``g`` on; epoch ``e``'s order depends only on (seed, e)."""
        epoch, offset = divmod(g, self.batches)
        sampler = self.loader.sampler
        while True:
            sampler.set_position(epoch, offset * self.config.batch_size)
            yield from self.loader
            epoch, offset = epoch + 1, 0

    def boundary(self, g: int) -> bool:
        """Bookkeeping when ``g`` iterations are done; returns whether a metrics row was added."""
        if g == self.pre_end and not any(r["phase"] == "pretrained" for r in self.rows):
            self.add_row({"step": 0, "phase": "pretrained", "iteration": g, "kept_ratio": 1.0, **self.size(),
                          self.metric: self.score()})
            return True
        if self.pending is not None and g > self.pre_end and (g - self.pre_end) % self.step_freq == 0:
            row, self.pending = self.pending, None
            self.add_row({**row, self.metric: self.score()})
            return True
        if g == self.total and self.config.finetune_epochs and not any(r["phase"] == "finetuned" for r in self.rows):
            steps = self.prune_steps
            self.add_row({"step": steps, "phase": "finetuned", "iteration": g, "kept_ratio": self.kept_ratio(steps),
                          **self.size(), self.metric: self.score()})
            return True
        return False

    # ---------------------------------------------------------------------------------------------- group-fisher
    def record_fisher(self, on: bool) -> None:
        """GroupFisher's hooks on (the pruning phase) or off (pretraining, finetuning): outside pruning no
        ``after_backward`` collects what they record, and they would only cost time."""
        if on:
            self.mutator.reset_recorded_info()
            self.mutator.start_record_info()
        else:
            self.mutator.end_record_info()

    def budget_progress(self) -> float:
        """How much of the way from the full model to the budget the current subnet has gone, in [0, 1] (the least
        advanced limit when both FLOPs and params are given)."""
        full, now = self.algorithm.full_cost, self.algorithm.cost()
        fractions = [1.0]
        for metric, limit in self.algorithm.limits.items():
            start = getattr(full, metric)
            if start > limit:
                fractions.append(min(1.0, (start - getattr(now, metric)) / (start - limit)))
        return max(0.0, min(fractions))

    def group_fisher_step(self, g: int) -> bool:
        """The end of pruning iteration ``g``: the algorithm's step (one channel every interval), the DDP wrapper
        rebuilt after a removal, a metrics row each quarter of the way, and the switch to finetuning once the budget
        is met. Returns whether a metrics row was added."""
        if self.algorithm.step():
            self.rewrap()
        done = self.algorithm.done
        rows = sum(1 for r in self.rows if r["phase"] == "prune")
        row_due = done or self.budget_progress() >= (rows + 1) / GROUP_FISHER_ROWS
        if row_due and self.prune_steps > (self.rows[-1]["step"] if rows else 0):
            steps = self.prune_steps
            self.add_row({"step": steps, "phase": "prune", "iteration": g + 1, "kept_ratio": self.kept_ratio(steps),
                          **self.size(), self.metric: self.score()})
        if done:
            self.prune_end = g + 1
            self.record_fisher(False)
        elif g + 1 - self.pre_end >= self.prune_limit:
            raise RuntimeError(f"group-fisher did not meet the budget {self.config.target_text()} in "
                               f"{self.prune_limit} pruning iterations ({self.prune_steps} channel steps)")
        return row_due

    # ------------------------------------------------------------------------------------------ activation units
    def budget_cfg(self) -> Dict[str, Any]:
        """The planner options of a budget run: the allocation and the floor per unit ('auto' unless given)."""
        config = self.config
        return dict(allocation=config.allocation or DEFAULT_ALLOCATION,
                    floor="auto" if config.floor is None else config.floor)

    def calibration_batches(self) -> Optional[List[Any]]:
        """The first ``--calibration-batches`` training batches, in order and the same on every rank (so that every
        rank scores the channels alike), for activation units; None for other unit types."""
        count = self.config.calibration_batches
        if count is None:
            return None
        size = self.config.batch_size
        subset = Subset(self.train_set, range(min(len(self.train_set), count * size)))
        return list(DataLoader(subset, batch_size=size, shuffle=False))

    def calibrated_step(self) -> bool:
        """The ite algorithm's step; when it is about to prune, activation units are scored first on the
        calibration batches (the model as it is now: the layers' outputs at the current widths)."""
        if self.calibration is not None and self.algorithm.is_prune_time(self.algorithm.counter):
            batches = [[t.to(self.device) if isinstance(t, torch.Tensor) else t for t in batch]
                       for batch in self.calibration]
            calibrate(self.mutator, self.model, batches)
        return self.algorithm.step()

    def rewrap(self) -> None:
        """After a structure change in compact mode the parameters have new shapes: rebuild DDP on them (every
        rank does so at the same iteration)."""
        if self.algorithm.compact_training and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            self.wrapped = self.step.model = rebuild_ddp(self.wrapped)

    def train(self) -> bool:
        """Run from ``self.position`` to the end; returns False when stopped early by ``--max-iterations``."""
        start = self.position
        limit = self.config.max_iterations
        stop_at = None if not limit else start + limit
        self.boundary(start)
        stream = self.batch_stream(start)
        group_fisher = self.config.group_fisher
        bar = tqdm(total=self.total, initial=start, desc=self.phase(start), unit="it", dynamic_ncols=True,
                   disable=not self.main or self.config.no_progress, mininterval=1.0, file=sys.stderr)
        g = start
        try:  # closed however the loop ends, so that an error line is not printed into the bar
            while (self.total is None or g < self.total) and (stop_at is None or g < stop_at):
                images, labels = next(stream)
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                set_lr(self.optimizer, self.lr_at(g))
                pruning = self.pruning(g)
                if group_fisher and pruning and (g == start or g == self.pre_end):
                    self.record_fisher(True)
                # the step's after_backward() collects the importance; the loss it returns is detached (its graph
                # went with the backward), so no autograd graph is alive at a compact-mode structure change below
                loss = self.step(images, labels, self.algorithm if pruning else None)
                added = False
                if group_fisher and pruning:
                    added = self.group_fisher_step(g)
                    if self.prune_end is not None:
                        bar.total = self.total
                elif pruning and self.calibrated_step():
                    self.rewrap()
                    step = self.algorithm.steps_done
                    self.pending = {"step": step, "phase": "prune", "iteration": g + 1,
                                    "kept_ratio": self.kept_ratio(step),
                                    **self.size(), pruned_key(self.metric): self.score()}
                self.position = g + 1
                last = g + 1 == stop_at or g + 1 == self.total
                bar.update(1)
                if bar.n % 10 == 0 or last:
                    bar.set_description(self.phase(g))
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.lr_at(g):.4f}", refresh=False)
                added = self.boundary(g + 1) or added
                if added or (g + 1) % self.batches == 0 or last:
                    self.save_checkpoint()
                g += 1
        finally:
            bar.close()
        return self.position == self.total

    # ---------------------------------------------------------------------------------------------- finishing
    def finish(self) -> Dict[str, Any]:
        """Export, check all ranks agree, write the outputs (rank 0), reload them and compare."""
        broadcast_buffers(self.model)
        self.model.eval()
        exported = self.mutator.export(self.model).eval()
        agree = all_ranks_agree(self.digest(exported), self.context)
        if not agree:
            raise RuntimeError("the ranks ended with different pruned models")
        exported_accuracy = self.score(exported)
        summary: Dict[str, Any] = {}
        if self.main:
            summary = self.write_outputs(exported, exported_accuracy)
        if self.context.distributed:
            torch.distributed.barrier()
        return summary

    def digest(self, exported: nn.Module) -> str:
        hasher = hashlib.sha256(repr(sorted(self.mutator.current_choices.items())).encode())
        for name, tensor in exported.state_dict().items():
            buffer = io.BytesIO()
            torch.save(tensor.detach().cpu(), buffer)
            hasher.update(name.encode() + buffer.getvalue())
        return hasher.hexdigest()

    def write_outputs(self, exported: nn.Module, exported_accuracy: float) -> Dict[str, Any]:
        config = self.config
        staging = self.out / f"{STAGING_PREFIX}{time.time_ns()}"
        staging.mkdir()
        try:
            save_pruned(staging, self.model, self.mutator, self.model_info(), exported)
            deploy = getattr(self.algorithm, "deploy_config", None)  # the algorithm's own deploy file, if any
            if deploy is not None:
                write_json(deploy(), str(staging / FIX_SUBNET_FILE))
            write_csv(self.rows, str(staging / METRICS_CSV), self.metric)
            write_json(self.rows, str(staging / METRICS_JSON))
            plot_metrics(self.rows, str(staging / PLOT_FILE),
                         f"{config.model}, {config.algorithm}, {config.unit_type}, {config.target_text()}", self.metric)
            difference = self.verify_reload(staging)
            names = (WEIGHTS_FILE, STRUCTURE_FILE, METRICS_CSV, METRICS_JSON, PLOT_FILE) + self.task_outputs
            if deploy is not None:
                names += (FIX_SUBNET_FILE,)
            unmark_finished(self.out)  # the new files are verified: no summary may describe a mix of old and new
            if deploy is None and (self.out / FIX_SUBNET_FILE).exists():
                (self.out / FIX_SUBNET_FILE).unlink()  # an earlier group-fisher run's: not this model's
            for name in names:
                _move_in(staging / name, self.out / name)
        except DiskFullError as error:  # name the output it was for, not the staging copy that is removed now
            if error.path.parent != staging:
                raise
            raise DiskFullError(self.out / error.path.name) from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        first, last = self.rows[0], self.rows[-1]
        summary = {
            "command": " ".join(["pyprune"] + list(config.argv)), "model": config.model,
            "algorithm": config.algorithm, "unit_type": config.unit_type, "target_ratio": config.target_ratio,
            "budget": config.budget, "allocation": config.allocation,
            "floor": config.floor,
            "world_size": self.context.world_size, "device": str(self.device),
            f"{self.metric}_pretrained": first[self.metric], f"{self.metric}_final": last[self.metric],
            f"{self.metric}_exported": exported_accuracy, "params_before": self.full_params,
            "params_after": last["params"],
            "flops_before": self.full_flops, "flops_after": last["flops"], "params_kept": last["params_kept"],
            "flops_kept": last["flops_kept"], "reload_max_abs_diff": difference, "ranks_agree": True,
            "compact_training": self.algorithm.compact_training, "amp": config.amp,
            "channels_last": config.channels_last,
            "wall_s": round(self.wall(), 2), "files": list(names) + [SUMMARY_FILE], **self.task_summary(),
        }
        if config.group_fisher:
            summary["group_fisher"] = self.group_fisher_summary()
        write_json(summary, str(self.out / SUMMARY_FILE))  # atomic, last: its presence marks a complete run
        return summary

    def group_fisher_summary(self) -> Dict[str, Any]:
        """GroupFisher's settings and steps: how many channel removals, the budget in absolute counts, and the
        FLOPs / params before and after the last removal (the budget is met by the step that first reaches it)."""
        history = self.algorithm.history
        before = history[-2] if len(history) > 1 else {"flops": self.algorithm.full_cost.flops,
                                                       "params": self.algorithm.full_cost.params}
        return {"interval": self.config.gf_interval, "normalization": self.config.gf_normalization,
                "mutate_linear": self.config.gf_mutate_linear, "channel_steps": self.algorithm.channels_pruned,
                "budget_met": bool(self.algorithm.limits) and self.budget_progress() >= 1.0,
                "limits": dict(self.algorithm.limits), "prune_end_iteration": self.prune_end,
                "before_last_step": {k: before[k] for k in ("flops", "params")} if history else None,
                "after_last_step": {k: history[-1][k] for k in ("flops", "params")} if history else None}

    @torch.no_grad()
    def verify_reload(self, directory: Path) -> float:
        """Reload the written files into a fresh model and compare its logits with the pruned dynamic model's."""
        reloaded = load_pruned_run(directory, map_location=self.device).to(self.device)
        images = torch.stack([self.val_set[i][0] for i in range(min(16, len(self.val_set)))]).to(self.device)
        return checked_difference(self.model.eval()(images), reloaded(images), "the reloaded pruned model")


def checked_difference(expected: torch.Tensor, got: torch.Tensor, what: str) -> float:
    """Max abs difference of two logit tensors; above 1e-4 of the logits' scale -> RuntimeError naming ``what``."""
    difference = float((expected - got).abs().max())
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise RuntimeError(f"{what} differs from the trained model by {difference:.3g} (tolerance "
                           f"{tolerance:.3g})")
    return difference


def run_prune_job(config: JobConfig) -> Dict[str, Any]:
    """Run the job ``config`` describes; returns the summary (rank 0) or ``{}``.

    Raises ``RunDirectoryError`` before anything is written when the output directory is in use or holds a run
    this command would clobber (:func:`.run_dir.check_start`), and ``DiskFullError`` (one line naming the file and
    saying how to go on) when a write finds no space left: the last checkpoint written is then unchanged.
    """
    context = setup_distributed(config.device)
    threads = configure_threads(config.threads, context.local_world_size)
    # Only rank 0 writes, so only rank 0 locks; every rank checks the directory, so all refuse alike.
    lock = RunDirectoryLock(config.output_dir) if context.is_main else contextlib.nullcontext()
    try:
        with lock:
            check_start(config.output_dir, config.resume, config.overwrite)
            if context.is_main:
                remove_leftovers(config.output_dir)
            return _run(config, context, threads)
    except DiskFullError as error:
        raise DiskFullError(error.path, advice=_after_a_full_disk(error.path, Path(config.output_dir))) from error
    finally:
        teardown_distributed()


def _after_a_full_disk(failed: Path, out: Path) -> str:
    """What to do after writing ``failed`` into ``out`` found the disk full (the failed write left no file)."""
    checkpoint = out / CHECKPOINT_FILE
    if not checkpoint.exists():
        return "no checkpoint was written yet; free space, then run the command again"
    where = "the previous checkpoint is unchanged" if failed == checkpoint else f"{checkpoint} is unchanged"
    return f"nothing is lost ({where}): free space, then continue with --resume"


def run_class(config: JobConfig) -> type:
    """:class:`Run`, or for a language model (``config.task == 'lm'``) :class:`.lm.LanguageModelRun`."""
    if config.task == "lm":
        from .lm import LanguageModelRun  # (it builds on this module)
        return LanguageModelRun
    return Run


def _move_in(source: Path, target: Path) -> None:
    """Move a verified output from staging into the run directory (a folder replaces the old one whole)."""
    if source.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        source.replace(target)
        fsync_directory(target.parent)
    else:
        replace_durably(source, target)


def _run(config: JobConfig, context: DistributedContext, threads: int) -> Dict[str, Any]:
    run = run_class(config)(config, context)
    if config.resume:
        run.load_checkpoint(config.resume)
        run.rewrap()
    schedule = (f"one channel every {config.gf_interval} iterations until met" if config.group_fisher
                else f"in {config.prune_times} steps of {run.step_freq} iterations")
    run.print(f"pyprune prune: {config.model} ({run.full_params:,} params, {run.full_flops:,} FLOPs), algorithm "
              f"{config.algorithm}, {config.unit_type}, {config.target_text()} {schedule}, "
              f"{run.batches} iterations per epoch, world size "
              f"{context.world_size}, device {context.device}, {threads} CPU threads per process, compact "
              f"training {'on' if run.algorithm.compact_training else 'off (--no-compact)'}")
    if run.main and (run.total is None or run.position < run.total):  # the checkpoint is about to change: the
        # old summary goes stale
        unmark_finished(run.out)
    if not run.train():
        run.print(f"stopped after iteration {run.position} of {run.total}; continue with --resume "
                  f"{run.out / CHECKPOINT_FILE}")
        return {"stopped_at": run.position}
    summary = run.finish()
    if run.main:
        run.print(run.result_line(summary))
    return summary
