"""Example inputs in every form a model takes: a tensor, a shape, positional tuples, keyword dicts, lists of images,
DemoInputs and callables, through the mutator, the tracer, the config file, FLOPs and latency; messages describe
tensors by shape and dtype only."""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.budget import subnet_cost
from pyprune.budget.errors import BudgetError
from pyprune.budget.latency import LatencySettings, measure_latency
from pyprune.errors import ConfigError
from pyprune.mutators import ChannelMutator, count_flops
from pyprune.tracing import trace_channel_units
from pyprune.tracing.example_inputs import CallArgs, StructuredDemoInput, as_call_args, describe, input_config
from pyprune.units import DefaultDemoInput

# a value no message may show: it would only appear if a tensor's contents were printed
MARK = 4242.5


class TwoInputs(nn.Module):
    """``forward(x, y=None)``: two image streams merged by an add; ``y`` optional (a default fx must fill)."""

    def __init__(self):
        super().__init__()
        self.sx, self.sy = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 8, 3, padding=1)
        self.mid, self.head = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x, y=None):
        z = F.relu(self.sx(x))
        if y is not None:
            z = z + F.relu(self.sy(y))
        return self.head(F.relu(self.mid(z))).mean((2, 3))


class ListNet(nn.Module):
    """Takes a list of ``[3, H, W]`` images (as torchvision's detection models do) and batches them itself."""

    def __init__(self):
        super().__init__()
        self.body, self.mid, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, images):
        x = torch.stack(list(images))
        return self.head(F.relu(self.mid(F.relu(self.body(x))))).flatten(1)


def images():
    return [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]


def run(model, inputs):
    return model(*inputs.args, **inputs.kwargs)


def prepared(model, demo_input, tracer="auto"):
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=demo_input, tracer_type=tracer))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator.prepare_from_supernet(model)
    return mutator


def units_of(mutator):
    return sorted((u.name, u.is_mutable) for u in mutator.units)


def assert_export_equals_dynamic(model, mutator, inputs):
    mutator.set_global_ratio(0.5)
    model.eval()
    with torch.no_grad():
        dynamic = run(model, inputs)
        exported = run(mutator.export(model).eval(), inputs)
    assert exported.shape == dynamic.shape
    torch.testing.assert_close(exported, dynamic, rtol=1e-5, atol=1e-5)


# ---- forms -------------------------------------------------------------------------------------------------------
X = torch.rand(2, 3, 8, 8)
Y = torch.rand(2, 2, 8, 8)
FORMS = {
    "tensor": (lambda: X, CallArgs((X,), {})),
    "shape": (lambda: (2, 3, 8, 8), CallArgs((X,), {})),
    "DemoInput object": (lambda: DefaultDemoInput(input_shape=(2, 3, 8, 8)), CallArgs((X,), {})),
    "DemoInput config": (lambda: dict(type="DefaultDemoInput", input_shape=[2, 3, 8, 8]), CallArgs((X,), {})),
    "callable with the model": (lambda: (lambda model: X.to(next(model.parameters()).device)), CallArgs((X,), {})),
    "callable without arguments": (lambda: (lambda: X), CallArgs((X,), {})),
    "positional tuple": (lambda: (X, Y), CallArgs((X, Y), {})),
    "keyword dict": (lambda: {"x": X, "y": Y}, CallArgs((), {"x": X, "y": Y})),
    "callable giving a dict": (lambda: (lambda: {"x": X, "y": Y}), CallArgs((), {"x": X, "y": Y})),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_normalises_to_one_call(form):
    make, expected = FORMS[form]
    call = as_call_args(make(), model=TwoInputs())
    assert len(call.args) == len(expected.args) and set(call.kwargs) == set(expected.kwargs)
    for got, want in zip(list(call.args) + list(call.kwargs.values()),
                         list(expected.args) + list(expected.kwargs.values())):
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("tracer", ["auto", "torch_function"])
@pytest.mark.parametrize("form", ["positional tuple", "keyword dict", "callable giving a dict"])
def test_two_input_forms_trace_both_streams_and_export_equals_dynamic(form, tracer):
    """Both inputs reach the model (fx fills placeholders by name, the recording calls forward with keywords): the
    add couples sx and sy into one unit; without y, sy is never run and its unit cannot be the same."""
    model = TwoInputs()
    mutator = prepared(model, FORMS[form][0](), tracer)
    merged = next(u for u in mutator.units if any(r.name == "sx" and r.is_output_channel for r in u.output_related))
    assert {r.name for r in merged.output_related} == {"sx", "sy"} and merged.is_mutable
    assert_export_equals_dynamic(model, mutator, CallArgs((X,), {"y": Y}))


def test_keyword_input_gives_the_same_units_as_positional():
    assert units_of(prepared(TwoInputs(), {"x": X, "y": Y})) == units_of(prepared(TwoInputs(), (X, Y)))


@pytest.mark.parametrize("tracer", ["auto", "torch_function"])
def test_a_list_of_images_is_one_argument(tracer):
    model = ListNet()
    imgs = images()
    mutator = prepared(model, imgs, tracer)
    assert [u.name for u in mutator.mutable_units] == ["body_(0, 8)_8", "mid_(0, 8)_8"]
    assert_export_equals_dynamic(model, mutator, CallArgs((imgs,), {}))
    specs = trace_channel_units(ListNet(), imgs, tracer=tracer)  # the tracer takes the same form
    assert sorted(s.name for s in specs if not s.fixed) == ["body_(0, 8)_8", "mid_(0, 8)_8"]


@pytest.mark.parametrize("form", ["shape", "DemoInput object", "DemoInput config", "callable with the model",
                                  "callable without arguments"])
def test_single_tensor_forms_give_the_tensor_units(form):
    assert units_of(prepared(TwoInputs(), FORMS[form][0]())) == units_of(prepared(TwoInputs(), X))


# ---- config files ------------------------------------------------------------------------------------------------
def test_a_list_input_is_written_to_the_config_and_read_back():
    mutator = prepared(ListNet(), images())
    config = json.loads(json.dumps(mutator.config_template()))
    leaf = {"shape": [3, 8, 8], "dtype": "float32"}
    assert config["parse_cfg"]["demo_input"] == {"type": "StructuredDemoInput", "args": [[leaf, leaf]], "kwargs": {}}
    again = ChannelMutator.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again.prepare_from_supernet(ListNet())
    assert units_of(again) == units_of(mutator)


def test_a_single_tensor_is_written_as_its_shape_as_mmrazor_does():
    assert prepared(TwoInputs(), X).config_template()["parse_cfg"]["demo_input"] == [2, 3, 8, 8]


def test_a_callable_input_is_recorded_once_it_ran():
    mutator = ChannelMutator(parse_cfg=dict(demo_input=lambda: {"x": X, "y": Y}))
    assert "demo_input" not in mutator.config_template()["parse_cfg"]  # not known before it is called
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mutator.prepare_from_supernet(TwoInputs())
    written = mutator.config_template()["parse_cfg"]["demo_input"]
    assert written == {"type": "StructuredDemoInput", "args": [],
                       "kwargs": {"x": {"shape": [2, 3, 8, 8], "dtype": "float32"},
                                  "y": {"shape": [2, 2, 8, 8], "dtype": "float32"}}}


def test_structured_demo_input_rebuilds_shapes_and_dtypes():
    written = input_config(((X, [torch.zeros(4, dtype=torch.long)]), ))
    made = StructuredDemoInput(args=written["args"], kwargs=written["kwargs"]).get_data()
    (x, (ids,)), = made.args
    assert x.shape == X.shape and x.dtype == torch.float32 and ids.shape == (4,) and ids.dtype == torch.int64
    with pytest.raises(ConfigError, match="unknown dtype 'float77'"):
        StructuredDemoInput(args=[{"shape": [1], "dtype": "float77"}])


# ---- FLOPs, latency, summaries take the same forms ---------------------------------------------------------------
@pytest.mark.parametrize("form", ["keyword dict", "positional tuple"])
def test_flops_cost_model_latency_and_summary_take_any_form(form):
    model = TwoInputs()
    demo = FORMS[form][0]()
    mutator = prepared(model, demo)
    mutator.set_global_ratio(0.5)
    exported = mutator.export(model)
    flops = count_flops(exported, demo)
    assert flops > 0 and subnet_cost(model, mutator).flops == flops  # default: the mutator's demo input
    assert subnet_cost(model, mutator, demo).flops == flops
    assert measure_latency(exported, demo, LatencySettings(warmup=0, repeats=1)) > 0
    summary = mutator.summary(model, demo)
    assert summary["flops_after"] == flops and summary["flops_before"] > flops


def test_a_list_input_counts_flops_of_the_whole_list():
    model, imgs = ListNet(), images()
    assert count_flops(model, [imgs[0]]) * 2 == count_flops(model, imgs)  # two images: twice the work of one


# ---- messages: shapes and dtypes, never values -------------------------------------------------------------------
def test_describe_names_shape_and_dtype_never_values():
    text = describe({"images": [torch.full((3, 5, 7), MARK)], "ids": torch.zeros(2, 4, dtype=torch.long)})
    assert "tensor of shape (3, 5, 7), dtype float32" in text and "tensor of shape (2, 4), dtype int64" in text
    assert "4242" not in text


def test_a_model_that_does_not_run_on_the_images_is_refused_by_shape_and_dtype():
    with pytest.raises(ConfigError) as info:
        prepared(ListNet(), [torch.full((4, 8, 8), MARK)])
    message = str(info.value)
    assert "tensor of shape (4, 8, 8), dtype float32" in message and "layer 'body' (Conv2d)" in message
    assert "4242" not in message


@pytest.mark.parametrize("bad, words", [
    ({torch.full((2, 2), MARK)}, "an object of type set"),
    (lambda: (lambda: torch.full((2, 2), MARK)), "returned"),
    ((1, -3), "positive ints"),
    ([], "empty"),
])
def test_bad_demo_inputs_are_refused_without_printing_tensors(bad, words):
    with pytest.raises(ConfigError) as info:
        ChannelMutator(parse_cfg=dict(demo_input=bad)).prepare_from_supernet(TwoInputs())
    assert words in str(info.value) and "4242" not in str(info.value)


def test_budget_refuses_a_bad_example_input_by_shape():
    model = TwoInputs()
    mutator = prepared(model, X)
    with pytest.raises(BudgetError) as info:
        subnet_cost(model, mutator, {0: torch.full((2, 2), MARK)})
    assert "str keys" in str(info.value) and "4242" not in str(info.value)


def test_input_config_refuses_what_json_cannot_hold():
    with pytest.raises(ConfigError, match="an object of type object cannot be written"):
        input_config((X, object()))


class VarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, *xs):
        return self.b(F.relu(self.a(xs[0] + xs[1])))


def test_a_forward_with_star_args_is_recorded_and_refused_by_fx_alone():
    x = (torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.warns(UserWarning, match=r"does not fit the fx graph's inputs \(forward takes \*xs\)"):
        specs = trace_channel_units(VarArgs(), x)
    assert [s.name for s in specs if not s.fixed] == ["a_(0, 8)_8"]
    with pytest.raises(ConfigError, match=r"\(tensor of shape \(1, 3, 4, 4\), dtype float32, tensor of shape"):
        trace_channel_units(VarArgs(), x, tracer="fx")
