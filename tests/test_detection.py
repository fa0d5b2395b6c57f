"""A torchvision detector, given its input as detectors take it (a list of ``[3, H, W]`` images of different sizes):
the backbone is pruned, the heads and the RoI-pooled features stay whole, and the export detects the same boxes."""
import warnings

import pytest
import torch

from pyprune.budget import subnet_cost
from pyprune.mutators import ChannelMutator, count_flops
from pyprune.tracing import PruningTraceWarning

torchvision = pytest.importorskip("torchvision")


def detector():
    """Faster R-CNN (MobileNetV3 + FPN) at 128 px, random init; every box scored above 0 is kept so the heads run
    and the outputs are not empty."""
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=20).eval()


def assert_same_detections(model, mutator, images):
    with torch.no_grad():
        dynamic = model(images)
        exported = mutator.export(model).eval()(images)
    assert [d["boxes"].shape for d in dynamic] == [(20, 4), (20, 4)]
    for got, want in zip(exported, dynamic):
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=1e-4)


@pytest.mark.slow  # about 15 s of CPU time: a parse of the whole detector and four of its forwards
def test_faster_rcnn_prunes_its_backbone_and_detects_the_same_after_export():
    model = detector()
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=images))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mutator.prepare_from_supernet(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, PruningTraceWarning)]
    # MultiScaleRoIAlign writes the pooled FPN features into a zeros buffer: those channels stay whole, said so
    assert any("op 'setitem'" in m and "roi_heads.box_roi_pool" in m for m in messages)
    fixed = {u.name for u in mutator.units if not u.is_mutable}
    for head in ("rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
                 "roi_heads.box_predictor.bbox_pred", "backbone.fpn.layer_blocks.1.0"):
        assert any(name.startswith(head + "_") for name in fixed), head
    mutable = {u.name for u in mutator.mutable_units}
    assert "backbone.fpn.inner_blocks.1.0_(0, 256)_256" in mutable and "roi_heads.box_head.fc6_(0, 1024)_1024" \
        in mutable and sum(name.startswith("backbone.body.") for name in mutable) >= 25
    mutator.set_global_ratio(0.5)
    assert_same_detections(model, mutator, images)
    # the cost model counts one forward of the list of images, without exporting: what the export costs
    assert subnet_cost(model, mutator).flops == count_flops(mutator.export(model), images)
    torch.manual_seed(1)
    mutator.set_choices(mutator.sample_choices())
    assert_same_detections(model, mutator, images)
