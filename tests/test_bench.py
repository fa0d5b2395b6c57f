"""Benchmarks: the mmrazor-style reference computes the right subnet, and the quick runs produce complete outputs.

These tests check outputs, never timings (the CI machine is shared).
"""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import TinyTransformer
from pyprune.app.bench import mmrazor_reference as ref
from pyprune.app.bench import model_bench
from pyprune.app.bench import kernel_bench as op_bench
from pyprune.app.bench.timing import count_syncs, measure
from pyprune.errors import ConfigError


def _sorted_index(n, keep, generator):
    return torch.randperm(n, generator=generator)[:keep].sort().values


def _mask(index, n):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask


def _set_single_masks(layer, in_index, out_index):
    for container, index in ((layer.in_container, in_index), (layer.out_container, out_index)):
        channel = ref.MaskChannel(container.num_channels)
        channel.set_mask(_mask(index, container.num_channels))
        container.register(channel, 0, container.num_channels)


# ---------------------------------------------------------------------------------------------- reference layers
@pytest.mark.parametrize("groups", [1, 8, 16], ids=["dense", "grouped", "depthwise"])
def test_reference_conv_equals_conv_on_gathered_weight(groups):
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=True)
    layer = ref.to_reference_layer(conv, "conv")
    if groups == 16:  # depthwise: in and out are one selection
        out_index = in_index = _sorted_index(16, 6, generator)
        weight = conv.weight[out_index]
    elif groups == 8:  # keep one of the two channels of every group, both dims
        out_index = torch.arange(0, 16, 2)
        in_index = torch.arange(1, 16, 2)
        weight = conv.weight[out_index][:, 1:2]  # global in channel 2g+1 is local column 1 of group g
    else:
        out_index, in_index = _sorted_index(16, 5, generator), _sorted_index(16, 11, generator)
        weight = conv.weight[out_index][:, in_index]
    _set_single_masks(layer, in_index, out_index)
    x = torch.randn(2, len(in_index), 6, 6)
    active_groups = len(in_index) if groups == 16 else groups
    expected = F.conv2d(x, weight, conv.bias[out_index], padding=1, groups=active_groups)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_reference_grouped_conv_rejects_uneven_groups():
    layer = ref.to_reference_layer(nn.Conv2d(8, 8, 1, groups=2), "blocks.0.conv")
    _set_single_masks(layer, torch.arange(8), torch.tensor([0, 1, 2, 4]))  # 3 + 1 out channels per group
    with pytest.raises(ConfigError, match="blocks.0.conv"):
        layer(torch.randn(1, 8, 2, 2))


def test_reference_linear_equals_linear_on_gathered_weight():
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(12, 10)
    layer = ref.to_reference_layer(linear)
    out_index, in_index = _sorted_index(10, 4, generator), _sorted_index(12, 7, generator)
    _set_single_masks(layer, in_index, out_index)
    x = torch.randn(3, 7)
    expected = F.linear(x, linear.weight[out_index][:, in_index], linear.bias[out_index])
    torch.testing.assert_close(layer(x), expected)


def test_reference_batchnorm_updates_only_active_running_stats():
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_()
    bn.running_var.uniform_(0.5, 1.5)
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    layer = ref.to_reference_layer(bn, "bn")
    active = torch.tensor([1, 2, 5])
    _set_single_masks(layer, active, active)
    x = torch.randn(4, 3, 5, 5)

    compact = nn.BatchNorm2d(3)
    compact.running_mean.copy_(before_mean[active])
    compact.running_var.copy_(before_var[active])
    compact.weight.data.copy_(bn.weight[active])
    compact.bias.data.copy_(bn.bias[active])
    torch.testing.assert_close(layer.train()(x), compact.train()(x))

    torch.testing.assert_close(bn.running_mean[active], compact.running_mean)
    torch.testing.assert_close(bn.running_var[active], compact.running_var)
    inactive = torch.tensor([0, 3, 4])
    assert torch.equal(bn.running_mean[inactive], before_mean[inactive])
    assert torch.equal(bn.running_var[inactive], before_var[inactive])
    assert int(layer.num_batches_tracked) == 1


def test_reference_layernorm_normalises_over_active_channels():
    norm = nn.LayerNorm(8)
    nn.init.normal_(norm.weight)
    layer = ref.to_reference_layer(norm)
    active = torch.tensor([0, 3, 4, 7])
    _set_single_masks(layer, active, active)
    x = torch.randn(2, 5, 4)
    expected = F.layer_norm(x, (4,), norm.weight[active], norm.bias[active], norm.eps)
    torch.testing.assert_close(layer(x), expected)


def test_mask_container_concatenates_pieces_and_fills_gaps():
    container = ref.MaskContainer(10)
    first = ref.MaskChannel(3)
    first.set_prefix(1)
    derived = ref.ExpandedMaskChannel(ref.MaskChannel(2), expand=2)
    derived.source.set_mask(torch.tensor([False, True]))
    container.register(first, 0, 3)
    container.register(derived, 5, 9)
    expected = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(container.current_mask, expected)


def test_mask_container_rejects_range_of_wrong_width():
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        ref.MaskContainer(8).register(ref.MaskChannel(3), 0, 4)


def test_reference_layer_for_unknown_module_names_it():
    with pytest.raises(ConfigError, match="features.3"):
        ref.to_reference_layer(nn.PReLU(), "features.3")


def test_reference_layer_shares_parameters_and_leaves_source_unchanged():
    conv = nn.Conv2d(4, 4, 1)
    layer = ref.to_reference_layer(conv)
    assert layer.weight is conv.weight
    assert type(conv) is nn.Conv2d and not hasattr(conv, "out_container")


# ------------------------------------------------------------------------------------------------------- timing
def test_measure_reports_every_repetition_and_their_median():
    calls = []
    result = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=3, inner=4)
    assert len(calls) == 2 + 3 * 4
    assert len(result.times_s) == 3 and all(t >= 0 for t in result.times_s)
    assert min(result.times_s) <= result.median_s <= max(result.times_s)
    assert result.syncs_per_call is None  # no CUDA: no sync counting


def test_measure_rejects_zero_repetitions():
    with pytest.raises(ValueError, match="reps"):
        measure(lambda: None, torch.device("cpu"), reps=0)


def test_count_syncs_is_none_off_cuda():
    assert count_syncs(lambda: torch.ones(3).sum().item(), torch.device("cpu")) is None


# -------------------------------------------------------------------------------------------------- gather bench
def test_gather_bench_quick_covers_every_case_and_method():
    rows = op_bench.bench_gather(torch.device("cpu"), quick=True, warmup=0, reps=1)
    cases = op_bench.gather_cases(torch.device("cpu"), quick=True)
    assert len(rows) == len(cases) * len(op_bench.GATHER_METHODS)
    assert {r["kind"] for r in rows} == {"1-D", "linear", "conv"}
    for row in rows:
        if row["status"] == "ok":
            assert math.isfinite(row["median_us"]) and row["median_us"] > 0
            assert row["GB_per_s"] > 0
        else:
            assert row["method"] == "pyprune-ext" and not op_bench.extension_available()


# ------------------------------------------------------------------------------- against pyprune's DynamicOps

@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_reference_model_runs_the_same_subnet_as_the_dynamic_model(ratio):
    model = model_bench.TinyNet()
    mutator = model_bench.prepare(model, image_size=16)
    mutator.set_global_ratio(ratio)
    reference = ref.build_reference_model(model, mutator)
    assert ref.reference_layers(reference.model), "no DynamicOp was swapped"
    x = torch.randn(4, 3, 16, 16)
    model.eval(), reference.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference.model(x), model(x), rtol=1e-4, atol=1e-5)
    # Training mode: batch statistics and the running-stat write-back must agree too.
    model.train(), reference.model.train()
    torch.testing.assert_close(reference.model(x), model(x), rtol=1e-4, atol=1e-5)
    dyn_bn = dict(model.named_modules())["expand.1"]
    ref_bn = dict(reference.model.named_modules())["expand.1"]
    torch.testing.assert_close(ref_bn.running_mean, dyn_bn.running_mean)
    torch.testing.assert_close(ref_bn.running_var, dyn_bn.running_var)


@pytest.mark.parametrize("make_model, size", [(lambda: model_bench.TinyNet(), 16),
                                              (lambda: TinyTransformer(), 8)],  # units balanced over 2 heads
                         ids=["TinyNet", "TinyTransformer"])
def test_reference_model_follows_unit_prefix_switches(make_model, size):
    torch.manual_seed(0)
    model = make_model().eval()
    mutator = model_bench.prepare(model, image_size=size)
    reference = ref.build_reference_model(model, mutator)
    reference.model.eval()
    x = torch.randn(2, 3, size, size)
    for _ in range(3):
        mutator.set_choices(mutator.sample_choices())
        reference.set_unit_prefixes(model_bench._unit_prefix_counts(mutator))
        with torch.no_grad():
            torch.testing.assert_close(reference.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_reference_from_op_matches_dynamic_conv():
    from pyprune.ops import to_dynamic
    op = to_dynamic(nn.Conv2d(8, 12, 3, padding=1))
    op.set_in_channels([0, 2, 3, 7])
    op.set_out_channels(0.5)
    layer = ref.reference_from_op(op, "conv")
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), op(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- quick runs
def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_positive_finite(value, where):
    number = float(value)
    assert math.isfinite(number) and number > 0, f"{where}: time {value!r} is not positive and finite"


def test_quick_ops_run_writes_every_method_and_ratio(tmp_path, capsys):
    from pyprune.app.bench import main
    assert main(["ops", "--quick", "--out", str(tmp_path)]) == 0
    layers = _read_csv(tmp_path / "ops_layers.csv")
    for variant in op_bench.LAYER_VARIANTS:
        for ratio in op_bench.RATIOS:
            rows = [r for r in layers if r["variant"] == variant and float(r["ratio"]) == ratio]
            assert len(rows) == len(op_bench.LAYER_WORKLOADS) * 2, (variant, ratio)
            for row in rows:
                if row["status"] == "ok":
                    _assert_positive_finite(row["median_ms"], f"{variant} {ratio}")
                else:
                    assert variant == "pyprune-ext" and not op_bench.extension_available()
    assert (tmp_path / "ops_layers.png").stat().st_size > 0
    assert json.loads((tmp_path / "ops.json").read_text())["header"]["torch"] == torch.__version__
    assert "channel gather" in capsys.readouterr().out


def test_quick_models_run_writes_every_backend_and_ratio(tmp_path, capsys):
    from pyprune.app.bench import main
    assert main(["models", "--quick", "--out", str(tmp_path)]) == 0
    rows = _read_csv(tmp_path / "models.csv")
    cfg = model_bench.quick_config(torch.device("cpu"))
    for backend in model_bench.BACKENDS:
        for ratio in cfg.ratios:
            for workload in model_bench.WORKLOADS:
                match = [r for r in rows if r["backend"] == backend and r["ratio"] == str(ratio)
                         and r["workload"] == workload]
                assert len(match) == 1, (backend, ratio, workload)
                if backend == "pyprune-ext" and not op_bench.extension_available():
                    assert match[0]["status"].startswith("skipped")
                    continue
                assert match[0]["status"] == "ok", match[0]["status"]
                _assert_positive_finite(match[0]["median_ms"], f"{backend} {ratio} {workload}")
                _assert_positive_finite(match[0]["vs_dense"], f"{backend} {ratio} {workload}")
    switch = {r["backend"]: r for r in rows if r["workload"] == "switch"}
    for backend in ("pyprune-torch", "mmrazor-ref", "dense"):
        _assert_positive_finite(switch[backend]["median_ms"], f"switch {backend}")
    payload = json.loads((tmp_path / "models.json").read_text())
    assert {"device", "torch", "date"} <= set(payload["header"])
    assert (tmp_path / "models.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "# torch: " + torch.__version__ in out and "targets" in out


def test_quick_models_run_of_the_llama_writes_its_rows_and_skips_the_reference(tmp_path, capsys):
    pytest.importorskip("transformers")
    from pyprune.app.bench import main
    backends = ["pyprune-torch", "pyprune-compact", "mmrazor-ref", "pyprune-sliced", "dense"]
    assert main(["models", "--quick", "--models", "llama", "--ratios", "0.5", "--backends", *backends,
                 "--out", str(tmp_path)]) == 0
    rows = _read_csv(tmp_path / "models.csv")
    for workload in ("eval", "train", "switch"):
        found = {r["backend"]: r for r in rows if r["model"] == "llama" and r["workload"] == workload}
        assert set(found) == set(backends), workload
        for backend in ("pyprune-torch", "pyprune-compact", "dense"):
            assert found[backend]["status"] == "ok", (workload, found[backend]["status"])
            _assert_positive_finite(found[backend]["median_ms"], f"llama {workload} {backend}")
        assert found["mmrazor-ref"]["status"] == model_bench.UNSUPPORTED_BY_LANGUAGE_MODELS["mmrazor-ref"]
        assert found["pyprune-sliced"]["status"].startswith("skipped: KeptSliceSGD")
    payload = json.loads((tmp_path / "models.json").read_text())
    assert payload["header"]["seq_len"] == 16
    target = next(r for r in payload["rows"] if r.get("table") == "targets" and "Llama" in r["target"])
    assert target["result"] in ("met", "MISSED") and target["numbers"].startswith("worst ")
    capsys.readouterr()


def test_the_llama_bench_loss_is_the_next_token_loss_and_its_export_computes_the_same():
    pytest.importorskip("transformers")
    from pyprune.app.bench.language_models import token_batch
    from pyprune.app.training.lm import next_token_loss
    cfg = model_bench.quick_config(torch.device("cpu"))
    torch.manual_seed(0)
    model = model_bench.build_supernet("llama", cfg.image_size)
    mutator = model_bench.prepare_named(model, "llama", cfg)
    mutator.set_global_ratio(0.5)
    pruned = {u.name.split("_(")[0] for u in mutator.mutable_units}  # hidden size, heads, MLP: all pruned
    assert pruned >= {"lm.model.embed_tokens", "lm.model.layers.0.self_attn.q_proj", "lm.model.layers.0.mlp.gate_proj"}
    ids, labels = token_batch("llama", 2, cfg.seq_len, cfg.device)
    assert ids.shape == (2, 16) and labels.shape == (32,)
    logits = model(ids)
    expected = next_token_loss(model.lm(input_ids=ids).logits, labels.view(2, 16))
    torch.testing.assert_close(F.cross_entropy(logits, labels), expected, rtol=1e-6, atol=1e-6)
    exported = mutator.export(model)
    layer = exported.lm.model.layers[0]
    assert exported.lm.model.embed_tokens.embedding_dim == 128 and layer.mlp.gate_proj.out_features == 344
    assert layer.self_attn.q_proj.out_features == 128 and exported.lm.lm_head.weight is \
        exported.lm.model.embed_tokens.weight
    torch.testing.assert_close(exported(ids), logits, rtol=1e-5, atol=1e-5)


def test_reference_attention_and_channels_first_norm_run_the_same_subnet():
    torch.manual_seed(0)
    model = TinyTransformer()
    mutator = model_bench.prepare(model, image_size=8)
    mutator.set_global_ratio(0.5)
    assert model.attention.active_out_channels == 4 and model.stem_norm.active_out_channels == 4
    reference = ref.build_reference_model(model, mutator)
    kinds = {type(m).__name__ for _, m in ref.reference_layers(reference.model)}
    assert {"ReferenceMultiheadAttention", "ReferenceLayerNorm"} <= kinds
    x = torch.randn(2, 3, 8, 8)
    for train in (False, True):
        model.train(train), reference.model.train(train)
        with torch.no_grad():
            torch.testing.assert_close(reference.model(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")
def test_reference_switches_channel_tensors_and_width_attributes_with_the_units():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.vit_b_32(weights=None, image_size=64, num_classes=10).eval()
    mutator = model_bench.prepare(model, image_size=64)
    reference = ref.build_reference_model(model, mutator)
    reference.model.eval()
    x = torch.randn(1, 3, 64, 64)
    for ratio in (0.5, 0.25):
        mutator.set_global_ratio(ratio)
        reference.set_unit_prefixes(model_bench._unit_prefix_counts(mutator))
        assert reference.model.hidden_dim == model.hidden_dim == int(768 * ratio)
        with torch.no_grad():
            torch.testing.assert_close(reference.model(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore::pyprune.tracing.PruningTraceWarning")
def test_sweep_writes_one_row_per_model_and_fails_on_a_broken_one(tmp_path, capsys):
    from pyprune.app.bench import main
    assert main(["sweep", "--models", "resnet18", "no_such_model", "--out", str(tmp_path)]) == 1
    rows = {row["model"]: row for row in csv.DictReader(open(tmp_path / "sweep.csv"))}
    assert rows["resnet18"]["status"] == "ok" and float(rows["resnet18"]["params_kept"]) < 0.5
    assert float(rows["resnet18"]["max_rel_diff"]) <= 1e-4 and int(rows["resnet18"]["mutable"]) > 5
    assert rows["no_such_model"]["status"].startswith("ValueError")
    assert "1 of 2 models ok" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ratio"):
        main(["sweep", "--models", "resnet18", "--ratio", "1.5", "--out", str(tmp_path)])
