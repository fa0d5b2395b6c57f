"""Scales an HF model derives from a width, folded into an export's weights so that its reload computes the same.

A model built from a config recomputes in ``__init__`` what it derives from the widths: Gemma (1, 2, 3) multiplies
its token embedding by ``sqrt(hidden_size)`` (``scalar_embed_scale``), T5 its decoder output by ``d_model ** -0.5``
before the tied ``lm_head`` (``model_dim``). An export keeps the values it was trained with, so a reload from the new
config would scale by another number. Each such attribute is listed in :data:`DERIVED_SCALES` with where its factor
applies; :func:`plan_scale_folds` compares the export with the model built from its new config, and the plan's
:meth:`ScaleFolds.apply` gives the export the new values with weights that undo the change:

* a factor on an embedding's output (``'embedding'``): the table times ``old / new``; where the output embeddings
  share that table (a tied ``lm_head``), the logits would grow by the same ratio, so the final norm's output (the
  last norm before the output embeddings) is divided by it;
* a factor on the output embeddings' input (``'logits_input'``): the final norm's output times ``old / new``.

The final norm is scaled through its weight, in the form it has: ``x * weight`` (and bias) or Gemma's
``x * (1 + weight)``, found by a probe on a copy and checked to scale the output exactly. Any other float attribute
that the new config changes is a ConfigError naming the module: no weight is known to undo it.
"""
import copy
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError


def hf_embeddings(model: nn.Module, side: str) -> Optional[nn.Module]:
    """``model.get_input_embeddings()`` (``side='input'``) or ``get_output_embeddings()`` (``'output'``), None where
    the model has none: transformers raises NotImplementedError for families without token tables (Wav2Vec2)."""
    getter = getattr(model, f"get_{side}_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (NotImplementedError, AttributeError):
        return None

__all__ = ["DerivedScale", "DERIVED_SCALES", "ScaleFolds", "plan_scale_folds"]


class DerivedScale(NamedTuple):
    attribute: str  # the module attribute the config derives from a width
    factor: Callable[[float], float]  # the multiplier that value applies
    where: str  # 'embedding': the module's own output; 'logits_input': the input of the model's output embeddings
    applies: Callable[[nn.Module, nn.Module], bool] = lambda module, model: True  # (module, model root)


def _scales_decoder_output(module: nn.Module, model: nn.Module) -> bool:
    # T5 applies model_dim ** -0.5 only when its config says so (the tied-embedding default)
    return module is model and bool(getattr(model.config, "scale_decoder_outputs",
                                            getattr(model.config, "tie_word_embeddings", False)))


DERIVED_SCALES: Tuple[DerivedScale, ...] = (
    DerivedScale("scalar_embed_scale", lambda value: value, "embedding"),  # Gemma: lookup * sqrt(hidden_size)
    DerivedScale("model_dim", lambda value: value ** -0.5, "logits_input", _scales_decoder_output),  # T5
)


class _Fold(NamedTuple):
    module: nn.Module
    rule: DerivedScale
    old: float
    new: float


class ScaleFolds:
    """The folds :func:`plan_scale_folds` found; :meth:`apply` changes the export (nothing before)."""

    def __init__(self, folds: List[_Fold], final_norm: Optional[Tuple[nn.Module, str]], norm_factor: float):
        self.folds, self.final_norm, self.norm_factor = folds, final_norm, norm_factor

    def __bool__(self) -> bool:
        return bool(self.folds)

    @torch.no_grad()
    def apply(self) -> None:
        for fold in self.folds:
            old, new = fold.rule.factor(fold.old), fold.rule.factor(fold.new)
            if fold.rule.where == "embedding":
                # new tensors, not in place: an export may share an unpruned tensor with the dynamic model; the
                # Parameter object stays, so a tied lm_head still holds it
                fold.module.weight.data = fold.module.weight.data * (old / new)
                for key, buffer in list(fold.module._buffers.items()):
                    # Gemma keeps the factor twice: the float and a 0-d buffer the forward multiplies by
                    if buffer is not None and buffer.dim() == 0 and abs(float(buffer) - old) <= 1e-6 * abs(old):
                        fold.module._buffers[key] = torch.full_like(buffer, new)
            setattr(fold.module, fold.rule.attribute, type(fold.old)(fold.new))
        if self.final_norm is not None and self.norm_factor != 1.0:
            _scale_norm(*self.final_norm, self.norm_factor)


def plan_scale_folds(exported: nn.Module, rebuilt: nn.Module) -> ScaleFolds:
    """The folds that make ``exported`` compute as ``rebuilt`` (built from its new config) will once loaded with its
    weights. ConfigError naming the first float attribute that changes and is not in :data:`DERIVED_SCALES`, or a
    fold that needs a final norm the model does not have in a form found."""
    rules = {rule.attribute: rule for rule in DERIVED_SCALES}
    folds: List[_Fold] = []
    for name, module in exported.named_modules():
        try:
            other = rebuilt.get_submodule(name)
        except AttributeError:
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            new = vars(other).get(key)
            if isinstance(new, bool) or not isinstance(new, (int, float)):
                continue
            if abs(new - value) <= 1e-6 * max(abs(value), 1.0):
                continue
            rule = rules.get(key)
            if rule is not None and rule.applies(module, exported):
                folds.append(_Fold(module, rule, value, new))
            elif rule is None and isinstance(value, float):
                raise ConfigError(f"{type(exported).__name__}: {name or 'the model'}.{key} is {value:.6g} in the "
                                  f"export but {new:.6g} in a model built from the new config (derived from a "
                                  "pruned width, and no weight is known to undo it): a reload would compute other "
                                  "outputs")
    norm_factor = 1.0
    output = hf_embeddings(exported, "output")
    for fold in folds:
        ratio = fold.rule.factor(fold.old) / fold.rule.factor(fold.new)
        if fold.rule.where == "logits_input":
            norm_factor *= ratio
        elif output is not None and getattr(output, "weight", None) is fold.module.weight:
            norm_factor /= ratio  # the tied output embeddings grew with the table
    final_norm = None
    if abs(norm_factor - 1.0) > 1e-12:
        final_norm = _final_norm(exported, output, norm_factor)
    return ScaleFolds(folds, final_norm, norm_factor)


def _final_norm(model: nn.Module, output: Optional[nn.Module], factor: float) -> Tuple[nn.Module, str]:
    """(the last norm registered before the output embeddings, over their input width; its weight form)."""
    width = getattr(output, "in_features", None)
    found = None
    for name, module in model.named_modules():
        if module is output:
            break
        weight = module._parameters.get("weight")
        if "norm" in type(module).__name__.lower() and weight is not None and weight.dim() == 1 \
                and weight.shape[0] == width:
            found = (name, module)
    if found is None:
        raise ConfigError(f"{type(model).__name__}: a derived scale changes its logits, and no norm over the "
                          f"{width}-wide input of its output embeddings is found to undo it")
    return found[1], _norm_form(found[0], found[1], factor)


def _norm_form(name: str, norm: nn.Module, factor: float) -> str:
    """``'product'`` (``x * weight``) or ``'offset'`` (``x * (1 + weight)``): the one under which scaling the weight
    scales the output of a copy of ``norm`` by ``factor``."""
    weight = norm._parameters["weight"]
    probe = torch.randn(3, weight.shape[0], dtype=torch.float32, device=weight.device).to(weight.dtype)
    with torch.no_grad():
        expected = norm(probe).float() * factor
        for form in ("product", "offset"):
            trial = copy.deepcopy(norm)
            _scale_norm(trial, form, factor)
            if torch.allclose(trial(probe).float(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())):
                return form
    raise ConfigError(f"{name} ({type(norm).__name__}): its output does not scale with its weight as x * weight or "
                      "x * (1 + weight), so the derived scale cannot be undone there")


@torch.no_grad()
def _scale_norm(norm: nn.Module, form: str, factor: float) -> None:
    weight = norm._parameters["weight"]  # new tensors, as for the embedding table
    weight.data = weight.data * factor if form == "product" else (weight.data + 1.0) * factor - 1.0
    bias = norm._parameters.get("bias")
    if bias is not None:
        bias.data = bias.data * factor
