"""DCFF: train a compact network with dynamic-coded filter fusion, on ItePruneAlgorithm's schedule (mmrazor's DCFF).

At every pruning step of the schedule the units are set to the step's width, rank their channels at the step's
temperature and fuse the kept filters (:mod:`pyprune.units.dcff`, :mod:`pyprune.ops.fuse_conv`). Training in
between updates every filter through the fusion; the next step recomputes the distributions from the trained
weights at a higher temperature (sharper distributions). After the last step the fused filters are what the
exported subnet holds.

The temperature at iteration ``n`` of ``N`` (mmrazor's formula, ``t_s = 1``, ``t_e = 10000``, ``k = 1`` by
default) rises from ``t_s`` at ``n = 0`` to ``t_e`` at ``n = N`` along a logistic curve::

    A = 2 (t_e - t_s) (1 + exp(-k N)) / (1 - exp(-k N))
    t(n) = A / (1 + exp(-k n)) + t_s - A / 2              tau = 1 / t(n) divides the filter distances

mmrazor counts ``n`` and ``N`` in iterations (also when ``step_freq`` counts epochs); so does this class. With
``k = 1`` the curve is close to ``t_e`` after about ten iterations; ``temperature_k`` sets the steepness.
"""
import json
import math
import numbers
import os
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from ..errors import ConfigError
from ..mutators.dcff import DCFFChannelMutator
from ..mutators.io import save_pruned
from ..registry import MODELS
from ..utils.files import atomic_write_text
from .base import build_model_and_mutator
from .ite_prune import ItePruneAlgorithm, Target
from .unit_state import broadcast_selections, distributed_world

DEFAULT_MUTATOR = {"type": "DCFFChannelMutator", "channel_unit_cfg": {"type": "DCFFChannelUnit"}}
FIX_SUBNET_FILE = "fix_subnet.json"


def dcff_temperature(iteration: float, max_iters: float, start: float = 1.0, end: float = 10000.0,
                     k: float = 1.0) -> float:
    """The temperature ``t`` at ``iteration`` of ``max_iters`` (module docstring); ``t(0) = start``,
    ``t(max_iters) = end``."""
    decay = math.exp(-k * max_iters)
    amplitude = 2.0 * (end - start) * (1.0 + decay) / (1.0 - decay)
    return amplitude / (1.0 + math.exp(-k * iteration)) + start - amplitude / 2.0


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@MODELS.register_module()
class DCFF(ItePruneAlgorithm):
    """Dynamic-coded filter fusion (Lin et al., 2021) from a plain training loop::

        algorithm = DCFF(model, target_pruning_ratio=0.6, step_freq=1, max_iters=len(loader) * epochs)
        for epoch in range(epochs):
            for images, labels in loader:
                loss = criterion(algorithm.model(images), labels)
                optimizer.zero_grad(); loss.backward(); optimizer.step()
                algorithm.step()       # a pruning step: widths, ranking and fused filters at a new temperature
        small = algorithm.export()     # plain layers holding the fused filters

    mmrazor's signature, in its order: ``DCFF(architecture, mutator_cfg, data_preprocessor, target_pruning_ratio,
    step_freq=1, prune_times=0, init_cfg, linear_schedule=False)``. mmrazor reads the run's length from its
    runner; here it is ``max_iters`` (required).

    Args:
        architecture: the model or a config dict building it (see :class:`BaseAlgorithm`).
        mutator_cfg: a :class:`~pyprune.mutators.DCFFChannelMutator` or its config (default mmrazor's:
            ``dict(type='DCFFChannelMutator', channel_unit_cfg=dict(type='DCFFChannelUnit'))``).
        data_preprocessor, init_cfg: mmrazor's; see :class:`BaseAlgorithm`.
        target_pruning_ratio: the kept widths, as :class:`ItePruneAlgorithm` takes them (dict of unit name ->
            choice, or one kept ratio for every unit; None keeps the current widths).
        step_freq: iterations (epochs with ``by_epoch=True``) between pruning steps.
        prune_times: the number of pruning steps. Exactly one of the two must be in ``[1, max_iters)`` (counted in
            iterations; 0 = unset, mmrazor's default); the other follows: ``prune_times = max_iters // step_freq``
            or ``step_freq = max_iters // prune_times``. After construction :attr:`step_freq` counts iterations,
            as in mmrazor.
        linear_schedule: as :class:`ItePruneConfigManager` (mmrazor's DCFF default False: every step sets the
            target, and only the temperature changes).
        max_iters: the run's length in iterations (the temperature curve and the schedule are laid over it).
        by_epoch, iters_per_epoch: ``step_freq`` counts epochs of ``iters_per_epoch`` iterations (required then);
            :meth:`step` still counts iterations, as mmrazor's epoch-based runner does.
        temperature_start, temperature_end, temperature_k: ``t_s``, ``t_e`` and ``k`` of the temperature curve
            (mmrazor's constants 1, 10000 and 1 by default).
        strict: as :class:`ItePruneAlgorithm` (target names the model lacks raise instead of a warning).

    Bad values raise ConfigError naming the argument, before the model is touched. Compact training is refused
    (fused filters need every full-size filter); the model trains in gather mode.
    """

    def __init__(self, architecture, mutator_cfg=None, data_preprocessor=None, target_pruning_ratio: Target = None,
                 step_freq: int = 1, prune_times: int = 0, init_cfg: Optional[Dict] = None,
                 linear_schedule: bool = False, *, max_iters: Optional[int] = None, by_epoch: bool = False,
                 iters_per_epoch: Optional[int] = None, temperature_start: float = 1.0,
                 temperature_end: float = 10000.0, temperature_k: float = 1.0, strict: bool = False):
        if not _is_int(max_iters) or max_iters < 1:
            raise ConfigError(f"DCFF: max_iters (the run's length in iterations, which mmrazor reads from its "
                              f"runner) must be an int >= 1, got {max_iters!r}")
        for name, value in (("step_freq", step_freq), ("prune_times", prune_times)):
            if not _is_int(value) or value < 0:
                raise ConfigError(f"DCFF: {name} must be an int >= 0 (0: derived from the other), got {value!r}")
        if by_epoch and (not _is_int(iters_per_epoch) or iters_per_epoch < 1):
            raise ConfigError(f"DCFF: by_epoch=True needs iters_per_epoch, an int >= 1 (the temperature counts "
                              f"iterations), got {iters_per_epoch!r}")
        if iters_per_epoch is not None and not by_epoch:
            raise ConfigError("DCFF: iters_per_epoch is only used with by_epoch=True")
        if not _is_real(temperature_start) or temperature_start <= 0:
            raise ConfigError(f"DCFF: temperature_start must be a finite number > 0, got {temperature_start!r}")
        if not _is_real(temperature_end) or temperature_end < temperature_start:
            raise ConfigError(f"DCFF: temperature_end must be a finite number >= temperature_start="
                              f"{temperature_start!r}, got {temperature_end!r}")
        if not _is_real(temperature_k) or temperature_k <= 0:
            raise ConfigError(f"DCFF: temperature_k must be a finite number > 0, got {temperature_k!r}")
        freq = step_freq * (iters_per_epoch if by_epoch else 1)  # in iterations, as mmrazor turns it

        def legal(value):
            return 0 < value < max_iters

        if legal(freq) == legal(prune_times):
            raise ConfigError(f"DCFF: exactly one of step_freq and prune_times must be in [1, max_iters={max_iters}) "
                              f"(in iterations; the other 0), got step_freq={step_freq!r}"
                              f"{f' epochs = {freq} iterations' if by_epoch else ''}, prune_times={prune_times!r}")
        if legal(freq):
            prune_times = max_iters // freq
        else:
            freq = max_iters // prune_times
        architecture, mutator = build_model_and_mutator("DCFF", architecture, mutator_cfg, DEFAULT_MUTATOR,
                                                        DCFFChannelMutator)
        super().__init__(architecture, mutator, target_pruning_ratio, freq, prune_times, linear_schedule,
                         strict=strict, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.max_iters = int(max_iters)
        self.epoch_step_freq = int(step_freq) if by_epoch else None  # what was asked, in epochs
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.temperature_k = float(temperature_k)
        self.temperature: Optional[float] = None  # of the last pruning step (None before the first)
        self.history: List[Dict[str, Any]] = []   # per step: counter, step, temperature

    # ---------------------------------------------------------------------------------------------- temperature
    def temperature_at(self, iteration: int) -> float:
        """The temperature ``t`` of a pruning step taken at ``iteration`` (``tau = 1 / t``)."""
        return dcff_temperature(iteration, self.max_iters, self.temperature_start, self.temperature_end,
                                self.temperature_k)

    def _calc_temperature(self, cur_num: int, max_num: int) -> float:
        """mmrazor's name: ``tau = 1 / t`` at ``cur_num`` of ``max_num`` iterations."""
        return 1.0 / dcff_temperature(cur_num, max_num, self.temperature_start, self.temperature_end,
                                      self.temperature_k)

    # ---------------------------------------------------------------------------------------------------- steps
    def prune_step(self, step: int) -> None:
        """Pruning step ``step`` (1-based), taken at iteration ``(step - 1) * step_freq``: the step's widths,
        ranked and fused at that iteration's temperature; every rank keeps rank 0's channels (the fusion is
        computed from weights that are the same on every rank)."""
        counter = (step - 1) * self._counter_step_freq
        temperature = self.temperature_at(counter)
        self.mutator.set_tau(1.0 / temperature)  # before the choices: the units rank at the new temperature
        self.mutator.set_choices(self.choices_at(step))
        broadcast_selections(self.mutator.mutable_units)  # then every rank fuses at rank 0's channels
        self.mutator.fuse_filters()
        self.steps_done = step
        self.temperature = temperature
        self.history.append({"counter": counter, "step": step, "temperature": temperature})

    def start_compact_training(self, optimizers):
        raise ConfigError("DCFF: compact training is not available: the fused filters are made from every "
                          "full-size filter, which compact mode does not hold; DCFF trains in gather mode")

    # --------------------------------------------------------------------------------------------------- deploy
    def fix_subnet(self) -> Dict[str, Any]:
        """The pruned structure as mmrazor's DCFF ``fix_subnet.json`` holds it: the mutator config with every
        unit's init args and choice."""
        return self.mutator.config_template(with_unit_init_args=True)

    def save_deploy(self, directory: str, model_info: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
        """Write ``fix_subnet.json`` (:meth:`fix_subnet`) and :func:`pyprune.save_pruned`'s ``pruned_model.pt``
        (the exported weights: the fused filters) + ``structure.json`` into ``directory`` (rank 0 only under DDP;
        created if missing). Returns the paths written (empty on other ranks)."""
        if distributed_world() > 1 and dist.get_rank() != 0:
            return {}
        os.makedirs(directory, exist_ok=True)
        paths = save_pruned(directory, self.model, self.mutator, model_info)
        paths["fix_subnet"] = os.path.join(directory, FIX_SUBNET_FILE)
        atomic_write_text(paths["fix_subnet"], json.dumps(self.fix_subnet(), indent=4))
        return paths

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """:class:`ItePruneAlgorithm`'s, plus the temperature settings, the last step's temperature, the steps'
        history and every conv's fusion blocks (computed from the weights at the last step, so a checkpoint of
        the weights alone cannot give them back)."""
        state = super().state_dict()
        state.update(max_iters=self.max_iters, temperature_start=self.temperature_start,
                     temperature_end=self.temperature_end, temperature_k=self.temperature_k,
                     temperature=self.temperature, history=[dict(entry) for entry in self.history],
                     fusion=self.mutator.fusion_state())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint of a DCFF built with the same schedule, target and temperature settings (else
        ConfigError naming the key; everything is checked before anything changes)."""
        for key in ("max_iters", "temperature_start", "temperature_end", "temperature_k"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"DCFF.load_state_dict: the checkpoint has {key}={state[key]!r}, this algorithm "
                                  f"{getattr(self, key)!r}")
        fusion = state.get("fusion", {})
        units = {unit.name: unit for unit in self.mutator.mutable_units}
        unknown = sorted(set(fusion) - set(units))
        if unknown:
            raise ConfigError(f"DCFF.load_state_dict: the checkpoint's fusion names units {unknown} the model does "
                              f"not have")
        for name, unit_state in fusion.items():
            units[name].check_fusion_state(unit_state, "DCFF.load_state_dict")
        super().load_state_dict(state)
        self.temperature = state.get("temperature")
        self.history = [dict(entry) for entry in state.get("history", [])]
        if self.temperature is not None:
            self.mutator.set_tau(1.0 / self.temperature)
        self.mutator.load_fusion_state(fusion, "DCFF.load_state_dict")


__all__ = ["DCFF", "dcff_temperature"]
