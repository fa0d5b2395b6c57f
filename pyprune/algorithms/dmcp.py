"""DMCP: Differentiable Markov Channel Pruning (Guo et al., CVPR 2020) from a plain training loop (mmrazor's
``DMCP`` algorithm).

Every iteration first trains the weights on a "sandwich" of subnets (``strategy``: the widest, the narrowest, and
random ones; each its own forward, backward and optimizer step), then, every ``arch_train_freq`` iterations once
``arch_start_train`` have passed, the architecture parameters: one step on the task loss of the widest subnet with
every unit's channels scaled by their marginal probabilities (eval mode, so BatchNorm uses its running statistics),
and one step on the expected-FLOPs loss. The expected FLOPs are the budget cost model's bilinear sum over layers
(:class:`pyprune.budget.CostModel`) evaluated at the units' expected widths, so the FLOPs loss is differentiable
w.r.t. the architecture parameters with no forward pass. The subnet DMCP chooses at the end is each unit's
expected width (:meth:`DMCP.derive_subnet`), which :meth:`DMCP.export` turns into a plain model.

The subnet changes every forward, so DMCP trains in the gather regime (DynamicOps at the active width; compact
training is not used).
"""
import json
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..budget.cost import CostModel
from ..budget.errors import BudgetError
from ..errors import ConfigError
from ..mutators.dmcp import DMCPChannelMutator
from ..registry import MODELS
from ..utils.files import atomic_write_text
from .base import BaseAlgorithm, build_model_and_mutator
from .unit_state import distributed_world

DEFAULT_MUTATOR = {"type": "DMCPChannelMutator", "channel_unit_cfg": {"type": "DMCPChannelUnit"}}
STRATEGIES = ("max", "min", "arch_random", "scheduled_random")
FLOPS_LOSS_TYPES = ("log_l1", "l1", "l2", "inverted_log_l1")
# mmrazor's target_flops counts multiply-adds (its estimator's convention, in millions); pyprune's cost model counts
# FlopCounterMode's FLOPs, two per multiply-add.
FLOPS_PER_MAC = 2
SCHEDULED_DECAY = 0.9999  # 'scheduled_random': the chance of a random (not chain-drawn) subnet decays by this


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_args(strategy, arch_start_train, arch_train_freq, distillation_times, target_flops, flops_loss_type,
                flop_loss_weight) -> None:
    """One ConfigError naming the first bad key; called before anything is built."""
    def bad(key, value, what):
        raise ConfigError(f"DMCP: {key} must be {what}, got {value!r}")
    if isinstance(strategy, str) or not isinstance(strategy, Sequence) or not strategy or \
            any(kind not in STRATEGIES for kind in strategy):
        bad("strategy", strategy, f"a non-empty list of {list(STRATEGIES)}")
    for key, value, low in (("arch_start_train", arch_start_train, 0), ("arch_train_freq", arch_train_freq, 1),
                            ("distillation_times", distillation_times, 0)):
        if not _is_int(value) or value < low:
            bad(key, value, f"an int >= {low}")
    if not _is_real(target_flops) or target_flops <= 0:
        bad("target_flops", target_flops, "a number > 0 (millions of multiply-adds)")
    if flops_loss_type not in FLOPS_LOSS_TYPES:
        bad("flops_loss_type", flops_loss_type, f"one of {list(FLOPS_LOSS_TYPES)}")
    if not _is_real(flop_loss_weight) or flop_loss_weight < 0:
        bad("flop_loss_weight", flop_loss_weight, "a number >= 0")


def _total_loss(losses, where: str) -> Tensor:
    """A scalar loss from what ``loss_fn`` returned: a tensor, or a dict whose ``*loss*`` entries are summed (as
    mmengine's ``parse_losses``)."""
    if isinstance(losses, Tensor):
        total = losses
    elif isinstance(losses, Mapping):
        terms = [value for key, value in losses.items() if "loss" in key]
        if not terms or not all(isinstance(t, Tensor) for t in terms):
            raise ConfigError(f"DMCP.train_step: {where}: loss_fn returned a dict without tensor '*loss*' entries "
                              f"(keys {sorted(losses)})")
        total = sum(t.mean() for t in terms)
    else:
        raise ConfigError(f"DMCP.train_step: {where}: loss_fn must return a tensor or a dict of tensors, got "
                          f"{type(losses).__name__}")
    if total.dim() != 0:
        raise ConfigError(f"DMCP.train_step: {where}: the loss must be a scalar, got shape {tuple(total.shape)} "
                          f"{total.dtype}")
    return total


@MODELS.register_module()
class DMCP(BaseAlgorithm):
    """DMCP channel search from a plain training loop::

        algorithm = DMCP(model, target_flops=100, arch_start_train=5000, arch_train_freq=500,
                         strategy=['max', 'min', 'scheduled_random', 'arch_random'], flop_loss_weight=0.1)
        optim_wrapper = {'architecture': torch.optim.SGD(algorithm.model.parameters(), lr=0.5, momentum=0.9),
                         'mutator': torch.optim.Adam(algorithm.arch_parameters(), lr=0.5, weight_decay=1e-3)}
        for batch in loader:
            losses = algorithm.train_step(batch, loss_fn, optim_wrapper)  # loss_fn(model, batch) -> loss
        algorithm.derive_subnet()          # each unit at its expected width
        small = algorithm.export()

    Args (mmrazor's names and defaults):
        architecture: the model, or a config dict building it (as :class:`BaseAlgorithm`).
        mutator_cfg: a :class:`~pyprune.mutators.DMCPChannelMutator` or its config (default
            ``dict(type='DMCPChannelMutator', channel_unit_cfg=dict(type='DMCPChannelUnit'))``).
        distiller: mmrazor's in-place distillation of the narrow subnets from the widest; not implemented: a value
            other than None is kept and named in a warning (the subnets train on the task loss alone).
        data_preprocessor, init_cfg: as :class:`BaseAlgorithm`.
        strategy: the subnets of the weight phase, in order: ``'max'``, ``'min'``, ``'arch_random'`` (a grid-random
            subnet before the architecture training starts, a chain-drawn one after), ``'scheduled_random'`` (a
            chain-drawn subnet with a probability that grows as ``1 - 0.9999 ** n``, else a grid-random one).
        arch_start_train: the architecture training starts after this many iterations (iteration ``i`` trains the
            architecture when ``i > arch_start_train`` and ``i % arch_train_freq == 0``).
        arch_train_freq: iterations between two architecture steps.
        distillation_times: mmrazor's start of the distillation loss; checked, unused (see ``distiller``).
        target_flops: the FLOPs target in millions of multiply-adds (mmrazor's unit; pyprune's FLOPs / 2) of one
            forward of ``example_inputs`` (default: the mutator's demo input; mmrazor counts one 224 px image).
        flops_loss_type: ``'log_l1'`` (default; zero in ``[0.95, 1] * target``, logarithmic outside it), ``'l1'``,
            ``'l2'`` or ``'inverted_log_l1'`` (``log`` of the excess; zero below the target), of the error in
            millions of multiply-adds.
        flop_loss_weight: the FLOPs loss's weight.
        example_inputs: the input FLOPs are counted on (see ``target_flops``).
        seed: seeds the algorithm's own generator, which draws every random subnet (None: drawn from torch's
            default generator); its state is in :meth:`state_dict`, so a resumed run draws the same subnets.
    """

    def __init__(self, architecture, mutator_cfg=None, data_preprocessor=None,
                 strategy: Sequence[str] = ("max", "min", "arch_random"), init_cfg: Optional[Dict] = None,
                 arch_start_train: int = 10000, arch_train_freq: int = 500, distillation_times: int = 20000,
                 target_flops: float = 150, flops_loss_type: str = "log_l1", flop_loss_weight: float = 1.0, *,
                 distiller=None, example_inputs=None, seed: Optional[int] = None):
        _check_args(strategy, arch_start_train, arch_train_freq, distillation_times, target_flops, flops_loss_type,
                    flop_loss_weight)
        if seed is not None and not _is_int(seed):
            raise ConfigError(f"DMCP: seed must be an int or None, got {seed!r}")
        architecture, mutator = build_model_and_mutator("DMCP", architecture, mutator_cfg, DEFAULT_MUTATOR,
                                                        DMCPChannelMutator)
        super().__init__(architecture, mutator, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if distiller is not None:
            warnings.warn("DMCP: distiller ignored: in-place distillation is not implemented in pyprune (the narrow "
                          "subnets train on the task loss alone)", stacklevel=2)
        self.distiller = distiller
        self.strategy = list(strategy)
        self.arch_start_train, self.arch_train_freq = int(arch_start_train), int(arch_train_freq)
        self.distillation_times = int(distillation_times)
        self.target_flops = float(target_flops)
        self.flops_loss_type, self.flop_loss_weight = flops_loss_type, float(flop_loss_weight)
        self.cur_sample_prob = 1.0
        self.arch_train = False
        self.counter = 0  # iterations ended so far (mmrazor's runner iteration)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(2 ** 62, ())) if seed is None else int(seed))
        with self.full_size():
            self.mutator.sample_subnet("max", False)  # the cost model records the layers at full width
            self.cost_model = CostModel.from_model(self.model, self.mutator, example_inputs)
        self.full_flops = float(self.cost_model.full().flops)

    # ---------------------------------------------------------------------------------------------- parameters
    def arch_parameters(self) -> List[torch.nn.Parameter]:
        """The architecture parameters (give them to the ``'mutator'`` optimizer)."""
        return self.mutator.arch_parameters()

    def set_subnet(self, mode: str, arch_train: Optional[bool] = None) -> Dict[str, int]:
        """Set the subnet of ``mode`` (``'max'``, ``'min'``, ``'random'``, ``'direct'``, ``'expected'``), with the
        architecture scaling of the forward on when ``arch_train`` (default: whether the architecture training has
        started, as mmrazor). Returns ``{unit name: channel count}``."""
        arch_train = self.arch_train if arch_train is None else arch_train
        return self.mutator.sample_subnet(mode, arch_train, self.generator)

    # ----------------------------------------------------------------------------------------------------- FLOPs
    def expected_flops(self) -> Tensor:
        """The expected FLOPs (pyprune's count, 2 per multiply-add) of one forward of the example input under the
        architecture parameters: a 0-dim tensor differentiable w.r.t. them. Each layer's cost is bilinear in its
        input and output widths, evaluated at the units' expected widths."""
        counts = self.mutator.expected_counts()
        total = self.cost_model.base.flops
        for layer in self.cost_model.layers:
            total = total + layer.cost(counts, "flops")
        if not isinstance(total, Tensor):  # no unit has a chain: a constant
            total = torch.tensor(float(total))
        return total

    def current_flops(self) -> float:
        """FLOPs of the subnet set now (equal to ``count_flops`` of its export)."""
        return float(self.cost_model.cost().flops)

    def flops_loss(self, expected_flops: Tensor) -> Tensor:
        """``flop_loss_weight`` times the ``flops_loss_type`` loss of ``expected_flops`` (pyprune FLOPs, as
        :meth:`expected_flops` gives them) against ``target_flops``, both in millions of multiply-adds."""
        expected = expected_flops / (FLOPS_PER_MAC * 1e6)
        target = self.target_flops
        error = expected - target
        if self.flops_loss_type == "l2":
            loss = error ** 2
        elif self.flops_loss_type == "l1":
            loss = error.abs()
        elif self.flops_loss_type == "inverted_log_l1":
            loss = torch.log(torch.clamp(error, min=0) + 1e-5)
        else:
            now = float(expected.detach())
            ratio = 0.1 if abs(now - target) > 200 else 1.0  # mmrazor's; a constant inside the log
            lower = 0.95 * target
            if now < lower:
                loss = torch.log(ratio * error.abs())
            elif now < target:
                loss = expected * 0
            else:
                loss = torch.log(ratio * (expected - lower).abs())
        return loss * self.flop_loss_weight

    # ---------------------------------------------------------------------------------------------------- steps
    def train_step(self, batch, loss_fn: Callable, optim_wrapper: Mapping, model=None) -> Dict[str, Tensor]:
        """One iteration: the weight phase over ``strategy``, then (when due) the architecture phase.

        ``loss_fn(model, batch)`` returns the loss (a scalar tensor, or a dict whose ``*loss*`` entries are
        summed). ``optim_wrapper``: ``{'architecture': the weights' optimizer, 'mutator': the architecture
        parameters' optimizer}`` (mmrazor's keys). Each subnet's loss is backpropagated and its optimizer stepped
        and zeroed at once. ``model``: what the weight phase hands ``loss_fn`` (default :attr:`model`; give the
        DistributedDataParallel wrapper, whose backward averages the weights' gradients); the architecture phase
        always hands it the module itself (DMCP averages the architecture gradients over the ranks, and a DDP
        forward would wait for weight gradients that phase does not compute). Every rank must draw the same
        subnets: build the algorithm with the same ``seed`` on every rank. Returns the detached losses, keyed as
        mmrazor logs them (``'max_subnet1.loss'``, ``'arch.loss'``, ``'flops.loss'``, ...).
        """
        weight_model = self.model if model is None else model
        optimizers = self._optimizers(optim_wrapper)
        iteration = self.counter
        if not self.arch_train and iteration > self.arch_start_train:
            self.arch_train = True
        losses: Dict[str, Tensor] = {}
        seen: Dict[str, int] = {}
        for kind in self.strategy:
            if kind == "max":
                mode = "max"
            elif kind == "min":
                mode = "min"
            elif kind == "arch_random":
                mode = "direct" if self.arch_train else "random"
            else:  # scheduled_random: a uniform draw from the algorithm's generator decides
                draw = float(torch.rand((), generator=self.generator, dtype=torch.float64))
                mode = "direct" if draw > self.cur_sample_prob and self.arch_train else "random"
                self.cur_sample_prob *= SCHEDULED_DECAY
            # the weight phase sees the scaled forward once the architecture trains (as mmrazor), with the
            # parameters' values only: their gradient is the architecture phase's
            self.mutator.sample_subnet(mode, self.arch_train, self.generator, detach=True)
            loss = _total_loss(loss_fn(weight_model, batch), f"{mode} subnet")
            loss.backward()
            optimizers["architecture"].step()
            optimizers["architecture"].zero_grad()
            name = {"max": "max_subnet", "min": "min_subnet", "direct": "direct_subnet"}.get(mode, "random_subnet")
            seen[name] = seen.get(name, 0) + 1
            losses[f"{name}{seen[name]}.loss"] = loss.detach()
        if self.arch_train and iteration % self.arch_train_freq == 0:
            losses.update(self.update_arch_params(batch, loss_fn, optimizers["mutator"]))
        self.counter += 1
        return losses

    def update_arch_params(self, batch, loss_fn: Callable, optimizer) -> Dict[str, Tensor]:
        """The architecture phase: the task loss of the widest subnet with the scaled forward (eval mode, so
        BatchNorm uses its running statistics) plus the expected-FLOPs loss, one step of ``optimizer`` on their
        sum; the model's weights get no gradient. Leaves the model at the expected subnet, unscaled. Returns
        ``{'arch.loss', 'flops.loss'}`` (detached)."""
        was_training = self.model.training
        self.model.eval()
        try:
            self.mutator.sample_subnet("max", True, self.generator)
            arch_loss = _total_loss(loss_fn(self.model, batch), "architecture step")
        finally:
            self.mutator.modify_supernet_forward(False)
            self.model.train(was_training)
        flops_loss = self.flops_loss(self.expected_flops())
        # one step on the sum (the paper's joint objective). Two steps, task loss first, as mmrazor takes them,
        # move every parameter below 0 at once (a first Adam step is lr * sign(grad), and the widest subnet's task
        # loss always asks for more channels), where neither loss has a gradient any more.
        self._step_arch(optimizer, self.arch_parameters(), arch_loss + flops_loss.to(arch_loss.device))
        self.mutator.sample_subnet("expected", False, self.generator)
        return {"arch.loss": arch_loss.detach(), "flops.loss": flops_loss.detach()}

    @staticmethod
    def _step_arch(optimizer, params: List[torch.nn.Parameter], loss: Tensor) -> None:
        """Gradients of ``loss`` w.r.t. ``params`` only (averaged over ranks under torch.distributed), one step."""
        wanted = [p for p in params if p.requires_grad and p.numel()]
        grads = torch.autograd.grad(loss, wanted, allow_unused=True) if loss.requires_grad and wanted else \
            [None] * len(wanted)
        world = distributed_world()
        for param, grad in zip(wanted, grads):
            param.grad = torch.zeros_like(param) if grad is None else grad
            if world > 1:
                dist.all_reduce(param.grad)
                param.grad /= world
        optimizer.step()
        optimizer.zero_grad()

    @staticmethod
    def _optimizers(optim_wrapper) -> Dict[str, Any]:
        if not isinstance(optim_wrapper, Mapping) or not {"architecture", "mutator"} <= set(optim_wrapper):
            keys = sorted(optim_wrapper) if isinstance(optim_wrapper, Mapping) else type(optim_wrapper).__name__
            raise ConfigError(f"DMCP.train_step: optim_wrapper must be a dict with 'architecture' (the weights' "
                              f"optimizer) and 'mutator' (the architecture parameters'), got {keys}")
        for key in ("architecture", "mutator"):
            if not (hasattr(optim_wrapper[key], "step") and hasattr(optim_wrapper[key], "zero_grad")):
                raise ConfigError(f"DMCP.train_step: optim_wrapper[{key!r}] must be an optimizer, got "
                                  f"{type(optim_wrapper[key]).__name__}")
        return dict(optim_wrapper)

    # ---------------------------------------------------------------------------------------------- the subnet
    def derive_subnet(self) -> Dict[str, int]:
        """Set each unit to its expected width (the chosen subnet; mmrazor's ``'expected'`` sample), with the
        forward unscaled. Returns ``{unit name: channel count}``; :meth:`export` then gives the plain model."""
        return self.mutator.sample_subnet("expected", False, self.generator)

    def sample_direct_subnet(self, tolerance: float = 0.05, max_tries: int = 1000) -> Dict[str, int]:
        """Draw subnets from the chains until one's FLOPs are within ``tolerance`` of ``target_flops`` and set it
        (what mmrazor's ``DMCPSubnetHook`` samples, with its 5 %); returns its counts. None within ``max_tries``
        draws: BudgetError, and the subnet is left as it was."""
        if not _is_real(tolerance) or tolerance < 0 or not _is_int(max_tries) or max_tries < 1:
            raise ConfigError(f"DMCP.sample_direct_subnet: tolerance must be a number >= 0 and max_tries an int "
                              f">= 1, got {tolerance!r}, {max_tries!r}")
        target = self.target_flops * FLOPS_PER_MAC * 1e6
        for _ in range(max_tries):
            counts = self.mutator.subnet_counts("direct", self.generator)
            if abs(self.cost_model.cost(counts).flops - target) <= tolerance * target:
                self.mutator.apply_counts(counts)
                self.mutator.modify_supernet_forward(False)
                return counts
        raise BudgetError(f"DMCP.sample_direct_subnet: no subnet drawn from the architecture parameters in "
                          f"{max_tries} draws is within {tolerance:.0%} of target_flops={self.target_flops:g}M")

    def subnet_config(self) -> Dict[str, Any]:
        """The current subnet in the layout of mmrazor's DMCP subnet files (``DMCP_MBV2_100M.json``): a
        ``DMCPChannelMutator`` config whose ``channel_unit_cfg['units']`` give each mutable unit's ``init_args``
        and ``choice``; :meth:`ChannelMutator.from_config` builds a mutator that sets it on a fresh model."""
        config = self.mutator.config_template(only_mutable_units=True, with_unit_init_args=True)
        config["type"] = type(self.mutator).__name__
        return config

    def save_subnet(self, path: str) -> str:
        """Write :meth:`subnet_config` as JSON (what mmrazor's ``DMCPSubnetHook`` writes); rank 0 only under
        torch.distributed. Returns the path."""
        if distributed_world() > 1 and dist.get_rank() != 0:
            return path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, json.dumps(self.subnet_config(), indent=4))
        return path

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The base selections plus the architecture parameters, the iteration counter, whether the architecture
        trains, the scheduled sampling probability and the generator state (tensors, numbers and dicts). The
        model's weights and the optimizers' states are not included (save them too)."""
        state = super().state_dict()
        state.update(arch_params=self.mutator.arch_state_dict(), counter=self.counter, arch_train=self.arch_train,
                     cur_sample_prob=self.cur_sample_prob, generator=self.generator.get_state(),
                     target_flops=self.target_flops, pruning_cfg=list(self.mutator.pruning_cfg))
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint of a DMCP run with the same ``target_flops`` and ``pruning_cfg`` (else ConfigError
        naming the key, nothing changed): the run continues as if uninterrupted."""
        for key, ours in (("target_flops", self.target_flops), ("pruning_cfg", list(self.mutator.pruning_cfg))):
            if key in state and state[key] != ours:
                raise ConfigError(f"DMCP.load_state_dict: the checkpoint has {key}={state[key]!r}, this algorithm "
                                  f"{ours!r}")
        generator = state.get("generator")
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            raise ConfigError("DMCP.load_state_dict: 'generator' must be the uint8 state tensor DMCP.state_dict "
                              "saved")
        self.mutator.check_arch_state(state.get("arch_params"))  # everything checked before anything changes
        self.mutator.modify_supernet_forward(False)
        super().load_state_dict(state)
        self.mutator.load_arch_state_dict(state["arch_params"])
        self.counter, self.arch_train = int(state["counter"]), bool(state["arch_train"])
        self.cur_sample_prob = float(state["cur_sample_prob"])
        self.generator.set_state(generator)


__all__ = ["DMCP", "FLOPS_LOSS_TYPES", "FLOPS_PER_MAC", "STRATEGIES"]
