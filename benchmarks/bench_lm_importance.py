"""L1 magnitude vs activation importance on the tiny-llama job's model: validation perplexity after one-shot width
pruning, without recovery.

    .venv/bin/python benchmarks/bench_lm_importance.py                  # appends a table to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_lm_importance.py --steps 100 --no-write   # a quick look
    .venv/bin/python benchmarks/bench_lm_importance.py --device cuda --steps 2000 --batch-size 64

``tiny-llama`` (:mod:`pyprune.app.training.lm`: LlamaForCausalLM, hidden 128, 4 layers, 4 query / 2 KV heads,
MLP 256, tied embeddings) is trained once from scratch, seeded, ``--steps`` AdamW steps on byte tokens of the Python
standard library's source (:mod:`pyprune.app.data.text_corpus`; validation files are not trained on). Then, for
each importance, a copy of the trained model is prepared with that unit type (hidden size, query heads within each
KV group, MLP width), the activation units are calibrated on the same ``--calib-batches`` training batches (one
fixed, seeded draw shared by every method; L1 reads only the weights), every unit is set to ``--ratio`` of its
width, the model is exported and its perplexity measured on the validation blocks. No finetuning anywhere: the
numbers compare the rankings alone. The default run takes about 3-5 minutes on a 2-core CPU.
"""
import argparse
import copy
import datetime
import math
import platform
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader

from pyprune.app.data.loaders import make_train_loader
from pyprune.app.data.text_corpus import stdlib_splits
from pyprune.app.training.lm import build_language_model, logits_of, next_token_loss, perplexity
from pyprune.app.training.loop import cosine_lr, set_lr
from pyprune.mutators import ChannelMutator, count_params
from pyprune.units import calibrate

METHODS = {  # name: (unit type, extra unit arguments)
    "L1 magnitude": ("L1MutableChannelUnit", {}),
    "L2 magnitude": ("L2MutableChannelUnit", {}),
    "activation (mean abs)": ("ActivationMutableChannelUnit", {"metric": "l1"}),
    "activation (mean square)": ("ActivationMutableChannelUnit", {"metric": "l2"}),
}


def train(model, loader, steps: int, lr: float, device) -> float:
    """``steps`` AdamW steps (cosine schedule after a 5 % warm-up); returns the mean loss of the last 20."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    losses, batches = [], iter(())
    model.train()
    for step in range(steps):
        try:
            input_ids, labels = next(batches)
        except StopIteration:
            loader.sampler.set_position(step // max(1, len(loader)))
            batches = iter(loader)
            input_ids, labels = next(batches)
        set_lr(optimizer, lr * (step + 1) / warmup if step < warmup else cosine_lr(lr, step - warmup,
                                                                                   steps - warmup, 0.05))
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss(logits_of(model, input_ids.to(device)), labels.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            print(f"  step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
    return sum(losses[-20:]) / len(losses[-20:])


def prune(trained, unit_type: str, unit_args: dict, ratio: float, calib, seq_len: int, device):
    """A pruned, exported copy of ``trained`` and the seconds calibration took (0 without)."""
    model = copy.deepcopy(trained).eval()
    mutator = ChannelMutator(channel_unit_cfg=dict(type=unit_type, default_args=dict(choice_mode="ratio",
                                                                                     **unit_args)),
                             parse_cfg=dict(type="ChannelAnalyzer", demo_input=dict(
                                 input_ids=torch.zeros(1, seq_len, dtype=torch.int64, device=device))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx cannot trace HF Llama: a recorded forward is used (warned)
        mutator.prepare_from_supernet(model)
    seconds = 0.0
    if unit_type == "ActivationMutableChannelUnit":
        start = time.perf_counter()
        calibrate(mutator, model, calib, forward=lambda m, batch: m(input_ids=batch[0].to(device)))
        seconds = time.perf_counter() - start
    mutator.set_global_ratio(ratio)
    return mutator.export(model).eval(), seconds, len(mutator.mutable_units)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of the full model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ratio", type=float, default=0.5, help="kept fraction of every unit's width")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches (of --batch-size)")
    parser.add_argument("--val-blocks", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: on a shared 2-core box, more only lose to contention)")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()

    train_set, val_set, corpus = stdlib_splits(args.seq_len, None, args.val_blocks)
    torch.manual_seed(args.seed)
    model = build_language_model("tiny-llama").to(device)
    print(f"tiny-llama: {count_params(model):,} params; corpus {corpus['train_tokens']:,} train / "
          f"{corpus['val_tokens']:,} val tokens ({corpus['train_files']} / {corpus['val_files']} files, digest "
          f"{corpus['digest']}); training {args.steps} steps of {args.batch_size} x {args.seq_len} tokens",
          flush=True)
    loader = make_train_loader(train_set, args.batch_size, args.seed)
    train_loss = train(model, loader, args.steps, args.lr, device)
    model.eval()
    full_ppl = perplexity(model, val_set, 64, device)
    print(f"trained: train loss {train_loss:.3f}, val perplexity {full_ppl:.2f}", flush=True)

    # one calibration draw for every method: batches of training blocks in a seeded order, disjoint from nothing
    # the methods see differently
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + 1))
    calib = list(DataLoader(torch.utils.data.Subset(train_set, order[:args.calib_batches * args.batch_size].tolist()),
                            batch_size=args.batch_size))
    rows = [("unpruned", "-", count_params(model), full_ppl, 0.0)]
    for name, (unit_type, unit_args) in METHODS.items():
        pruned, seconds, units = prune(model, unit_type, unit_args, args.ratio, calib, args.seq_len, device)
        ppl = perplexity(pruned, val_set, 64, device)
        rows.append((name, unit_type + "".join(f", {k}={v}" for k, v in unit_args.items()), count_params(pruned),
                     ppl, seconds))
        print(f"{name}: {units} units at {args.ratio}, {count_params(pruned):,} params, val perplexity "
              f"{ppl:.2f}", flush=True)

    best = min(rows[1:], key=lambda r: r[3])[0]
    lines = ["| importance | unit type | params | params kept | val perplexity (no recovery) | calibration (s) |",
             "|---|---|---|---|---|---|"]
    for name, unit, params, ppl, seconds in rows:
        shown = f"**{ppl:.2f}**" if name == best else f"{ppl:.2f}"
        lines.append(f"| {name} | {unit} | {params:,} | {params / rows[0][2]:.1%} | {shown} | "
                     f"{seconds:.1f} |" if name != "unpruned" else
                     f"| {name} | - | {params:,} | 100.0% | {ppl:.2f} | - |")
    table = "\n".join(lines)
    l1 = next(r[3] for r in rows if r[0] == "L1 magnitude")
    act = next(r[3] for r in rows if r[0] == "activation (mean abs)")
    verdict = (f"activation (mean abs) {'beats' if act < l1 else 'does not beat'} L1 magnitude: perplexity "
               f"{act:.2f} vs {l1:.2f}, a mean next-token loss {math.log(l1 / act):+.3f} nats lower")
    device_text = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                   f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))")
    import transformers
    header = (f"\n## tiny-llama: L1 magnitude vs activation importance at {args.ratio:.0%} width, no recovery "
              f"(`benchmarks/bench_lm_importance.py`)\n\n"
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device {device_text}; torch "
              f"{torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
              f"seed {args.seed}.\nModel: tiny-llama ({rows[0][2]:,} params), trained {args.steps} AdamW steps of "
              f"{args.batch_size} x {args.seq_len} byte tokens (lr {args.lr}, cosine) on the standard library's "
              f"source ({corpus['train_files']} train / {corpus['val_files']} val files, corpus digest "
              f"{corpus['digest']}); val perplexity over {len(val_set)} blocks ({len(val_set) * args.seq_len:,} "
              f"tokens) of the validation files. Every method prunes a copy of the same trained model: every unit "
              f"(hidden size, query heads per KV group, MLP) to {args.ratio} of its width, exported, no finetuning; "
              f"the activation units are calibrated on the same {args.calib_batches} batches "
              f"({args.calib_batches * args.batch_size} training blocks, one seeded draw). Run time "
              f"{time.perf_counter() - started:.0f} s.\n\n{table}\n\n{verdict}.\n")
    print(header)
    if not args.no_write:
        with open(args.results, "a") as handle:
            handle.write(header)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
