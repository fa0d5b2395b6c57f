"""Dynamic normalisation layers: batch norm running statistics (against mmrazor's write-back), LayerNorm
subclasses that normalise channels first."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyprune.ops as ops
from helpers import TOL, random_mask, randomize, reference_batch_norm
from models import ChannelsFirstLayerNorm


# ------------------------------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["bn1d", "bn2d"])
def test_batchnorm_training_updates_only_active_running_stats(backend, kind, momentum):
    plain = randomize(nn.BatchNorm1d(8, momentum=momentum) if kind == "bn1d" else
                       nn.BatchNorm2d(8, momentum=momentum))
    reference = copy.deepcopy(plain)
    op = ops.to_dynamic(plain).train()
    reference.train()
    generator = torch.Generator().manual_seed(5)
    for step in range(4):  # the selection changes between steps, as during pruning
        mask = random_mask(8, "random" if step < 3 else "all", generator=generator)
        before = op.running_mean.clone()
        op.set_out_channels(mask)
        x = torch.randn(6, int(mask.sum()), *(() if kind == "bn1d" else (3, 3)))
        torch.testing.assert_close(op(x), reference_batch_norm(reference, mask, x), **TOL)
        torch.testing.assert_close(op.running_mean, reference.running_mean, **TOL)
        torch.testing.assert_close(op.running_var, reference.running_var, **TOL)
        assert torch.equal(op.running_mean[~mask], before[~mask])
        assert int(op.num_batches_tracked) == step + 1 == int(reference.num_batches_tracked)
    op.eval(), reference.eval()
    op.set_out_channels([1, 4, 6])
    x = torch.randn(3, 3, *(() if kind == "bn1d" else (3, 3)))
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 4, 6]] = True
    torch.testing.assert_close(op(x), reference_batch_norm(reference, mask, x), **TOL)


def test_naive_masked_running_stats_lose_the_update():
    """Why the op writes the stats back: F.batch_norm on ``running_mean[mask]`` updates a temporary copy."""
    bn = nn.BatchNorm2d(4).train()
    mask = torch.tensor([True, False, True, False])
    F.batch_norm(torch.randn(2, 2, 3, 3), bn.running_mean[mask], bn.running_var[mask], training=True, momentum=0.5)
    assert torch.count_nonzero(bn.running_mean) == 0  # lost
    op = ops.to_dynamic(bn)
    op.set_out_channels(mask)
    op(torch.randn(2, 2, 3, 3) + 1.0)
    assert torch.count_nonzero(op.running_mean[mask]) == 2 and torch.count_nonzero(op.running_mean[~mask]) == 0


# ------------------------------------------------------------------------------------ channels-first LayerNorm
class NotALayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_channels_first_layer_norm_subclass_is_recognised_by_behaviour():
    assert ops.is_channels_first_layer_norm(ChannelsFirstLayerNorm(6))
    assert not ops.is_channels_first_layer_norm(nn.LayerNorm(6))  # the plain one is channels-last
    assert not ops.is_channels_first_layer_norm(NotALayerNorm(6))
    op = ops.to_dynamic(NotALayerNorm(6))  # not a LayerNorm pyprune knows: served through its own forward
    op.set_out_channels([0, 2, 5])
    x = torch.randn(2, 3)
    torch.testing.assert_close(op(x), 2 * F.layer_norm(x, (3,), op.weight[[0, 2, 5]], op.bias[[0, 2, 5]], op.eps))


def test_channels_first_layer_norm_matches_slicing_and_exports_to_its_own_type():
    torch.manual_seed(0)
    norm = ChannelsFirstLayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    op = ops.to_dynamic(norm)
    kept = torch.tensor([0, 2, 3, 5])
    op.set_out_channels(kept)
    x = torch.randn(2, 4, 3, 3)
    reference = F.layer_norm(x.permute(0, 2, 3, 1), (4,), norm.weight[kept], norm.bias[kept],
                             norm.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(op(x), reference)
    exported = op.export()
    assert type(exported) is ChannelsFirstLayerNorm and exported.normalized_shape == (4,)
    torch.testing.assert_close(exported(x), reference)
