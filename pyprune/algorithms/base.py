"""BaseAlgorithm: a model and its ChannelMutator, driven from a plain PyTorch training loop by explicit hooks."""
from typing import Any, Dict

from torch import nn

from ..errors import ConfigError
from ..registry import MODELS
from .unit_state import importance_state, load_importance_state, restore_selection, selection_state


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``; ``model`` itself otherwise."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


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
    """

    def __init__(self, model: nn.Module, mutator):
        module = unwrap_model(model)
        if not mutator.units:
            if module is not model:
                raise ConfigError("the mutator must be prepared (mutator.prepare_from_supernet(model)) before the "
                                  "model is wrapped in DistributedDataParallel / DataParallel")
            mutator.prepare_from_supernet(module)
        self.model = module
        self.mutator = mutator

    # ------------------------------------------------------------------------------------------------------ hooks
    def after_backward(self) -> None:
        """Call after ``loss.backward()`` (and before ``optimizer.zero_grad()``): gradient-based importance."""
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
        """Per mutable unit: kept channels and accumulated importance. Tensors, ints and dicts only (loadable with
        ``torch.load(weights_only=True)``); the model's weights are not included (save ``model.state_dict()``)."""
        units = self.mutator.mutable_units
        return {"selections": {u.name: selection_state(u) for u in units},
                "importance": {u.name: importance_state(u) for u in units}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: every mutable unit must be present, and no other."""
        units = {u.name: u for u in self.mutator.mutable_units}
        saved = state.get("selections", {})
        missing, unknown = sorted(set(units) - set(saved)), sorted(set(saved) - set(units))
        if missing or unknown:
            raise ConfigError(f"{type(self).__name__}.load_state_dict: the checkpoint's units do not match the "
                              f"mutator's (missing: {missing}, unknown: {unknown})")
        for name, selection in saved.items():
            if not 1 <= selection["index"].numel() <= units[name].num_channels:
                raise ConfigError(f"unit {name}: the checkpoint keeps {selection['index'].numel()} channels, the "
                                  f"unit has {units[name].num_channels}")
        for name, selection in saved.items():
            restore_selection(units[name], selection["index"])
            load_importance_state(units[name], state.get("importance", {}).get(name))
