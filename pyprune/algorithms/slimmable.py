"""SlimmableNetwork: train several widths of one network at once (slimmable networks / AutoSlim's supernet), each
width with its own BatchNorm, and export any of them (mmrazor's algorithm of that name)."""
import numbers
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..mutators.slimmable import SlimmableChannelMutator
from ..registry import MODELS
from ..utils.copying import copy_module
from .base import BaseAlgorithm, build_model_and_mutator, unwrap_model

DEFAULT_MUTATOR = {"type": "SlimmableChannelMutator", "channel_unit_cfg": {"type": "SlimmableChannelUnit"}}
SCHEDULES = ("sandwich", "subnets")


@MODELS.register_module()
class SlimmableNetwork(BaseAlgorithm):
    """Slimmable training from a plain loop; one call per batch does every width's forward and one optimizer step::

        algorithm = SlimmableNetwork(model, dict(type='SlimmableChannelMutator',
                                                 channel_unit_cfg=dict(type='SlimmableChannelUnit', units=path)))
        optimizer = torch.optim.SGD(algorithm.model.parameters(), lr=0.1)   # after: the per-width BNs exist now
        for images, labels in loader:
            losses = algorithm.train_step(images, labels, optimizer, criterion)
        small = algorithm.export(0)           # subnet 0 as a plain model, with that width's BatchNorm

    The model's BatchNorm2d layers in slimmable units become :class:`~pyprune.ops.switchable_bn.
    SwitchableBatchNorm2d` (a private BN per candidate width) when the mutator prepares it, so build the optimizer
    from ``algorithm.model.parameters()`` after constructing the algorithm.

    One :meth:`train_step` (the gather regime: the width changes every forward, so no compact training):
    ``optimizer.zero_grad()``; for each width of the schedule, set it, forward, ``criterion(outputs, targets) /
    n`` backward (gradients accumulate over the ``n`` widths: the mean of their losses, as mmrazor's optimizer
    wrapper with ``accumulative_counts=n`` scales them); one ``optimizer.step()``. Schedules:

    * ``'sandwich'`` (default): the largest width, the smallest, then ``num_random_samples`` random ones (every
      unit draws one of its candidates independently), AutoSlim's order and draw, without its in-place
      distillation;
    * ``'subnets'``: every subnet of ``mutator.subnets`` in order, mmrazor's ``SlimmableNetwork`` train step.

    BN statistics: each forward in train mode updates only the active width's BN of every switchable layer.

    Args:
        architecture, mutator: the model and a :class:`~pyprune.mutators.SlimmableChannelMutator` (or their config
            dicts); ``mutator_cfg`` is accepted as pyprune's other algorithms spell it (give one of the two).
            Default mutator: ``dict(type='SlimmableChannelMutator', channel_unit_cfg=dict(type=
            'SlimmableChannelUnit'))``.
        deploy_index: mmrazor's: ``-1`` trains the slimmable network; ``i`` fixes the model at subnet ``i`` (its
            plain export, with that width's BNs) and :meth:`train_step` then trains that fixed model.
        data_preprocessor, init_cfg: mmrazor's; see :class:`BaseAlgorithm`.
        schedule: ``'sandwich'`` or ``'subnets'`` (above).
        num_random_samples: random widths per sandwich step (AutoSlim's default 2).
        seed: seeds the algorithm's own generator, which draws every random width (None: a seed drawn from torch's
            default generator); its state is in :meth:`state_dict`, so a resumed run draws the same widths, and
            ranks built with one seed draw the same widths.

    Under DistributedDataParallel pass the wrapper to :meth:`train_step` (``model=ddp``): its backward averages the
    gradients of every width. Build it with ``find_unused_parameters=True`` (the other widths' BNs get no gradient in
    a forward) and ``broadcast_buffers=False`` (each forward would copy rank 0's BN statistics), as mmrazor's
    slimmable configs do.
    """

    def __init__(self, architecture, mutator=None, deploy_index: int = -1, data_preprocessor=None,
                 init_cfg: Optional[Dict] = None, *, mutator_cfg=None, schedule: str = "sandwich",
                 num_random_samples: int = 2, seed: Optional[int] = None):
        if mutator is not None and mutator_cfg is not None:
            raise ConfigError("SlimmableNetwork: give mutator (mmrazor's keyword) or mutator_cfg, not both")
        if schedule not in SCHEDULES:
            raise ConfigError(f"SlimmableNetwork: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        if not _is_int(num_random_samples) or num_random_samples < 0:
            raise ConfigError(f"SlimmableNetwork: num_random_samples must be an int >= 0, got "
                              f"{num_random_samples!r}")
        if not _is_int(deploy_index) or deploy_index < -1:
            raise ConfigError(f"SlimmableNetwork: deploy_index must be -1 (train the slimmable network) or the "
                              f"index of a subnet, got {deploy_index!r}")
        if seed is not None and not _is_int(seed):
            raise ConfigError(f"SlimmableNetwork: seed must be an int or None, got {seed!r}")
        chosen = mutator if mutator is not None else mutator_cfg
        architecture, built = build_model_and_mutator("SlimmableNetwork", architecture, chosen, DEFAULT_MUTATOR,
                                                      SlimmableChannelMutator)
        subnets = built.num_subnets
        if deploy_index >= subnets:
            raise ConfigError(f"SlimmableNetwork: deploy_index {deploy_index} is out of range: the mutator config "
                              f"lists {subnets} subnets")
        if schedule == "subnets" and subnets == 0:
            raise ConfigError("SlimmableNetwork: schedule 'subnets' needs subnets, and the mutator config lists "
                              "none (give the units' candidate_choices, or use schedule='sandwich')")
        super().__init__(architecture, built, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.schedule, self.num_random_samples = schedule, int(num_random_samples)
        self.iteration = 0  # train steps taken
        self.last_choices: List[Dict[str, Any]] = []  # the widths the last train step ran, in order
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(2 ** 62, ())) if seed is None else int(seed))
        self.is_deployed = False
        self.deploy_index = int(deploy_index)
        if deploy_index != -1:
            self._deploy(deploy_index)

    @property
    def num_subnet(self) -> int:
        """mmrazor's name: the number of subnets the mutator lists."""
        return len(self.mutator.subnets)

    @property
    def sample_kinds(self) -> List[str]:
        """The widths one train step runs, by name: ``['max', 'min', 'random0', ...]`` or ``['subnet_0', ...]``."""
        if self.schedule == "subnets":
            return [f"subnet_{i}" for i in range(self.num_subnet)]
        return ["max", "min"] + [f"random{i}" for i in range(self.num_random_samples)]

    def _choices_of(self, kind: str) -> Dict[str, Any]:
        if kind == "max":
            return self.mutator.max_choices
        if kind == "min":
            return self.mutator.min_choices
        if kind.startswith("random"):
            return self.mutator.sample_choices(self.generator)
        return self.mutator.subnets[int(kind[len("subnet_"):])]

    # ------------------------------------------------------------------------------------------------- training
    def train_step(self, inputs, targets, optimizer: torch.optim.Optimizer, criterion,
                   model: Optional[nn.Module] = None) -> Dict[str, Tensor]:
        """One step of every width of the schedule on one batch, one ``optimizer.step()`` (class docstring).

        ``inputs``: what the model takes (a tensor; a tuple / list is passed as positional arguments, a dict as
        keyword arguments); ``criterion(outputs, targets)`` returns the scalar loss. Returns ``{'<kind>_subnet.
        loss': loss}`` per width (``'max_subnet.loss'``, ...; ``'subnet_0.loss'`` ...; unscaled, detached), as
        mmrazor names them. The widths set before the step are set again after it. ``model``: what runs the
        forward, :attr:`model` itself (default) or a DistributedDataParallel wrapper of it."""
        if not callable(getattr(optimizer, "step", None)) or not callable(getattr(optimizer, "zero_grad", None)):
            raise ConfigError(f"SlimmableNetwork.train_step: optimizer must be a torch optimizer, got "
                              f"{type(optimizer).__name__}")
        if not callable(criterion):
            raise ConfigError(f"SlimmableNetwork.train_step: criterion must be callable, got "
                              f"{type(criterion).__name__}")
        forward = self.model if model is None else model
        if unwrap_model(forward) is not self.model:
            raise ConfigError(f"SlimmableNetwork.train_step: model must be the algorithm's model or a wrapper of it, "
                              f"got a {type(forward).__name__} around another module")
        optimizer.zero_grad()
        if self.is_deployed:
            loss = criterion(_call(forward, inputs), targets)
            loss.backward()
            optimizer.step()
            self.iteration += 1
            return {"loss": loss.detach()}
        kinds = self.sample_kinds
        before = self.mutator.current_choices
        losses: Dict[str, Tensor] = {}
        self.last_choices = []
        try:
            for kind in kinds:
                choices = self._choices_of(kind)
                self.mutator.set_choices(choices)
                self.last_choices.append(choices)
                loss = criterion(_call(forward, inputs), targets)
                (loss / len(kinds)).backward()
                losses[f"{kind}.loss" if kind.startswith("subnet_") else f"{kind}_subnet.loss"] = loss.detach()
        finally:
            self.mutator.set_choices(before)
        optimizer.step()
        self.iteration += 1
        return losses

    def start_compact_training(self, optimizers):
        raise ConfigError("SlimmableNetwork: compact training holds one width's tensors, and slimmable training "
                          "changes the width every forward (it trains in gather mode); export a width and train "
                          "that instead")

    # --------------------------------------------------------------------------------------------------- export
    def export(self, width=None) -> nn.Module:
        """A plain copy of the model at ``width``, each BN holding that width's own parameters and statistics:
        ``None`` (the current widths), ``'max'``, ``'min'``, an int (index of ``mutator.subnets``) or a dict
        ``{unit name: choice}``. The algorithm's model and its widths are unchanged."""
        if self.is_deployed:
            if width is not None:
                raise ConfigError(f"SlimmableNetwork.export: the model is deployed at subnet {self.deploy_index}; "
                                  f"export() takes no width then, got {width!r}")
            return copy_module(self.model)
        choices = self._width_choices(width)
        if choices is None:
            return self.mutator.export(self.model)
        before = self.mutator.current_choices
        self.mutator.set_choices(choices)  # validated first: a bad choice changes nothing
        try:
            return self.mutator.export(self.model)
        finally:
            self.mutator.set_choices(before)

    def _width_choices(self, width) -> Optional[Dict[str, Any]]:
        if width is None:
            return None
        if width in ("max", "min"):
            return self._choices_of(width)
        if _is_int(width):
            subnets = self.mutator.subnets
            if not 0 <= width < len(subnets):
                raise ConfigError(f"SlimmableNetwork.export: width {width} is not a subnet index (the mutator "
                                  f"lists {len(subnets)} subnets)")
            return subnets[width]
        if isinstance(width, Mapping):
            return dict(width)
        raise ConfigError(f"SlimmableNetwork.export: width must be None, 'max', 'min', a subnet index or a dict "
                          f"{{unit name: choice}}, got {width!r}")

    def _deploy(self, index: int) -> None:
        """mmrazor's deploy: the model becomes the plain export of subnet ``index`` (the mutator keeps the
        slimmable model it prepared; :attr:`model` is the fixed one from now on)."""
        self.model = self.export(index)
        self.is_deployed = True

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """:meth:`BaseAlgorithm.state_dict` plus the step count, the schedule and the generator state (the per-width
        BNs are in the model's state_dict: ``<bn>.candidate_bn.<width>.*``)."""
        state = super().state_dict()
        state.update(iteration=self.iteration, schedule=self.schedule, num_random_samples=self.num_random_samples,
                     generator=self.generator.get_state())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into an algorithm built with the same schedule (else ConfigError naming the
        key, nothing changed)."""
        for key in ("schedule", "num_random_samples"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"SlimmableNetwork.load_state_dict: the checkpoint has {key}={state[key]!r}, "
                                  f"this algorithm {getattr(self, key)!r}")
        generator = state.get("generator")
        if generator is not None and (not isinstance(generator, Tensor) or generator.dtype != torch.uint8):
            raise ConfigError("SlimmableNetwork.load_state_dict: 'generator' must be the uint8 state tensor "
                              "SlimmableNetwork.state_dict saves")
        super().load_state_dict(state)
        self.iteration = int(state.get("iteration", 0))
        if generator is not None:
            self.generator.set_state(generator)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _call(model: nn.Module, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


__all__ = ["SlimmableNetwork"]
