"""What every layer of pyprune may ask of a model without knowing how it is wrapped."""
from torch import nn

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``; ``model`` itself otherwise.

    One level: a wrapper's ``module`` is what holds the parameters, buffers and the layers pyprune prepares.
    """
    return model.module if isinstance(model, _WRAPPERS) else model


__all__ = ["unwrap_model"]
