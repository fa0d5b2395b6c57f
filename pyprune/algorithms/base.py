"""BaseAlgorithm: a model and its ChannelMutator, driven from a plain PyTorch training loop by explicit hooks."""
import contextlib
import warnings
from typing import Any, Dict, Optional

from torch import nn

from ..errors import ConfigError
from ..ops.compact import CompactTraining, Optimizers, compact_training
from ..registry import MODELS
from ..utils.modules import unwrap_model  # re-exported here: pyprune.algorithms.unwrap_model
from .unit_state import importance_state, learns_importance, load_importance_state, selections_of_old_checkpoint


@MODELS.register_module()
class BaseAlgorithm:
    """Owns ``model`` and the ``mutator`` that prunes it; no trainer is imposed. Use it like this::

        algorithm = ItePruneAlgorithm(model, mutator, ...)   # prepares the model if the mutator is not prepared yet
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad(); loss.backward()
            algorithm.after_backward()                       # importance units accumulate from the gradients
            optimizer.step()
            algorithm.step()                                 # an iteration ended: prune if it is time
        algorithm.epoch_end()                                # an epoch ended (used with by_epoch=True)
        small = algorithm.export()                           # a plain, physically smaller nn.Module

    ``model`` may be wrapped in ``DistributedDataParallel``; the algorithm works on the module inside. The mutator
    must then be prepared *before* wrapping (DDP registers the parameters of the modules it sees at wrap time).

    As in mmrazor, both may be configs: ``architecture`` an ``nn.Module`` or a dict that
    :data:`pyprune.registry.MODELS` builds, ``mutator_cfg`` a :class:`~pyprune.mutators.ChannelMutator` or its config
    dict (default: mmrazor's, a ChannelMutator of SequentialMutableChannelUnit). mmrazor's ``data_preprocessor`` and
    ``init_cfg`` are accepted for config compatibility; pyprune's algorithms do not run the forward or initialise
    weights, so a value other than None is kept as an attribute and named in a warning.
    """

    def __init__(self, architecture, mutator_cfg=None, *, data_preprocessor=None, init_cfg: Optional[Dict] = None):
        model = MODELS.build(architecture)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{type(self).__name__}: architecture must be an nn.Module or a config dict building "
                              f"one, got {type(model).__name__}")
        mutator = build_mutator(mutator_cfg)
        unused = [name for name, value in (("data_preprocessor", data_preprocessor), ("init_cfg", init_cfg))
                  if value is not None]
        if unused:
            warnings.warn(f"{type(self).__name__}: {', '.join(unused)} ignored: pyprune algorithms do not run the "
                          f"forward or initialise weights (preprocess in your loop; load weights before)",
                          stacklevel=2)
        self.data_preprocessor, self.init_cfg = data_preprocessor, init_cfg
        module = unwrap_model(model)
        if not mutator.units:
            if module is not model:
                raise ConfigError("the mutator must be prepared (mutator.prepare_from_supernet(model)) before the "
                                  "model is wrapped in DistributedDataParallel / DataParallel")
            mutator.prepare_from_supernet(module)
        self.model = module
        self.mutator = mutator
        self.compact: Optional[CompactTraining] = None  # see start_compact_training

    @property
    def architecture(self) -> nn.Module:
        """The model being pruned (mmrazor's name for :attr:`model`)."""
        return self.model

    # ------------------------------------------------------------------------------------------- compact training
    def start_compact_training(self, optimizers: Optimizers) -> CompactTraining:
        """Train the current subnet in compact mode from now on (:mod:`pyprune.ops.compact`): the pruned layers'
        tensors *are* the compact ones, so a step costs what the exported model's costs; ``optimizers`` (those that
        step the model) keep working, their state following every structure change. The algorithm changes
        selections and ranks gradients with full-size tensors (:meth:`full_size`) and compacts again after.
        Under DistributedDataParallel rebuild the wrapper (``pyprune.ops.compact.rebuild_ddp``) whenever
        :meth:`step` / :meth:`epoch_end` returned True. Returns the session (``.exit()`` ends it, or
        :meth:`stop_compact_training`)."""
        if self.compact is not None and self.compact.active:
            raise ConfigError(f"{type(self).__name__}: compact training is already on")
        self.compact = compact_training(self.model, optimizers)
        return self.compact

    def stop_compact_training(self) -> None:
        """Back to gather mode: every value written back into the full-size tensors."""
        if self.compact is not None:
            self.compact.exit()
            self.compact = None

    @property
    def compact_training(self) -> bool:
        """Whether the model trains in compact mode right now."""
        return self.compact is not None and self.compact.active

    @contextlib.contextmanager
    def full_size(self):
        """Full-size tensors (weights, gradients, optimizer state) inside the block when compact training is on,
        compact again after it (with the then-current selection); nothing to do otherwise."""
        if not self.compact_training:
            yield
            return
        with self.compact.paused():
            yield

    # ------------------------------------------------------------------------------------------------------ hooks
    def after_backward(self) -> None:
        """Call after ``loss.backward()`` (and before ``optimizer.zero_grad()``): gradient-based importance."""
        if self.compact_training and any(learns_importance(u) for u in self.mutator.mutable_units):
            with self.full_size():  # gradient importance (Taylor) reads full-size gradients and weights
                self.mutator.update_importance()
        else:
            self.mutator.update_importance()

    def step(self) -> bool:
        """Call at the end of every training iteration; returns whether the structure changed."""
        return False

    def epoch_end(self) -> bool:
        """Call at the end of every training epoch; returns whether the structure changed."""
        return False

    def export(self) -> nn.Module:
        """A copy of the model at its current width with plain layers (the algorithm's model is unchanged)."""
        return self.mutator.export(self.model)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """``{'selections': every unit's kept channels, in the one saved form the model's state_dict carries too
        (:meth:`ChannelMutator.selection_state`), 'importance': per mutable unit its accumulated importance}``.
        Tensors, ints and dicts only (loadable with ``torch.load(weights_only=True)``); the model's weights are not
        included (save ``model.state_dict()``)."""
        return {"selections": self.mutator.selection_state(),
                "importance": {u.name: importance_state(u) for u in self.mutator.mutable_units}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: its selections must name the mutator's units, every one and no
        other, each a sound selection for its unit (else ConfigError naming the unit, nothing changed)."""
        saved = selections_of_old_checkpoint(self.mutator.units, state.get("selections", {}))
        with self.full_size():  # validated first (nothing changes on a refusal), then applied in one pass
            self.mutator.load_selection_state(saved, f"{type(self).__name__}.load_state_dict")
            for unit in self.mutator.mutable_units:
                load_importance_state(unit, state.get("importance", {}).get(unit.name))


DEFAULT_MUTATOR_CFG = {"type": "ChannelMutator", "channel_unit_cfg": {"type": "SequentialMutableChannelUnit"}}


def build_model_and_mutator(owner: str, architecture, mutator_cfg, default_cfg, mutator_type):
    """``(model, mutator)`` for an algorithm that needs its own mutator type: the model first, then the mutator, as
    :class:`BaseAlgorithm` builds them (the same seed gives the same weights); the mutator's type is checked before
    the model is prepared. ``mutator_cfg``: a mutator or its config; None builds ``default_cfg``. A mutator of
    another type -> ConfigError naming ``owner``."""
    model = MODELS.build(architecture)
    mutator = build_mutator(dict(default_cfg) if mutator_cfg is None else mutator_cfg)
    if not isinstance(mutator, mutator_type):
        raise ConfigError(f"{owner}: the mutator must be a {mutator_type.__name__} (or its config), got "
                          f"{type(mutator).__name__}")
    return model, mutator


def build_mutator(mutator_cfg):
    """A ChannelMutator from a config dict (built through :data:`pyprune.registry.MODELS`), or the one given."""
    from ..mutators import ChannelMutator
    mutator = MODELS.build(dict(DEFAULT_MUTATOR_CFG) if mutator_cfg is None else mutator_cfg)
    if not isinstance(mutator, ChannelMutator):
        raise ConfigError(f"mutator_cfg must be a ChannelMutator or a config dict building one, got "
                          f"{type(mutator).__name__}")
    return mutator
