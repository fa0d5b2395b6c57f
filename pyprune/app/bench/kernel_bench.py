"""Op-level benchmark: the channel gather and single dynamic layers, all variants side by side in one run.

Part 1, gather: ``W[out_idx][:, in_idx]`` for 1-D (bias / norm), 2-D (Linear) and 4-D (conv) tensors, with a random
half of the channels kept in each dim, by

* ``pyprune-ext``: ``pyprune.kernels.gather_channels`` on the compiled extension (when built),
* ``pyprune-torch``: the same call on the pure-torch fallback,
* ``bool-mask``: boolean slicing ``w[mask][:, mask2]`` (what mmrazor does),
* ``index_select``: ``w.index_select(0, o).index_select(1, i)``.

On CUDA each also gets its effective bandwidth (bytes read + written by an ideal gather / time) as a fraction of a
measured device-to-device copy.

Part 1b, a set of weights at once: a model's parameters (ResNet-50's 161; SqueezeNet 1.1's with ``--quick``) with a
random half of each channel dim kept (the model's input channels and classes stay), and as many 8x8x3x3 weights
(where the cost per call dominates): ``pyprune-ext-many``, one ``gather_channels_many`` call for all, against a loop
of single calls per method above. Rows ``fwd`` time the gather, ``fwd+bwd`` also its backward (the scatter of a
gradient into every full weight).

Part 2, layers: ``DynamicConv2d`` / ``DynamicLinear`` (both backends) vs the mmrazor-style boolean-slicing layer vs
the exported dense layer, at 25 / 50 / 75 / 100 % of in and out channels: eval forward, train forward, train
forward + backward. ``vs_dense`` is the ratio to the exported dense layer measured in the same run.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ... import kernels
from .timing import measure, synchronize

GATHER_METHODS = ("pyprune-ext", "pyprune-torch", "bool-mask", "index_select")
LAYER_VARIANTS = ("pyprune-ext", "pyprune-torch", "mmrazor-ref", "dense")
LAYER_WORKLOADS = ("eval_fwd", "train_fwd", "train_fwd_bwd")
RATIOS = (0.25, 0.5, 0.75, 1.0)


def extension_available() -> bool:
    return bool(getattr(kernels, "extension_available", lambda: False)())


def _use_backend(name: str):
    """``kernels.use_backend(name)``; the fallback-only kernels package has no switch, so "torch" is a no-op."""
    if hasattr(kernels, "use_backend"):
        return kernels.use_backend(name)
    if name != "torch":
        raise RuntimeError(f"kernel backend {name!r} is not available")
    import contextlib
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------- gather
@dataclass(frozen=True)
class GatherCase:
    kind: str                  # "1-D", "linear", "conv"
    shape: Tuple[int, ...]

    @property
    def megabytes(self) -> float:
        return math.prod(self.shape) * 4 / 2**20


def gather_cases(device: torch.device, quick: bool) -> List[GatherCase]:
    """Sizes from a few KB to >= 4 MB (fp32); CUDA adds larger ones where bandwidth dominates."""
    if quick:
        return [GatherCase("1-D", (4096,)), GatherCase("linear", (256, 256)), GatherCase("conv", (32, 32, 3, 3))]
    cases = [GatherCase("1-D", (4096,)), GatherCase("1-D", (1 << 20,)),
             GatherCase("linear", (512, 512)), GatherCase("linear", (1024, 1024)),
             GatherCase("conv", (64, 64, 3, 3)), GatherCase("conv", (256, 256, 3, 3)),
             GatherCase("conv", (512, 512, 3, 3))]
    if device.type == "cuda":
        cases += [GatherCase("1-D", (1 << 24,)), GatherCase("linear", (4096, 4096)),
                  GatherCase("conv", (1024, 1024, 3, 3))]
    return cases


def _random_index(n: int, keep: float, device: torch.device, generator: torch.Generator) -> Tensor:
    count = max(1, round(keep * n))
    return torch.randperm(n, generator=generator)[:count].sort().values.to(device)


def _mask_of(index: Tensor, n: int) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=index.device)
    mask[index] = True
    return mask


def _gather_fns(weight: Tensor, out_idx: Tensor, in_idx: Optional[Tensor]) -> Dict[str, Callable[[], Tensor]]:
    out_mask = _mask_of(out_idx, weight.shape[0])
    in_mask = None if in_idx is None else _mask_of(in_idx, weight.shape[1])

    def ours(backend: str) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with _use_backend(backend):
                return kernels.gather_channels(weight, out_idx, in_idx)
        return run

    def bool_mask() -> Tensor:
        out = weight[out_mask]
        return out if in_mask is None else out[:, in_mask]

    def index_select() -> Tensor:
        out = weight.index_select(0, out_idx)
        return out if in_idx is None else out.index_select(1, in_idx)

    fns = {"pyprune-torch": ours("torch"), "bool-mask": bool_mask, "index_select": index_select}
    if extension_available():
        fns["pyprune-ext"] = ours("ext")
    return fns


def copy_bandwidth(device: torch.device, megabytes: int = 256, reps: int = 10) -> Optional[float]:
    """Bytes/s of a device-to-device ``copy_`` (read + write counted), the roof for a gather; CUDA only."""
    if device.type != "cuda":
        return None
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    result = measure(lambda: dst.copy_(src), device, warmup=3, reps=reps, syncs=False)
    return 2 * src.numel() * src.element_size() / result.median_s


def bench_gather(device: torch.device, quick: bool, warmup: int, reps: int,
                 progress: Callable = lambda it, **kw: it) -> List[Dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    roof = copy_bandwidth(device)
    rows = []
    for case in progress(gather_cases(device, quick), desc="gather"):
        weight = torch.randn(case.shape, device=device)
        out_idx = _random_index(case.shape[0], 0.5, device, generator)
        in_idx = _random_index(case.shape[1], 0.5, device, generator) if len(case.shape) > 1 else None
        fns = _gather_fns(weight, out_idx, in_idx)
        expected = fns["index_select"]()
        # Ideal traffic: every kept element read once and written once, plus the index vectors.
        moved = 2 * expected.numel() * expected.element_size() + out_idx.numel() * 8 + \
            (0 if in_idx is None else in_idx.numel() * 8)
        timings = {}
        for method in GATHER_METHODS:
            if method not in fns:
                rows.append(_skipped_gather_row(case, method, "extension not built"))
                continue
            if not torch.equal(fns[method](), expected):
                raise AssertionError(f"gather {method} disagrees with index_select on {case.shape}")
            timings[method] = measure(fns[method], device, warmup=warmup, reps=reps)
        for method, result in timings.items():
            bandwidth = moved / result.median_s
            rows.append({
                "kind": case.kind, "shape": "x".join(map(str, case.shape)), "MB": round(case.megabytes, 3),
                "method": method, "median_us": result.median_s * 1e6,
                "vs_bool_mask": timings["bool-mask"].median_s / result.median_s,
                "GB_per_s": bandwidth / 1e9,
                "bw_fraction": None if roof is None else bandwidth / roof,
                "syncs": result.syncs_per_call, "status": "ok",
            })
    return rows


def _skipped_gather_row(case: GatherCase, method: str, why: str) -> Dict[str, object]:
    return {"kind": case.kind, "shape": "x".join(map(str, case.shape)), "MB": round(case.megabytes, 3),
            "method": method, "median_us": float("nan"), "vs_bool_mask": float("nan"), "GB_per_s": float("nan"),
            "bw_fraction": None, "syncs": None, "status": f"skipped: {why}"}


# ------------------------------------------------------------------------------------------------ model weight set
MANY_METHODS = ("pyprune-ext-many", "pyprune-ext", "pyprune-torch", "bool-mask", "index_select")


def model_weight_set(name: str, device: torch.device, generator: torch.Generator):
    """Every parameter of torchvision model ``name`` with a random half of its out (dim 0) and in (dim 1) channels:
    ``(tensors, out_indices, in_indices)``. The first parameter (the stem conv) keeps its input channels, the last
    two (classifier weight and bias) their classes."""
    import torchvision
    params = [p.detach().to(device) for p in torchvision.models.get_model(name, weights=None).parameters()]
    out_indices, in_indices = [], []
    for n, p in enumerate(params):
        keeps_out = n >= len(params) - 2
        keeps_in = n == 0 or p.dim() < 2
        out_indices.append(None if keeps_out else _random_index(p.shape[0], 0.5, device, generator))
        in_indices.append(None if keeps_in else _random_index(p.shape[1], 0.5, device, generator))
    return params, out_indices, in_indices


def _many_fns(tensors, out_indices, in_indices) -> Dict[str, Callable[[], List[Tensor]]]:
    triples = list(zip(tensors, out_indices, in_indices))
    masks = [(_mask_of(o, t.shape[0]) if o is not None else None, _mask_of(i, t.shape[1]) if i is not None else None)
             for t, o, i in triples]

    def loop(backend: str) -> Callable[[], List[Tensor]]:
        def run() -> List[Tensor]:
            with _use_backend(backend):
                return [kernels.gather_channels(t, o, i) for t, o, i in triples]
        return run

    def many() -> List[Tensor]:
        with _use_backend("ext"):
            return kernels.gather_channels_many(tensors, out_indices, in_indices)

    def bool_mask() -> List[Tensor]:
        results = []
        for t, (out_mask, in_mask) in zip(tensors, masks):
            w = t if out_mask is None else t[out_mask]
            results.append(w if in_mask is None else w[:, in_mask])
        return results

    def index_select() -> List[Tensor]:
        results = []
        for t, o, i in triples:
            w = t if o is None else t.index_select(0, o)
            results.append(w if i is None else w.index_select(1, i))
        return results

    fns = {"pyprune-torch": loop("torch"), "bool-mask": bool_mask, "index_select": index_select}
    if extension_available():
        fns.update({"pyprune-ext-many": many, "pyprune-ext": loop("ext")})
    return fns


def _with_backward(fn: Callable[[], List[Tensor]], leaves: List[Tensor], grads: List[Tensor]) -> Callable[[], None]:
    """fn on leaves that require grad, then its backward: ``grads`` scattered into every full weight."""
    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        torch.autograd.backward(fn(), grads)
    return step


def weight_sets(device: torch.device, quick: bool, generator: torch.Generator) -> List[Tuple[str, list, list, list]]:
    """(name, tensors, out indices, in indices): a model's parameters (copy-bound), and as many tiny conv weights
    (bound by the cost of a call, which is what one call for all saves)."""
    model = "squeezenet1_1" if quick else "resnet50"  # quick: 52 tensors, 5 MB, seconds even on a loaded machine
    tensors, out_indices, in_indices = model_weight_set(model, device, generator)
    count = len(tensors)
    tiny = [torch.randn(8, 8, 3, 3, device=device) for _ in range(count)]
    tiny_out = [_random_index(8, 0.5, device, generator) for _ in range(count)]
    tiny_in = [_random_index(8, 0.5, device, generator) for _ in range(count)]
    return [(f"{model} set", tensors, out_indices, in_indices), ("8x8x3x3 set", tiny, tiny_out, tiny_in)]


def bench_gather_many(device: torch.device, quick: bool, warmup: int, reps: int,
                      progress: Callable = lambda it, **kw: it) -> List[Dict[str, object]]:
    """One ``gather_channels_many`` call vs a loop of single gathers over a set of weights (rows as bench_gather)."""
    rows = []
    grid = [(weights, workload) for weights in weight_sets(device, quick, torch.Generator().manual_seed(0))
            for workload in ("fwd", "fwd+bwd")]
    for (name, tensors, out_indices, in_indices), workload in progress(grid, desc="gather many"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        fns = _many_fns(tensors if workload == "fwd" else leaves, out_indices, in_indices)
        expected = [e.detach() for e in fns["index_select"]()]
        grads = [torch.ones_like(e) for e in expected]
        timings = {}
        for method in MANY_METHODS:
            if method not in fns:
                continue
            if not all(torch.equal(a, b) for a, b in zip(fns[method](), expected)):
                raise AssertionError(f"gather many: {method} disagrees with index_select on {name}")
            fn = fns[method] if workload == "fwd" else _with_backward(fns[method], leaves, grads)
            timings[method] = measure(fn, device, warmup=warmup, reps=reps)
        row = {"kind": f"{name} {workload}", "shape": f"{len(tensors)} tensors",
               "MB": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 3)}
        moved = sum(2 * e.numel() * e.element_size() for e in expected)
        rows += [_many_row(row, method, timings, moved) for method in MANY_METHODS]
    return rows


def _many_row(row: Dict[str, object], method: str, timings: Dict[str, object], moved: int) -> Dict[str, object]:
    if method not in timings:
        return dict(row, method=method, median_us=float("nan"), vs_bool_mask=float("nan"), GB_per_s=float("nan"),
                    bw_fraction=None, syncs=None, status="skipped: extension not built")
    result = timings[method]
    return dict(row, method=method, median_us=result.median_s * 1e6,
                vs_bool_mask=timings["bool-mask"].median_s / result.median_s, GB_per_s=moved / result.median_s / 1e9,
                bw_fraction=None, syncs=result.syncs_per_call, status="ok")


# ----------------------------------------------------------------------------------------------------------- layers
@dataclass(frozen=True)
class LayerCase:
    name: str
    make_layer: Callable[[], nn.Module]
    make_input: Callable[[int, torch.device], Tensor]   # (active in channels, device) -> input


def layer_cases(device: torch.device, quick: bool) -> List[LayerCase]:
    if quick:
        channels, batch, spatial, features, tokens = 16, 2, 8, 64, 16
    elif device.type == "cuda":
        channels, batch, spatial, features, tokens = 256, 32, 56, 4096, 4096
    else:
        channels, batch, spatial, features, tokens = 128, 4, 28, 1024, 256
    return [
        LayerCase(f"conv3x3 {channels}->{channels} x[{batch},C,{spatial},{spatial}]",
                  lambda: nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                  lambda k, dev: torch.randn(batch, k, spatial, spatial, device=dev)),
        LayerCase(f"linear {features}->{features} x[{tokens},C]",
                  lambda: nn.Linear(features, features),
                  lambda k, dev: torch.randn(tokens, k, device=dev)),
    ]


def make_layer_variants(layer: nn.Module, ratio: float, device: torch.device) -> Dict[str, Tuple[nn.Module, str]]:
    """variant name -> (module, kernel backend to run it under), all computing the same subnet."""
    from ...ops import to_dynamic
    from .mmrazor_reference import reference_from_op

    op = to_dynamic(layer.to(device))
    op.set_in_channels(ratio)
    op.set_out_channels(ratio)
    variants = {"pyprune-torch": (op, "torch"), "mmrazor-ref": (reference_from_op(op), "torch"),
                "dense": (op.export(), "torch")}
    if extension_available():
        variants["pyprune-ext"] = (op, "ext")
    return variants


def _workload(module: nn.Module, x: Tensor, workload: str) -> Callable[[], object]:
    if workload == "eval_fwd":
        def run():
            with torch.no_grad():
                return module(x)
        return run
    if workload == "train_fwd":
        return lambda: module(x)
    leaf = x.detach().requires_grad_(True)

    def step():
        module.zero_grad(set_to_none=True)
        module(leaf).sum().backward()
    return step


def bench_layers(device: torch.device, quick: bool, warmup: int, reps: int,
                 progress: Callable = lambda it, **kw: it) -> List[Dict[str, object]]:
    rows = []
    grid = [(case, ratio) for case in layer_cases(device, quick) for ratio in RATIOS]
    for case, ratio in progress(grid, desc="layers"):
        torch.manual_seed(0)
        variants = make_layer_variants(case.make_layer(), ratio, device)
        active_in = variants["dense"][0].weight.shape[1]
        x = case.make_input(active_in, device)
        _check_same_output(variants, x, case.name)
        for workload in LAYER_WORKLOADS:
            timings = {}
            for variant in LAYER_VARIANTS:
                if variant not in variants:
                    rows.append(_layer_row(case.name, ratio, variant, workload, None, None,
                                           "skipped: extension not built"))
                    continue
                module, backend = variants[variant]
                module.train(workload != "eval_fwd")
                with _use_backend(backend):
                    timings[variant] = measure(_workload(module, x, workload), device, warmup=warmup, reps=reps)
            for variant, result in timings.items():
                rows.append(_layer_row(case.name, ratio, variant, workload, result, timings["dense"], "ok"))
    return rows


def _check_same_output(variants, x: Tensor, name: str) -> None:
    outputs = {}
    for variant, (module, backend) in variants.items():
        module.eval()
        with torch.no_grad(), _use_backend(backend):
            outputs[variant] = module(x)
    for variant, out in outputs.items():
        if not torch.allclose(out, outputs["dense"], rtol=1e-4, atol=1e-4):
            raise AssertionError(f"{name}: {variant} output differs from the exported dense layer")


def _layer_row(layer: str, ratio: float, variant: str, workload: str, result, dense, status: str):
    median = float("nan") if result is None else result.median_s * 1e3
    return {"layer": layer, "ratio": ratio, "variant": variant, "workload": workload, "median_ms": median,
            "vs_dense": float("nan") if result is None else result.median_s / dense.median_s,
            "syncs": None if result is None else result.syncs_per_call, "status": status}


GATHER_COLUMNS = ("kind", "shape", "MB", "method", "median_us", "vs_bool_mask", "GB_per_s", "bw_fraction", "syncs",
                  "status")
LAYER_COLUMNS = ("layer", "ratio", "workload", "variant", "median_ms", "vs_dense", "syncs", "status")


def run(device: torch.device, *, quick: bool, warmup: int, reps: int, progress: Callable,
        parts: Sequence[str] = ("gather", "layers")) -> Dict[str, List[dict]]:
    """The chosen parts; returns ``{"gather": rows, "layers": rows}`` (an empty list for a part not run)."""
    synchronize(device)
    gather = bench_gather(device, quick, warmup, reps, progress) + \
        bench_gather_many(device, quick, warmup, reps, progress) if "gather" in parts else []
    layers = bench_layers(device, quick, warmup, reps, progress) if "layers" in parts else []
    layers.sort(key=lambda r: (r["layer"], r["workload"], r["ratio"], LAYER_VARIANTS.index(r["variant"])))
    return {"gather": gather, "layers": layers}
