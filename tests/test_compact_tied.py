"""Compact training mode on layers that share a tensor (tied input / output embeddings), and on a HF Llama.

Layers sharing a tensor compact together when they keep the same channels of it: one compact tensor, one gradient,
one optimizer state, as in the exported model (which keeps the tie). Compared at fp32 with the same seed and data:
compact and gather steps (and the exported model's) run the same compact weights through the same torch calls, so
the tolerance is 1e-5 relative and 1e-6 absolute (attention's softmax and RMSNorm's rsqrt reorder nothing here; in
practice the results are bitwise equal).
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.mutators import ChannelMutator
from pyprune.ops import compact_training, to_dynamic
from pyprune.ops.compact import release_compact

transformers = pytest.importorskip("transformers")

CLOSE = dict(rtol=1e-5, atol=1e-6)


def tied_pair(keep_first=3, keep_second=3):
    """Two 6x6 dynamic linears holding one weight; each keeps ``keep_*`` rows and 3 columns of it."""
    torch.manual_seed(0)
    first, second = to_dynamic(nn.Linear(6, 6)), to_dynamic(nn.Linear(6, 6))
    second.weight = first.weight
    first.set_out_channels(keep_first)
    second.set_out_channels(keep_second)
    for layer in (first, second):
        layer.set_in_channels(3)
    return nn.Sequential(first, second)


def sgd_steps(model, optimizer, steps=3):
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_layers_keeping_the_same_channels_of_a_shared_tensor_compact_together():
    model, reference = tied_pair(), tied_pair()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stays in gather mode"
        session = compact_training(model, optimizer)
    first, second = model
    assert session.layers == ["0", "1"] and first.weight is second.weight and first.weight.shape == (3, 3)
    assert session.compact_parameters == 9 + 3 + 3  # the shared weight counted once, and both biases
    sgd_steps(model, optimizer)
    sgd_steps(reference, reference_optimizer)
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), reference(x), **CLOSE)
    assert optimizer.state[first.weight]["momentum_buffer"].shape == (3, 3)
    state = model.state_dict()
    assert state["0.weight"].shape == state["1.weight"].shape == (6, 6)
    torch.testing.assert_close(state["0.weight"], reference.state_dict()["0.weight"], **CLOSE)
    with session.paused():  # both full, then a new (agreeing) selection for both
        assert first.weight.shape == (6, 6)
        for layer in model:
            layer.set_in_channels(2)
    assert first.weight.shape == (3, 2) and session.layers == ["0", "1"]
    session.exit()
    assert first.weight.shape == (6, 6) and first.weight is second.weight
    torch.testing.assert_close(first.weight[:3, :3], reference[0].weight[:3, :3], **CLOSE)


def test_a_selection_change_reaching_peers_one_by_one_compacts_them_when_they_agree_again():
    model = tied_pair()
    session = compact_training(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first, second = model
    first.set_in_channels(2)  # now they disagree: both full-size, gathering
    assert session.layers == [] and first.weight.shape == (6, 6)
    x = torch.randn(2, 2)
    torch.testing.assert_close(model[0](x), F.linear(x, first.weight[:3, :2], first.bias[:3]))
    second.set_in_channels(2)  # they agree again
    assert session.layers == ["0", "1"] and first.weight.shape == (3, 2)
    session.exit()


def test_layers_keeping_other_channels_of_a_shared_tensor_stay_in_gather_mode():
    model = tied_pair(keep_first=3, keep_second=2)
    with pytest.warns(UserWarning, match=r"0 shares tensors with \['1'\], which keep other channels of them"):
        session = compact_training(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert session.layers == [] and model[0].weight.shape == (6, 6)
    x = torch.randn(2, 3)
    expected = F.linear(F.linear(x, model[0].weight[:3, :3], model[0].bias[:3])[:, :3], model[0].weight[:2, :3],
                        model[1].bias[:2])
    torch.testing.assert_close(model(x), expected)
    session.exit()


# ------------------------------------------------------------------------------------------------------- Llama
def tiny_llama():
    """A tied, GQA Llama (2 query heads per KV head) from a config, prepared; its mutator at ratio 0.5."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True, use_cache=False)
    model = transformers.LlamaForCausalLM(config)
    mutator = ChannelMutator(channel_unit_cfg=dict(type="SequentialMutableChannelUnit",
                                                   default_args=dict(choice_mode="ratio")),
                             parse_cfg=dict(demo_input={"input_ids": torch.zeros(1, 8, dtype=torch.int64)}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's fallback to a recorded forward
        mutator.prepare_from_supernet(model)
    mutator.set_global_ratio(0.5)
    return model, mutator


def lm_loss(model, ids):
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_a_compact_llama_step_equals_the_exported_models():
    model, mutator = tiny_llama()
    exported = mutator.export(copy.deepcopy(model))
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # the export keeps the tie
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    exported_optimizer = torch.optim.AdamW(exported.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer compact, the tied ones too
        session = compact_training(model, optimizer)
    assert "lm_head" in session.layers and "model.embed_tokens" in session.layers
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    for step in range(2):
        for m, opt in ((model, optimizer), (exported, exported_optimizer)):
            opt.zero_grad()
            m.train()
            loss = lm_loss(m, ids)
            loss.backward()
            if m is model:
                compact_loss = loss.detach()
        torch.testing.assert_close(compact_loss, loss.detach(), **CLOSE)
        ours, theirs = dict(model.named_parameters()), dict(exported.named_parameters())
        assert ours.keys() == theirs.keys()
        for name, param in ours.items():  # compact tensors, compact gradients: the export's shapes and values
            assert param.shape == theirs[name].shape, name
            torch.testing.assert_close(param.grad, theirs[name].grad, **CLOSE, msg=name)
        optimizer.step()
        exported_optimizer.step()
    # the state_dict is full-size and loads into a freshly prepared model with the same logits
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh, _ = tiny_llama()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    model.eval(), fresh.eval(), exported.eval()
    with torch.no_grad():
        expected = exported(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, **CLOSE)
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, **CLOSE)
    model.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))  # loaded in compact mode
    assert "lm_head" in session.layers and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, **CLOSE)
    copied = copy.deepcopy(model)  # a copy made in compact mode is compact on its own; released, it is full
    release_compact(copied)
    assert copied.lm_head.weight is copied.model.embed_tokens.weight
    assert copied.lm_head.weight.shape == (64, 32)
    session.exit()
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, **CLOSE)


def test_a_llama_selection_change_straight_through_the_mutator_stays_compact_and_exact():
    model, mutator = tiny_llama()
    session = compact_training(model, torch.optim.SGD(model.parameters(), lr=0.1))
    layers = set(session.layers)
    # each op writes back and re-compacts itself; a count equal to the compact one is no "keep all" (an RMSNorm's
    # channel count is its full weight's)
    mutator.set_choices(mutator.current_choices)
    assert set(session.layers) == layers and model.model.norm.weight.shape == (16,)
    mutator.set_global_ratio(0.75)
    assert set(session.layers) == layers and model.model.norm.weight.shape == (24,)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    exported = mutator.export(copy.deepcopy(model)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, exported(input_ids=ids).logits, **CLOSE)
    session.exit()
    assert model.model.norm.weight.shape == (32,)
