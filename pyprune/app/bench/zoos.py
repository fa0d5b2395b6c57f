"""Model zoos for the coverage sweep: every torchvision model (all tasks) and the smallest timm model of every module.

Each zoo lists model names and builds one randomly initialised model (no download) with an example input it takes:
``build(name) -> ZooModel(model, inputs, trains)``. ``inputs`` is a :class:`~pyprune.tracing.example_inputs.CallArgs`
(detection models take a list of images, optical flow two frames); ``trains`` says whether the model can run a
training step on ``inputs`` alone (detection models need targets for that, so their exports are checked in eval).
"""
from typing import Callable, Dict, List, NamedTuple

import torch
from torch import nn

from ...tracing.example_inputs import CallArgs
from . import transformers_zoo

__all__ = ["ZooModel", "ZOOS", "zoo_names", "build", "torchvision_classifiers"]

NUM_CLASSES = 10


class ZooModel(NamedTuple):
    model: nn.Module
    inputs: CallArgs
    trains: bool = True


# ------------------------------------------------------------------------------------------------- torchvision
def torchvision_classifiers() -> List[str]:
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_names() -> List[str]:
    import torchvision
    return torchvision.models.list_models()


def _classifier(name: str) -> ZooModel:
    """The smallest input ``[2, 3, S, S]`` each classifier takes: ViTs are built for a 2x2 patch grid; MaxViT needs
    224 px (every stage's grid splits into 7x7 windows); Inception-v3's train-mode aux head needs 299 px. The
    quantizable float models (``quantized_*``) take what their float model takes."""
    import torchvision
    kwargs, size = {}, 64
    base = name.removeprefix("quantized_")
    if base.startswith("vit_"):
        patch = 14 if base.endswith("_14") else int(base[-2:])
        kwargs["image_size"] = size = 2 * patch
    elif base == "maxvit_t":
        size = 224
    elif base == "inception_v3":
        size = 299
    if base in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = False  # scipy's truncated-normal init is slow; the aux heads stay
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)
    return ZooModel(model, CallArgs((torch.randn(2, 3, size, size),), {}))


def _detector(name: str) -> ZooModel:
    """Two 128 px images (the R-CNN / RetinaNet / FCOS transforms are told not to upscale them); SSD resizes to
    its own size. Eval only: a training step needs box targets."""
    import torchvision
    kwargs = {"weights_backbone": None, "num_classes": 3}
    if not name.startswith("ssd"):
        kwargs.update(min_size=128, max_size=128)
    # keep every box: a random-init detector scores below the default thresholds and would compare empty outputs
    kwargs["box_score_thresh" if "rcnn" in name else "score_thresh"] = 0.0
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    images = [torch.rand(3, 128, 128), torch.rand(3, 112, 128)]
    return ZooModel(model, CallArgs((images,), {}), trains=False)


def _segmenter(name: str) -> ZooModel:
    import torchvision
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    return ZooModel(model, CallArgs((torch.randn(2, 3, 64, 64),), {}))


def _video(name: str) -> ZooModel:
    """MViT's position embeddings fix 16 frames of 224 px, S3D's last pool 16 frames of 224 px; the 3D ResNets and
    Swin3D take short clips."""
    import torchvision
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    if name.startswith("mvit"):
        clip = torch.randn(1, 3, 16, 224, 224)
    elif name == "s3d":
        clip = torch.randn(1, 3, 16, 224, 224)  # its last pool is a fixed (2, 7, 7) window
    else:
        clip = torch.randn(2, 3, 8, 64, 64)
    return ZooModel(model, CallArgs((clip,), {}))


def _optical_flow(name: str) -> ZooModel:
    import torchvision
    model = torchvision.models.get_model(name, weights=None)
    frames = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
    return ZooModel(model, CallArgs(frames, {"num_flow_updates": 2}))


def _torchvision(name: str) -> ZooModel:
    import torchvision.models as models
    for module, make in ((models.detection, _detector), (models.segmentation, _segmenter), (models.video, _video),
                         (models.optical_flow, _optical_flow)):
        if name in models.list_models(module=module):
            return make(name)
    return _classifier(name)  # classification, quantization (built as float models)


# ------------------------------------------------------------------------------------------------------- timm
def _timm_names() -> List[str]:
    from .timm_zoo import TIMM_ZOO
    return list(TIMM_ZOO)


def _timm(name: str) -> ZooModel:
    """At its ``pretrained_cfg`` input size (fixed-size models, e.g. Swin V2 at 256 px, need exactly that)."""
    import timm
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    channels, height, width = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return ZooModel(model, CallArgs((torch.randn(2, channels, height, width),), {}))


# ----------------------------------------------------------------------------------------------- transformers
def _transformers(name: str) -> ZooModel:
    """A small config of every HF family (:mod:`.transformers_zoo`), with its keyword demo input."""
    return ZooModel(*transformers_zoo.build_family(name))


# A zoo may bring its own row ("sweep": (name, ratio) -> row) and table ("columns"): the transformers zoo adds
# the non-embedding share, the optimizer step and the from_pretrained reload.
ZOOS: Dict[str, Dict[str, Callable]] = {
    "torchvision": {"names": _torchvision_names, "build": _torchvision},
    "torchvision-classifiers": {"names": torchvision_classifiers, "build": _classifier},
    "timm": {"names": _timm_names, "build": _timm},
    "transformers": {"names": transformers_zoo.family_names, "build": _transformers,
                     "sweep": transformers_zoo.sweep_family, "columns": transformers_zoo.HF_COLUMNS},
}


def zoo_names(zoo: str) -> List[str]:
    """The model names of ``zoo`` (a key of :data:`ZOOS`)."""
    return ZOOS[zoo]["names"]()


def build(zoo: str, name: str, seed: int = 0) -> ZooModel:
    """Model ``name`` of ``zoo``, randomly initialised with ``seed``, with its example input."""
    torch.manual_seed(seed)
    return ZOOS[zoo]["build"](name)
