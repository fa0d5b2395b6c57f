"""Prepare and export an 8B-Llama-shaped model on the meta device: how long, how much memory, which units.

    .venv/bin/python benchmarks/bench_meta_llama.py               # both GQA modes, each in its own process
    .venv/bin/python benchmarks/bench_meta_llama.py --gqa keep_kv

The model is ``LlamaForCausalLM`` at Llama-3-8B's sizes (hidden 4096, MLP 14336, 32 layers, 32 query / 8 key-value
heads, vocabulary 128256; :func:`pyprune.app.bench.transformers_zoo.llama_8b_config`) built under
``torch.device('meta')``: shapes, no data. ``prepare_from_supernet`` traces it on a meta ``input_ids`` ``[1, 8]``
(the recorded forward; norms are probed on small CPU copies), then every unit goes to ratio 0.5 and
``mutator.export`` gives the meta model of the new sizes with its config. Printed per GQA mode: the units found
by kind (heads / hidden / mlp, :func:`~pyprune.app.bench.transformers_zoo.unit_kind`), prepare and export seconds,
the peak resident memory of the process (``ru_maxrss``: imports and the meta model included) after building,
after prepare and after export, and the exported config's sizes. Each mode runs in a fresh process, so each peak
is its own.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

COLUMNS = ("gqa", "units", "mutable", "heads", "hidden", "mlp", "prepare_s", "export_s", "rss_built_GB",
           "rss_prepared_GB", "rss_exported_GB", "exported_config")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def measure(gqa: str) -> dict:
    """One row of :data:`COLUMNS` for GQA mode ``gqa``, in this process."""
    import functools

    import torch
    import transformers

    from pyprune.app.bench.transformers_zoo import llama_8b_config, unit_kinds
    from pyprune.mutators import ChannelMutator
    from pyprune.tracing import trace_channel_units

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_8b_config()).eval()
    row = {"gqa": gqa, "rss_built_GB": _peak_rss_gb()}
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    mutator = ChannelMutator("L1MutableChannelUnit", parse_cfg=dict(demo_input=dict(input_ids=ids)),
                             trace_fn=functools.partial(trace_channel_units, gqa=gqa))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace HF Llama: the recorded forward is used (warned)
        mutator.prepare_from_supernet(model)
    row.update(prepare_s=time.perf_counter() - start, rss_prepared_GB=_peak_rss_gb(), units=len(mutator.units),
               mutable=len(mutator.mutable_units), **unit_kinds(mutator, model))
    mutator.set_global_ratio(0.5)
    start = time.perf_counter()
    small = mutator.export(model)
    row.update(export_s=time.perf_counter() - start, rss_exported_GB=_peak_rss_gb())
    config = small.config
    row["exported_config"] = (f"hidden {config.hidden_size}, mlp {config.intermediate_size}, heads "
                              f"{config.num_attention_heads}, kv {config.num_key_value_heads}, "
                              f"head_dim {config.head_dim}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gqa", nargs="+", default=["keep_kv", "drop_kv_groups"], help="GQA modes to run")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON lines only (one process)")
    args = parser.parse_args(argv)
    if args.json:
        for gqa in args.gqa:
            print(json.dumps(measure(gqa)))
        return 0
    rows = []
    for gqa in args.gqa:  # a fresh process per mode: ru_maxrss is the peak of one run
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", "--gqa", gqa],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    from pyprune.app.bench.tables import format_table
    print(format_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
