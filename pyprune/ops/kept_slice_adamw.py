"""KeptSliceAdamW: AdamW whose backward and step touch only the channels of the active subnet (for a new subnet
every step); the kept-slice machinery is :mod:`.kept_slice`.

``KeptSliceAdamW(model, lr, betas, eps, weight_decay)`` applies ``torch.optim.AdamW``'s update (decoupled weight
decay, bias-corrected moments) to the kept places of each DynamicOp tensor and leaves the dropped ones alone.

Numerics ("lazy" Adam, as sparse / lazy Adam do for embedding rows):

* **state per parameter**: ``exp_avg`` and ``exp_avg_sq`` full-size (as torch's), and ``step`` a float32 tensor of
  *per-channel step counts*, shaped like the parameter's leading (channel) dims with size-1 trailing dims: ``[O]``
  for a bias / norm weight, ``[O, I, 1, 1]`` for a conv weight, ``[O, I]`` for a linear weight (one count per
  output x input channel pair, since a place is updated exactly when both of its channels are kept);
* **kept places**: the count goes up by one, then torch's AdamW update with that place's count in the bias
  corrections: ``w *= 1 - lr * weight_decay``; ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 * v + (1 - beta2) g^2``;
  ``w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``. With a per-place count, a channel that was
  dropped for a while resumes with the bias correction its own history needs (a global count would under-correct
  moments that have seen few updates);
* **dropped places**: *untouched* - value, moments and count stay as they are (torch's AdamW in gather mode
  instead feeds them a zero gradient: their moments decay, the update keeps moving them, weight decay shrinks them);
* with every channel kept at every step each count equals torch's step, and the result equals ``torch.optim.AdamW``
  up to float rounding (the bias corrections are float32 tensors, where torch computes Python floats: relative
  differences of order 1e-7 per step);
* not supported: ``amsgrad``, ``maximize``, ``capturable`` / ``foreach`` / ``fused`` variants.

``load_state_dict`` also takes a ``torch.optim.AdamW`` state dict (scalar ``step``): the count is broadcast to every
place. A state dict whose tensors do not fit the parameters is refused before anything is loaded.
"""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .kept_slice import KeptSliceOptimizer, KeptSlot

__all__ = ["KeptSliceAdamW", "step_count_shape"]


def step_count_shape(param: Tensor) -> Tuple[int, ...]:
    """Shape of ``param``'s per-channel step counts: its first two dims (the output / input channels a slice keeps),
    size 1 for the rest (``[O]``, ``[O, I]``, ``[O, I, 1, 1]``; ``()`` for a scalar)."""
    return tuple(param.shape[:2]) + (1,) * max(param.dim() - 2, 0)


class KeptSliceAdamW(KeptSliceOptimizer):
    """AdamW over ``model.parameters()`` updating only the active subnet's channels of the DynamicOps' tensors (see
    the module docstring for the numerics). ``lr``, ``betas``, ``eps``, ``weight_decay``: as
    ``torch.optim.AdamW``."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        _check_hyper_parameters(lr, betas, eps, weight_decay)
        super().__init__(model, dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                                     weight_decay=float(weight_decay), amsgrad=False, maximize=False))
        self.register_load_state_dict_pre_hook(_fitted_state_dict)

    def _state_of(self, param: nn.Parameter) -> dict:
        """``param``'s state, created at its first step: zero moments and zero counts."""
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros(step_count_shape(param), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update_group(self, group: dict, plain: List[nn.Parameter], slots: List[KeptSlot]) -> None:
        values, grads, exp_avgs, exp_avg_sqs, counts = [], [], [], [], []
        for p in plain:
            state = self._state_of(p)
            values.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            counts.append(state["step"])
        for slot in slots:
            state = self._state_of(slot.param)
            values.append(slot.value)
            grads.append(slot.grad)
            exp_avgs.append(slot.kept(state["exp_avg"]))
            exp_avg_sqs.append(slot.kept(state["exp_avg_sq"]))
            counts.append(slot.kept(state["step"]))
        if values:
            _adamw_update(values, grads, exp_avgs, exp_avg_sqs, counts, group)


def _adamw_update(values: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                  counts: List[Tensor], group: dict) -> None:
    """torch's AdamW update in place on ``values`` and their moments, with a per-place step count ``counts[i]``
    (float32, broadcastable to ``values[i]``) in the bias corrections. One ``_foreach`` call per arithmetic op for
    the whole list (a per-tensor loop would cost a dozen dispatches per parameter)."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    torch._foreach_add_(counts, 1.0)
    if weight_decay != 0:
        torch._foreach_mul_(values, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # the bias corrections per place, from the counts (float32, exact integers): 1 - beta ** t
    correction1 = torch._foreach_pow(beta1, counts)
    torch._foreach_neg_(correction1)
    torch._foreach_add_(correction1, 1.0)
    correction2 = torch._foreach_pow(beta2, counts)
    torch._foreach_neg_(correction2)
    torch._foreach_add_(correction2, 1.0)
    torch._foreach_sqrt_(correction2)
    # w -= lr / correction1 * m / (sqrt(v) / sqrt(correction2) + eps); the counts broadcast over trailing dims
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, correction2)
    torch._foreach_add_(denom, eps)
    torch._foreach_reciprocal_(correction1)
    torch._foreach_mul_(correction1, lr)  # the step sizes lr / correction1
    update = torch._foreach_mul(exp_avgs, correction1)
    torch._foreach_div_(update, denom)
    torch._foreach_sub_(values, update)


def _check_hyper_parameters(lr, betas, eps, weight_decay) -> None:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for key, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not number(value) or value < 0:
            raise ValueError(f"KeptSliceAdamW: {key} must be a non-negative number, got {type(value).__name__} "
                             f"{value!r}")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"KeptSliceAdamW: betas must be two numbers in [0, 1), got {betas!r}")


def _fitted_state_dict(optimizer: KeptSliceAdamW, state_dict: dict) -> dict:
    """A copy of ``state_dict`` whose ``step`` entries are per-channel counts (a scalar step, as torch's AdamW saves
    it, broadcast); refused with the parameter's position, key and shapes when a tensor does not fit."""
    ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(ids) != len(params):
        return state_dict  # torch's own check names the mismatch of the groups
    by_id = dict(zip(ids, params))
    fitted = {}
    for key, state in state_dict.get("state", {}).items():
        param = by_id.get(key)
        if param is None:
            fitted[key] = state
            continue
        state = dict(state)
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state and tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"KeptSliceAdamW.load_state_dict: parameter {key} has shape {tuple(param.shape)} but "
                                 f"its {name} has shape {tuple(state[name].shape)}")
        if "step" in state:
            step = torch.as_tensor(state["step"], dtype=torch.float32)
            shape = step_count_shape(param)
            if step.dim() == 0:
                step = step.expand(shape).clone()
            elif tuple(step.shape) != shape:
                raise ValueError(f"KeptSliceAdamW.load_state_dict: parameter {key} of shape {tuple(param.shape)} "
                                 f"needs per-channel step counts of shape {shape}, got {tuple(step.shape)}")
            state["step"] = step.to(param.device)
        fitted[key] = state
    return {**state_dict, "state": fitted}
