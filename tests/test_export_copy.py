"""An export is a copy: it never shares storage with the dynamic model, whatever it keeps whole.

``mutator.export`` / ``full_width_export`` let the model's copy refer to the dynamic layers' full tensors (each layer
is replaced by its compact copy straight away, so copying them first would double the memory of a large model); these
tests hold the other half of that bargain: nothing of the original is left in the result, and training the export
does not touch the original.
"""
import pytest
import torch
import torchvision

from pyprune.mutators import ChannelMutator, full_width_export


def _storages(module):
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


@pytest.mark.parametrize("ratios", ["half", "mixed", "full"])
def test_the_export_shares_no_storage_with_the_model(ratios):
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    mutator = ChannelMutator(channel_unit_cfg="L1MutableChannelUnit", parse_cfg=dict(demo_input=x))
    mutator.prepare_from_supernet(model)
    units = mutator.mutable_units
    choice = {"half": lambda i: 0.5, "mixed": lambda i: 0.5 if i % 2 else 1.0, "full": lambda i: 1.0}[ratios]
    mutator.set_choices({u.name: choice(i) for i, u in enumerate(units)})
    with torch.no_grad():
        expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    for exported in (mutator.export(model), full_width_export(model)):
        assert not _storages(exported) & _storages(model)
        with torch.no_grad():
            for parameter in exported.parameters():
                parameter.add_(1.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the selection entries are not tensors
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
