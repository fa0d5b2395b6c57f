"""GroupFisherAlgorithm: prune the globally least important channel every ``interval`` iterations (mmrazor's
GroupFisher), until a FLOPs / parameter budget is met."""
import json
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from ..budget.allocation import meets
from ..budget.cost import Cost, CostModel
from ..budget.targets import Budget
from ..errors import ConfigError
from ..mutators.group_fisher import GroupFisherChannelMutator
from ..mutators.io import save_pruned
from ..registry import MODELS
from ..utils.files import atomic_write_text
from .base import BaseAlgorithm, build_model_and_mutator
from .unit_state import broadcast_selections, distributed_world

DEFAULT_MUTATOR = {"type": "GroupFisherChannelMutator", "channel_unit_cfg": {"type": "GroupFisherChannelUnit"}}
FIX_SUBNET_FILE = "fix_subnet.json"


@MODELS.register_module()
class GroupFisherAlgorithm(BaseAlgorithm):
    """Group Fisher pruning (Liu et al., ICML 2021) from a plain training loop::

        algorithm = GroupFisherAlgorithm(model, interval=10, budget={"flops": 0.5})
        for images, labels in loader:
            loss = criterion(algorithm.model(images), labels)
            optimizer.zero_grad(); loss.backward()
            algorithm.after_backward()    # Fisher information of this batch, summed over ranks
            optimizer.step()
            if algorithm.step():          # every `interval` iterations: one channel less
                ...                       # (compact training under DDP: rebuild the DDP wrapper here)
            if algorithm.done:
                break
        small = algorithm.export()

    Every iteration the units record their channels' mask gradients (forward / gradient hooks on their conv and
    linear layers, :mod:`pyprune.units.group_fisher`); :meth:`after_backward` adds the batch's Fisher information,
    normalised by each channel's cost. At the end of iteration ``counter`` with ``counter % interval == 0``
    (iteration 0 included, as mmrazor's ``RuntimeInfo.iter() % interval == 0``), the channel with the smallest
    normalised Fisher over all units is pruned, the ranks agree on it, and the accumulation starts again. Pruning
    stops once the subnet meets ``budget`` (a step never leaves a cost above the budget once met: the last step is
    the first that reaches it), or when no unit can lose a channel.

    Args:
        architecture: the model (or a config dict building it), as :class:`BaseAlgorithm`.
        mutator: a :class:`~pyprune.mutators.GroupFisherChannelMutator` or its config (mmrazor's keyword; default
            mmrazor's: ``dict(type='GroupFisherChannelMutator',
            channel_unit_cfg=dict(type='GroupFisherChannelUnit'))``).
            ``mutator_cfg`` is accepted as pyprune's other algorithms spell it (give one of the two).
        interval: iterations between two pruned channels (mmrazor's default 10).
        data_preprocessor, init_cfg: mmrazor's; see :class:`BaseAlgorithm`.
        budget: when to stop: ``{'flops': 0.5}``, ``{'params': 2e6}`` or both (fractions of the full model or
            absolute counts; :class:`pyprune.budget.Budget`). None: prune every ``interval`` iterations for as long
            as training runs (mmrazor's behaviour, which leaves the stop to a checkpoint hook).
        example_inputs: the input FLOPs are counted on (default: the mutator's demo input); the same count gives
            the ``'flops'`` normalisation (:meth:`pyprune.budget.CostModel.channel_cost`), so the channel costs and
            the budget are one fact.
        optimizer, compact: as :class:`ItePruneAlgorithm`: given an optimizer, the subnet trains in compact mode
            (the recording hooks work on compact layers; a pruning step runs on full-size tensors). As for every
            structure change in compact mode, no autograd graph may be alive at :meth:`step` (``del loss`` first)
            and a DDP wrapper is rebuilt after a step that returned True.
        work_dir: when given, the deploy files (:meth:`save_deploy`) are written there once the budget is met.
    """

    def __init__(self, architecture, mutator=None, interval: int = 10, data_preprocessor=None,
                 init_cfg: Optional[Dict] = None, *, mutator_cfg=None, budget: Optional[Mapping] = None,
                 example_inputs=None, optimizer=None, compact: bool = True, work_dir: Optional[str] = None):
        if not isinstance(interval, numbers.Integral) or isinstance(interval, bool) or interval < 1:
            raise ConfigError(f"GroupFisherAlgorithm: interval must be an int >= 1, got {interval!r}")
        if mutator is not None and mutator_cfg is not None:
            raise ConfigError("GroupFisherAlgorithm: give mutator (mmrazor's keyword) or mutator_cfg, not both")
        self.budget = None if budget is None else Budget.from_dict(budget)
        if self.budget is not None and self.budget.latency is not None:
            raise ConfigError("GroupFisherAlgorithm: budget 'latency' is not supported (channels are pruned one "
                              "at a time against counted costs); give 'flops' and / or 'params'")
        chosen = mutator if mutator is not None else mutator_cfg
        architecture, built = build_model_and_mutator("GroupFisherAlgorithm", architecture, chosen, DEFAULT_MUTATOR,
                                                      GroupFisherChannelMutator)
        super().__init__(architecture, built, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.interval = int(interval)
        self.work_dir = work_dir
        self.cost_model = CostModel.from_model(self.model, self.mutator, example_inputs)
        self.full_cost: Cost = self.cost_model.full()
        self.limits: Dict[str, float] = {} if self.budget is None else self.budget.limits(self.full_cost)
        self.counter = 0            # iterations ended so far
        self.channels_pruned = 0    # pruning steps taken (a grouped unit loses one channel per group in one step)
        self.history: List[Dict[str, Any]] = []  # per step: counter, unit, flops, params after it
        self.done = False
        self._update_channel_costs()
        self._check_done()
        self.mutator.start_record_info()
        if optimizer is not None and compact:  # last: a bad argument above leaves the model as it was
            self.start_compact_training(optimizer)

    # --------------------------------------------------------------------------------------------------- costs
    def cost(self) -> Cost:
        """FLOPs and parameters of the current subnet (the cost model's arithmetic; equals the exported model's)."""
        return self.cost_model.cost()

    def _update_channel_costs(self) -> None:
        """Each unit's FLOPs per channel at the current widths (they change when a neighbour loses a channel)."""
        counts = self.cost_model.as_counts()
        flops = {}
        for unit in self.mutator.mutable_units:
            pos = self.cost_model.positions[unit.name]
            low = max(0, counts[pos] - unit.groups)  # one pruning step: one channel per group
            flops[unit.name] = max(0.0, self.cost_model.channel_cost(pos, counts, low, "flops"))
        self.mutator.set_channel_flops(flops)

    def _check_done(self) -> None:
        if self.limits and meets(self.cost_model, self.cost_model.as_counts(), self.limits):
            self.done = True
        elif not self.mutator.prunable_units():
            if self.limits:
                warnings.warn(f"GroupFisherAlgorithm: every unit is at its minimum width and the budget "
                              f"{self.budget.describe(self.full_cost)} is not met (flops "
                              f"{self.cost().flops / self.full_cost.flops:.1%}, params "
                              f"{self.cost().params / self.full_cost.params:.1%} of the full model)", stacklevel=3)
            self.done = True

    # --------------------------------------------------------------------------------------------------- hooks
    def after_backward(self) -> None:
        """Call after ``loss.backward()``: the batch's Fisher information. The hooks saw the layers at their
        active width and map it to the units' channels themselves, so compact training needs no pause here."""
        self.mutator.update_importance()

    def step(self) -> bool:
        """Call at the end of every iteration; returns whether a channel was pruned."""
        counter = self.counter
        self.counter += 1
        if self.done or counter % self.interval:
            return False
        return self.prune_step(counter)

    def prune_step(self, counter: Optional[int] = None) -> bool:
        """Prune the globally least important channel now, agree on it across ranks and restart the Fisher
        accumulation; returns whether a channel went (not when a unit's importance holds NaN)."""
        with self.full_size():
            unit = self.mutator.try_prune()
            if unit is not None:
                broadcast_selections(self.mutator.mutable_units)
        self.mutator.reset_importance()
        if unit is not None:
            self.channels_pruned += 1
            self._update_channel_costs()
            cost = self.cost()
            self.history.append({"counter": self.counter - 1 if counter is None else counter, "unit": unit.name,
                                 "flops": cost.flops, "params": cost.params})
        self._check_done()
        if self.done and unit is not None and self.work_dir is not None:
            self.save_deploy(self.work_dir)
        return unit is not None

    # --------------------------------------------------------------------------------------------------- deploy
    def deploy_config(self) -> Dict[str, Any]:
        """``{unit name: choice}`` of the mutable units: what mmrazor's ``GroupFisherDeploySubModel`` takes as
        ``fix_subnet`` (and :meth:`ChannelMutator.set_choices` as well)."""
        return dict(self.mutator.choice_template)

    def save_deploy(self, directory: str, model_info: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
        """Write ``fix_subnet.json`` (:meth:`deploy_config`) and :func:`pyprune.save_pruned`'s
        ``pruned_model.pt`` + ``structure.json`` into ``directory`` (rank 0 only under DDP; created if missing).
        Returns the paths written (empty on other ranks)."""
        if distributed_world() > 1 and dist.get_rank() != 0:
            return {}
        os.makedirs(directory, exist_ok=True)
        with self.full_size():
            paths = save_pruned(directory, self.model, self.mutator, model_info)
        paths["fix_subnet"] = os.path.join(directory, FIX_SUBNET_FILE)
        atomic_write_text(paths["fix_subnet"], json.dumps(self.deploy_config(), indent=4))
        return paths

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(counter=self.counter, channels_pruned=self.channels_pruned, done=self.done,
                     interval=self.interval, budget=None if self.budget is None else self.budget.as_dict())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint of an algorithm with the same ``interval`` and budget (else ConfigError, nothing
        changed); the selections and the Fisher accumulated so far come back, so the run continues as if
        uninterrupted."""
        budget = None if self.budget is None else self.budget.as_dict()
        for key, ours in (("interval", self.interval), ("budget", budget)):
            if key in state and state[key] != ours:
                raise ConfigError(f"GroupFisherAlgorithm.load_state_dict: the checkpoint has {key}={state[key]!r}, "
                                  f"this algorithm {ours!r}")
        super().load_state_dict(state)
        self.counter, self.channels_pruned = int(state["counter"]), int(state["channels_pruned"])
        self.done = bool(state["done"])
        self.mutator.reset_recorded_info()
        self._update_channel_costs()


__all__ = ["GroupFisherAlgorithm"]
