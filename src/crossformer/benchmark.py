"""Throughput and peak-memory benchmarks, side by side with a peer model.

The protocol (issue #3): the models run in turn in one process for several rounds, each
round timing every model once (so a slow moment of a shared machine hits all of them),
warm-up excluded; a model's figure is the median over rounds and a ratio is the median
of the per-round ratios, reported with its spread (min, max).

Peak memory is the growth over what the loaded model, its input (and, for training, its
optimizer state after warm-up) already hold, during one steady-state step:

- CUDA: ``torch.cuda.max_memory_allocated`` (tensor memory) after resetting the peak.
- CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset through
  ``/proc/self/clear_refs`` right after returning freed heap to the system with
  ``malloc_trim``. It counts every byte the step touches (tensors, allocator slack,
  library workspaces), not only tensors. ``None`` where the OS does not offer these.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .engine.amp import resolve_precision

__all__ = [
    "BenchConfig",
    "ModeResult",
    "ModelResult",
    "build_model",
    "fixed_input_size",
    "make_step",
    "timed_steps",
    "run_benchmark",
    "summarise",
    "device_name",
    "gemm_rates",
    "model_gemm_shapes",
    "peak_report",
    "GemmSampler",
]

# The protocol: inference at batch 32, a training step at batch 16.
DEFAULT_BATCH = {"infer": 32, "train": 16}


@dataclass
class BenchConfig:
    """What to measure; every model of a run shares it."""

    modes: tuple[str, ...] = ("infer",)
    batch_size: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BATCH))
    img_size: tuple[int, int] = (224, 224)
    device: str = "cpu"
    amp: str | None = None  # None or "bf16"
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    num_classes: int = 1000
    # constructor settings per model name (a classification config's ``model.kwargs``)
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    rounds: int = 7
    warmup: int = 2
    steps: int = 1  # timed steps per model per round
    memory: bool = True
    # the process's malloc keeps freed memory (engine/memory.py; the commands' opt-in)
    keep_freed_memory: bool = False


@dataclass
class ModeResult:
    """One model in one mode: images/s per round, their median and spread, peak memory, and
    how long the first (warm-up) step took: with ``compile`` that is the compilation."""

    batch_size: int
    images_per_s: list[float]
    peak_mem_mb: float | None
    first_step_s: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)


@dataclass
class ModelResult:
    name: str
    params: int
    modes: dict[str, ModeResult]


def device_name(device: str) -> str:
    """The processor or accelerator a figure was measured on, in words."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    threads = torch.get_num_threads()
    threads_used = f"({threads} thread{'s' if threads != 1 else ''})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} {threads_used}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} {threads_used}"


def build_model(name: str, config: BenchConfig) -> nn.Module:
    """A registered model with random weights, placed and configured for the benchmark."""
    import crossformer.models  # noqa: F401  (registers the variants)
    from .classification.model import create_classifier

    kwargs = dict(config.model_kwargs.get(name, {}))
    if tuple(config.img_size) != (224, 224) and fixed_input_size(name):
        kwargs["img_size"] = tuple(config.img_size)  # fixed-size timm models (Swin, ViT) need it; others take none
    # settings it cannot take are one line naming them, as in every command that builds one
    return _place(create_classifier(name, config.num_classes, model_kwargs=kwargs), config)


def fixed_input_size(name: str) -> bool:
    """Whether timm's model ``name`` is built for one input size (its ``img_size`` argument)."""
    from timm.models import get_pretrained_cfg

    from .models import VARIANTS

    # an unknown name has none: create_classifier says so in one line
    cfg = None if name in VARIANTS else get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def _place(model: nn.Module, config: BenchConfig) -> nn.Module:
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_step(model: nn.Module, mode: str, config: BenchConfig) -> Callable[[], None]:
    """One inference batch or one AdamW training step on random data, as a callable."""
    batch = config.batch_size[mode]
    images = torch.randn(batch, 3, *config.img_size, device=config.device)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model) if config.compile else model
    precision = resolve_precision(config.amp or "none", torch.device(config.device))

    if mode == "infer":
        def infer() -> None:
            if model.training:  # switching modes drops the eval-time caches
                model.eval()
            with torch.inference_mode(), precision.autocast():
                forward(images)

        return infer

    labels = torch.randint(0, max(config.num_classes, 1), (batch,), device=config.device)
    # One fused kernel for all parameters (CPU and CUDA), as a training loop should use.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train() -> None:
        if not model.training:
            model.train()
        with precision.autocast():
            loss = nn.functional.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], steps: int, device: str) -> float:
    """Seconds that ``steps`` calls of ``step`` take, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = None
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(step: Callable[[], None], device: str) -> float | None:
    """Peak memory one call of ``step`` adds to what is already held (see module doc)."""
    gc.collect()
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    base = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None
    # the kernel updates VmHWM lazily: it can read a few pages under the VmRSS read after it
    return max(peak - base, 0) / 1024


def _rate(images_per_s: float) -> str:
    """Images/s to three significant figures (a dense model's 0.0423), one decimal from 100."""
    return f"{images_per_s:.3g}" if images_per_s < 100 else f"{images_per_s:.1f}"


def run_benchmark(
    models: Sequence[str] | Mapping[str, Callable[[], nn.Module]],
    config: BenchConfig,
    log: Callable[[str], None] | None = None,
    between_rounds: Callable[[], None] | None = None,
) -> list[ModelResult]:
    """Measure every model in every mode, interleaving models within each round.

    ``models``: registered names, or names mapped to factories of unplaced models;
    ``between_rounds`` runs after each round (e.g. :meth:`GemmSampler.square`). Each mode
    times a model of its own (the same weights): one model switched between training and
    inference every round would rebuild its inference caches inside each timed step.
    """
    def build(name: str) -> nn.Module:
        torch.manual_seed(0)
        return _place(models[name](), config) if isinstance(models, Mapping) else build_model(name, config)

    names = list(models)
    built = {(name, mode): build(name) for name in names for mode in config.modes}
    steps = {key: make_step(model, key[1], config) for key, model in built.items()}
    first_step: dict[tuple[str, str], float | None] = {}
    for key, step in steps.items():
        first_step[key] = timed_steps(step, 1, config.device) if config.warmup else None
        for _ in range(config.warmup - 1):
            step()
        if log and first_step[key] is not None:  # --warmup 0: no step ran, nothing warmed up
            log(f"warmed up {key[0]} ({key[1]}): first step {first_step[key]:.1f} s")
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for r in range(config.rounds):
        for key, step in steps.items():
            seconds = timed_steps(step, config.steps, config.device)
            times[key].append(config.batch_size[key[1]] * config.steps / seconds)
        if log:
            log(f"round {r + 1}/{config.rounds}: " + ", ".join(
                f"{n}/{m} {_rate(v[-1])} img/s" for (n, m), v in times.items()))
        if between_rounds is not None:
            between_rounds()
    peaks = {key: peak_memory_mb(step, config.device) if config.memory else None for key, step in steps.items()}
    return [
        ModelResult(
            name=name,
            params=sum(p.numel() for p in built[(name, config.modes[0])].parameters()),
            modes={
                mode: ModeResult(
                    config.batch_size[mode], times[(name, mode)], peaks[(name, mode)], first_step[(name, mode)]
                )
                for mode in config.modes
            },
        )
        for name in names
    ]


def _spread(values: Sequence[float]) -> list[float]:
    return [min(values), max(values)]


def summarise(results: list[ModelResult], config: BenchConfig, compare: str | None = None) -> dict:
    """A JSON-ready summary; with ``compare``, each model's median per-round ratio to it.

    Keys ``infer_ratio`` / ``train_ratio`` (first model against ``compare``) are present
    for the modes measured.
    """
    by_name = {r.name: r for r in results}
    out: dict = {
        "device": device_name(config.device),
        "torch": torch.__version__,
        "config": asdict(config),
        "models": {},
    }
    for res in results:
        entry: dict = {"params": res.params}
        for mode, m in res.modes.items():
            entry[mode] = {
                "batch_size": m.batch_size,
                "images_per_s": m.median,
                "images_per_s_spread": _spread(m.images_per_s),
                "images_per_s_rounds": m.images_per_s,
                "peak_mem_mb": m.peak_mem_mb,
                "first_step_s": m.first_step_s,
            }
            if compare is not None and res.name != compare:
                peer = by_name[compare].modes[mode].images_per_s
                ratios = [a / b for a, b in zip(m.images_per_s, peer)]
                entry[mode]["ratio"] = statistics.median(ratios)
                entry[mode]["ratio_spread"] = _spread(ratios)
        out["models"][res.name] = entry
    first = results[0]
    out["model"] = first.name
    for mode in first.modes:
        out[f"{mode}_images_per_s"] = first.modes[mode].median
        out[f"{mode}_peak_mem_mb"] = first.modes[mode].peak_mem_mb
        if compare is not None and first.name != compare:
            out["compare"] = compare
            out[f"{mode}_ratio"] = out["models"][first.name][mode]["ratio"]
            out[f"{mode}_ratio_spread"] = out["models"][first.name][mode]["ratio_spread"]
    return out


def format_summary(summary: dict) -> str:
    """Human-readable lines for :func:`summarise`'s output."""
    cfg = summary["config"]
    extras = [f"amp {cfg['amp']}" if cfg["amp"] else "fp32"]
    extras += [name for name in ("channels_last", "compile", "grad_checkpointing") if cfg[name]]
    if cfg.get("keep_freed_memory"):
        extras.append("freed memory kept")
    lines = [
        f"device      {summary['device']}, torch {summary['torch']}",
        f"input       {cfg['img_size'][0]}x{cfg['img_size'][1]}, {', '.join(extras)}, "
        f"{cfg['rounds']} rounds x {cfg['steps']} step(s), {cfg['warmup']} warm-up",
    ]
    for name, kwargs in cfg.get("model_kwargs", {}).items():  # a config's model, not the registered variant
        if kwargs:
            lines.append(f"settings    {name}: {', '.join(f'{k}={v}' for k, v in kwargs.items())}")
    for name, entry in summary["models"].items():
        for mode in cfg["modes"]:
            m = entry[mode]
            lo, hi = m["images_per_s_spread"]
            mem = "n/a" if m["peak_mem_mb"] is None else f"{m['peak_mem_mb']:.0f} MB"
            line = (f"{name:<36} {mode:<5} batch {m['batch_size']:<4} {_rate(m['images_per_s']):>8} img/s "
                    f"[{_rate(lo)}, {_rate(hi)}]  peak +{mem}")
            if "ratio" in m:
                rlo, rhi = m["ratio_spread"]
                line += f"  ratio {m['ratio']:.2f}x [{rlo:.2f}, {rhi:.2f}]"
            if cfg["compile"] and m["first_step_s"] is not None:
                line += f"  first step (compiling) {m['first_step_s']:.1f} s"
            lines.append(line)
    return "\n".join(lines)


# GEMM peak rates (``crossformer benchmark --peak``) -----------------------------------------

# The large square product that stands for "what this machine can multiply": 2048 keeps a
# 2-core CPU's product near 0.05 s; a GPU needs a larger one to reach its rate.
PEAK_SQUARE = 2048
PEAK_SQUARE_CUDA = 8192


def _gemm_callables(rows: int, inner: int, outer: int, device: str = "cpu") -> dict[str, Callable[[], torch.Tensor]]:
    """``(rows, inner) @ (inner, outer)`` on every backend this build offers on ``device``, by name.

    CPU: MKL (``torch.mm``, what autograd runs) and oneDNN on packed weights, each in fp32
    and, where the CPU has bf16 instructions, bf16. CUDA: ``torch.mm`` in fp32 (TF32 as
    ``torch.backends.cuda.matmul.allow_tf32`` says) and bf16.
    """
    from crossformer.models import layers

    torch.manual_seed(0)
    a = torch.randn(rows, inner, device=device)
    weight = torch.randn(outer, inner, device=device)  # nn.Linear layout: (out, in)
    if device != "cpu":
        a16, w16 = a.bfloat16(), weight.bfloat16()
        return {"fp32 mm": lambda: torch.mm(a, weight.t()), "bf16 mm (autocast)": lambda: torch.mm(a16, w16.t())}
    calls: dict[str, Callable[[], torch.Tensor]] = {"fp32 mkl": lambda: torch.mm(a, weight.t())}
    lp, reorder = layers._LINEAR_POINTWISE, layers._REORDER_LINEAR_WEIGHT
    if lp is None or reorder is None:
        return calls
    packed = reorder(weight, rows)
    calls["fp32 onednn packed"] = lambda: lp(a, packed, None, "none", [], "none")
    if layers.cpu_has_bf16_kernels():
        a16, w16 = a.bfloat16(), weight.bfloat16()
        packed16 = reorder(w16, rows)
        calls["bf16 onednn packed"] = lambda: lp(a16, packed16, None, "none", [], "none")
        calls["bf16 mm (autocast)"] = lambda: torch.mm(a16, w16.t())
    return calls


class GemmSampler:
    """Times ``(rows, inner) @ (inner, outer)`` on every backend (:func:`_gemm_callables`) once
    per call, each repeated for about ``min_seconds``, and keeps each call's GFLOP/s (``2 M K
    N / s``) by backend in ``samples``. Backends alternate within a call, so a slow moment of
    a shared machine hits all of them.

    Also ``run_benchmark``'s ``between_rounds`` for ``--peak``: on the large square it gives
    each round's model rate a GEMM rate from the same minute. A machine whose speed drifts (a
    shared or throttled host) moves both together, where a rate measured once, before or
    after all the rounds, would not.
    """

    def __init__(self, rows: int, inner: int, outer: int, device: str = "cpu", min_seconds: float = 0.05) -> None:
        self.flops = 2 * rows * inner * outer
        self.device = device
        self.calls = _gemm_callables(rows, inner, outer, device)
        self.repeats = {}
        for name, call in self.calls.items():
            call()  # warm-up: weight reorders, first-touch of the output, kernel selection
            self.repeats[name] = max(1, int(min_seconds / max(timed_steps(call, 1, device), 1e-6)))
        self.samples: list[dict[str, float]] = []  # one {backend: GFLOP/s} per call

    @classmethod
    def square(cls, device: str = "cpu") -> "GemmSampler":
        """The large square product that stands for the machine's rate on ``device``."""
        side = PEAK_SQUARE if device == "cpu" else PEAK_SQUARE_CUDA
        return cls(side, side, side, device)

    def __call__(self) -> None:
        self.samples.append({name: self.flops * self.repeats[name] / timed_steps(call, self.repeats[name], self.device) / 1e9
                             for name, call in self.calls.items()})


def gemm_rates(
    shapes: Sequence[tuple], rounds: int = 3, min_seconds: float = 0.05, device: str = "cpu"
) -> list[dict]:
    """GFLOP/s of each backend at each ``(label, M, K, N, ...)``: the median over ``rounds``
    calls of a :class:`GemmSampler`."""
    out = []
    for label, rows, inner, outer, *_ in shapes:
        sampler = GemmSampler(rows, inner, outer, device, min_seconds)
        for _ in range(rounds):
            sampler()
        out.append(dict(shape=label, m=rows, k=inner, n=outer,
                        gflops={name: statistics.median(s[name] for s in sampler.samples) for name in sampler.calls}))
    return out


def model_gemm_shapes(
    model: nn.Module, batch: int, height: int, width: int, chunked: bool = True
) -> list[tuple[str, int, int, int, int]]:
    """The linear layers of a CrossFormer's blocks at this batch and size, one per stage and layer:
    ``(label, M, K, N, FLOPs per batch)``.

    ``M`` is the rows of one call: ``chunked``, as CPU inference runs a stage, a few images at
    a time (:func:`crossformer.models.crossformer.images_per_chunk`); otherwise (training, a
    GPU) the whole batch. The FLOPs count every call of the layer in all the stage's blocks.
    """
    from crossformer.models import CrossFormer
    from crossformer.models.crossformer import images_per_chunk

    if not isinstance(model, CrossFormer):
        return []
    shapes = []
    h, w = height // 4, width // 4  # after the stride-4 patch embedding (>= 32-pixel inputs)
    for s, stage in enumerate(model.layers):
        dim = stage.blocks[0].norm1.normalized_shape[0]
        rows = (images_per_chunk(batch, h, w, stage.mlp_hidden) if chunked else batch) * h * w
        layers = [("qkv", dim, 3 * dim), ("proj", dim, dim), ("fc1", dim, stage.mlp_hidden), ("fc2", stage.mlp_hidden, dim)]
        shapes += [(f"stage {s} {name}", rows, inner, outer, 2 * batch * h * w * inner * outer * len(stage.blocks))
                   for name, inner, outer in layers]
        h, w = h // 2, w // 2
    return shapes


def model_macs(model: nn.Module, height: int, width: int) -> int:
    """MACs of one image: the papers' analytic count for CrossFormer, PyTorch's counter otherwise."""
    from crossformer.models import CrossFormer
    from crossformer.models.flops import analytic_macs, traced_macs

    if isinstance(model, CrossFormer):
        return analytic_macs(model, height, width)
    return traced_macs(model, height, width)


# A training step's FLOPs over its forward pass's: the forward product, then the input and
# the weight gradient of every layer (the usual convention for model FLOP utilisation).
TRAIN_FLOPS_FACTOR = 3


def peak_report(
    model_name: str, config: BenchConfig, summary: dict, rounds: int = 3, square_samples: Sequence[dict] = ()
) -> dict:
    """GEMM rates of each backend (large square and the model's shapes) on the benchmark's
    device, and the model's GFLOP/s from ``summary`` (see :func:`summarise`) as a fraction
    of the best square rate of its precision (fp32, or bf16 under ``--amp bf16``): model
    FLOP utilisation. Inference counts ``2 * MACs`` per image; a training step
    ``TRAIN_FLOPS_FACTOR`` times that.

    With ``square_samples`` (a :meth:`GemmSampler.square`'s, one per benchmark round) the
    fraction is the median over rounds of each round's model rate against the square rate
    timed right after it, with its spread (``..._fraction_of_best_spread``)."""
    height, width = config.img_size
    model = build_model(model_name, BenchConfig(device="meta", num_classes=config.num_classes,
                                                 model_kwargs=config.model_kwargs))
    # the shapes at the batch of the inference measured, else of the training step's forward
    # (a training run alone showed batch 32's: the inference default's)
    inference = "infer" in config.modes
    batch = config.batch_size.get("infer" if inference else "train", DEFAULT_BATCH["infer" if inference else "train"])
    side = PEAK_SQUARE if config.device == "cpu" else PEAK_SQUARE_CUDA
    square = ("square", side, side, side)
    shapes = model_gemm_shapes(model, batch, height, width, chunked=inference and config.device == "cpu")
    rates = gemm_rates([square] + shapes, rounds=rounds, device=config.device)
    report: dict = {"gemm": rates}

    def best_rate(row: dict, dtype: str) -> float | None:
        return max((v for k, v in row["gflops"].items() if k.startswith(dtype)), default=None)

    dtype = "bf16" if config.amp == "bf16" else "fp32"
    best = {d: best_rate(rates[0], d) for d in ("fp32", "bf16")}
    report["best_square_gflops"] = best
    macs = model_macs(model, height, width)
    report.update(model_macs_per_image=macs, model_dtype=dtype)
    if shapes and best[dtype] and inference:
        # What the linear layers alone cost at their own shapes' best measured rates: the model's
        # inference can be no faster, whatever the rest (attention, convolutions, norms) costs.
        linear_seconds = sum(shape[-1] / (best_rate(row, dtype) * 1e9) for shape, row in zip(shapes, rates[1:]))
        model_gflop = 2 * macs * batch / 1e9
        report.update(linear_gflop_per_batch=sum(shape[-1] for shape in shapes) / 1e9, model_gflop_per_batch=model_gflop,
                      linear_seconds_per_batch=linear_seconds,
                      linear_bound_fraction_of_best=model_gflop / linear_seconds / best[dtype])
    square_rounds = [max((v for k, v in sample.items() if k.startswith(dtype)), default=0.0) for sample in square_samples]
    if square_rounds:
        report["square_gflops_rounds"] = square_rounds
    for mode, prefix, factor in (("infer", "model", 1), ("train", "model_train", TRAIN_FLOPS_FACTOR)):
        measured = summary["models"][model_name].get(mode)
        if measured is not None:
            gflops = 2 * factor * macs * measured["images_per_s"] / 1e9
            report[f"{prefix}_gflops"] = gflops
            report[f"{prefix}_fraction_of_best"] = gflops / best[dtype] if best[dtype] else None
            if square_rounds and len(square_rounds) == len(measured["images_per_s_rounds"]) and min(square_rounds) > 0:
                fractions = [2 * factor * macs * rate / 1e9 / square
                             for rate, square in zip(measured["images_per_s_rounds"], square_rounds)]
                report[f"{prefix}_fraction_of_best"] = statistics.median(fractions)
                report[f"{prefix}_fraction_of_best_spread"] = _spread(fractions)
    return report


def format_peak(report: dict) -> str:
    """Human-readable lines for :func:`peak_report`."""
    names = list(report["gemm"][0]["gflops"])
    lines = [f"{'GEMM GFLOP/s (M x K x N)':<34}" + "".join(f"{n:>20}" for n in names)]
    for row in report["gemm"]:
        label = f"{row['shape']} {row['m']}x{row['k']}x{row['n']}"
        lines.append(f"{label:<34}" + "".join(f"{row['gflops'].get(n, float('nan')):20.1f}" for n in names))
    dtype, per_image = report["model_dtype"], 2 * report["model_macs_per_image"] / 1e9
    if "linear_bound_fraction_of_best" in report:
        lines.append(
            f"linear layers: {report['linear_gflop_per_batch']:.1f} of the model's {report['model_gflop_per_batch']:.1f} "
            f"GFLOP per inference batch, {1e3 * report['linear_seconds_per_batch']:.0f} ms at their shapes' best rates "
            f"above: with nothing else costing time the model would reach "
            f"{100 * report['linear_bound_fraction_of_best']:.0f}% of the best {dtype} GEMM rate"
        )
    for prefix, what in (("model", f"inference ({per_image:.2f} GFLOP per image)"),
                         ("model_train", f"training step ({TRAIN_FLOPS_FACTOR} x {per_image:.2f} GFLOP per image)")):
        if f"{prefix}_gflops" in report:
            fraction = report[f"{prefix}_fraction_of_best"]
            spread = report.get(f"{prefix}_fraction_of_best_spread")
            lines.append(
                f"model {dtype} {what}: {report[f'{prefix}_gflops']:.1f} GFLOP/s"
                + (f", {100 * fraction:.0f}% of the best {dtype} GEMM rate" if fraction else "")
                + (f" (median over rounds of each round against the square product timed after it: "
                   f"{100 * spread[0]:.0f}-{100 * spread[1]:.0f}%)" if spread else "")
            )
    return "\n".join(lines)
