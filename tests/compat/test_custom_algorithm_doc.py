"""docs/CUSTOM_ALGORITHM.md runs: its python blocks, in order, in one namespace (a custom unit and a custom
algorithm registered by name, built from a config dict, trained a few steps, exported, reloaded; then the GroupFisher
walk-through, whose short version prunes what the library's GroupFisherAlgorithm prunes)."""
import re
from pathlib import Path

import pytest
import torch

from pyprune.channels import ChannelRef, UnitSpec
from pyprune.compat.mmrazor import MODELS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "CUSTOM_ALGORITHM.md"
pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # the page trains small nets: 1 thread is the fast one here


@pytest.fixture(scope="module")
def page():
    """The page's namespace after running every python block (once: the classes register by name)."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace = {"__name__": "custom_algorithm_doc"}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def test_the_example_runs_and_prunes_as_the_page_says(page):
    algorithm = page["algorithm"]
    assert type(algorithm).__name__ == "GradualPruneAlgorithm"
    assert MODELS.get("MaxMagnitudeUnit") is page["MaxMagnitudeUnit"]
    assert algorithm.mutator.current_choices == {"features.0_(0, 16)_16": 0.5, "features.3_(0, 16)_16": 0.5}
    x = torch.randn(2, 3, 16, 16)
    algorithm.model.eval()
    torch.testing.assert_close(page["small"].eval()(x), algorithm.model(x))


def test_the_custom_unit_keeps_the_rows_with_the_largest_entry(page):
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 1), torch.nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[[1, 4], 0] = 5.0  # one large entry in rows 1 and 4, the rest zero
    unit = page["MaxMagnitudeUnit"].from_spec(
        UnitSpec(6, [ChannelRef("0", 0, 6, True)], [ChannelRef("1", 0, 6, False)]), choice_mode="number")
    unit.prepare_for_pruning(model)
    unit.current_choice = 2
    assert unit.current_index.tolist() == [1, 4]


def test_the_group_fisher_walkthrough_prunes_what_the_library_prunes(page):
    mini, library = page["mini"], page["library"]
    assert type(mini).__name__ == "MiniFisherAlgorithm" and type(library).__name__ == "GroupFisherAlgorithm"
    library_kept = {u.name: u.current_index.tolist() for u in library.mutator.mutable_units}
    assert page["kept"] == library_kept == {u.name: u.current_index.tolist() for u in mini.mutator.mutable_units}
    assert mini.done and library.done and len(library.history) > 1
    assert library.cost().flops <= 0.5 * library.full_cost.flops < library.history[-2]["flops"]
