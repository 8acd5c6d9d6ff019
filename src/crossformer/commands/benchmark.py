"""``crossformer benchmark``: images/s and peak memory, optionally side by side with a peer.

Examples::

    crossformer benchmark --model crossformer_tiny                       # inference, batch 32
    crossformer benchmark --model crossformer_tiny --train --batch-size 16
    crossformer benchmark --model crossformer_tiny --compare swin_tiny_patch4_window7_224 --json
    crossformer benchmark --model crossformer_base --device cuda --amp bf16 --batch-size 128
    crossformer benchmark --model crossformer_tiny --peak     # GEMM rates per backend, model GFLOP/s
    crossformer benchmark --model crossformer_small --device cuda --amp bf16 --batch-size 128 --mode both --peak

With ``--compare`` both inference and a training step are measured (unless ``--mode``
says otherwise) and the median per-round ratios are printed (JSON ``infer_ratio``,
``train_ratio``). Warm-up steps are excluded; see :mod:`crossformer.benchmark` for how
peak memory is measured.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ..errors import UserInputError
from ..variant_table import IMAGENET_CLASSES
from .common import add_img_size_argument, add_model_argument, benchmark_log, class_count, img_size, model_name

if TYPE_CHECKING:
    from crossformer.benchmark import BenchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_img_size_argument(parser, 224, "224; with --config: a classification config's image size, a detector's "
                                       "800x1333, a segmentor's 512x512 and 512x2048")
    parser.add_argument("--compare", metavar="NAME", nargs="?", const="auto", default=None,
                        help="a peer model run in turn with --model every round (e.g. swin_tiny_patch4_window7_224); "
                        "alone with a detection --config: torchvision's maskrcnn_resnet50_fpn; a segmentation "
                        "--config always runs smp's UPerNet beside it, on the timm encoder NAME "
                        "(default swin_tiny_patch4_window7_224)")
    modes = parser.add_mutually_exclusive_group()  # (both given, the last one won without a word)
    modes.add_argument("--mode", choices=("infer", "train", "both"), default=None,
                       help="what to time (default: infer, or both with --compare)")
    modes.add_argument("--train", action="store_const", const="train", dest="mode",
                       help="time an AdamW training step (same as --mode train)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help="batch size (default 32 for inference, 16 for training)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--amp", choices=("bf16",), default=None, help="autocast to bfloat16")
    parser.add_argument("--channels-last", action="store_true", help="channels-last images and conv weights")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--grad-checkpointing", action="store_true", help="checkpoint blocks in training")
    parser.add_argument("--num-classes", type=class_count, default=None, metavar="N",
                        help="classifier size (default: a classification --config's data's class count, else 1000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; figures are medians (default 7)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per model per round (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="the process's malloc keeps the memory it frees, so large tensors are not "
                             "page-faulted in again every step (as CROSSFORMER_KEEP_FREED_MEMORY=1 makes train do)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--peak", action="store_true",
                        help="also time each GEMM backend (a large square and the model's linear shapes) and "
                             "report the model's GFLOP/s as a fraction of the best rate (model FLOP utilisation), "
                             "each round against the square product timed right after it")


def keeps_freed_memory(args: argparse.Namespace) -> bool:
    """Set ``--keep-freed-memory`` for this process; whether it is in effect."""
    from crossformer.engine.memory import keep_freed_memory

    return args.keep_freed_memory and keep_freed_memory()


def ratio_line(summary: dict[str, Any], mode: str, ours: str, peer: str) -> str:
    """The line that gives a mode's speed ratio (ours / peer), its median and range over the rounds."""
    lo, hi = summary[f"{mode}_ratio_spread"]
    return (f"{mode}_ratio  {summary[f'{mode}_ratio']:.2f}x {ours} / {peer} "
            f"(median of {summary['config']['rounds']} rounds, range {lo:.2f}-{hi:.2f})")


def build_config(args: argparse.Namespace, model_kwargs: dict[str, Any] | None = None) -> "BenchConfig":
    """The measurement these arguments ask for; one-line errors for impossible values.

    ``model_kwargs``: constructor settings of ``--model`` (a classification config's ``model.kwargs``).
    """
    from crossformer.benchmark import DEFAULT_BATCH, BenchConfig

    height, width = img_size(args)
    for flag in ("rounds", "steps"):
        if getattr(args, flag) < 1:
            raise UserInputError(f"--{flag} must be at least 1")
    if args.warmup < 0:
        raise UserInputError("--warmup must be at least 0")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserInputError("--batch-size must be at least 1")
    args.device = benchmark_device(args.device)
    mode = args.mode or ("both" if args.compare else "infer")
    modes = ("infer", "train") if mode == "both" else (mode,)
    return BenchConfig(
        modes=modes,
        batch_size={m: args.batch_size or DEFAULT_BATCH[m] for m in modes},
        img_size=(height, width),
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        num_classes=IMAGENET_CLASSES if args.num_classes is None else args.num_classes,
        model_kwargs={args.model: dict(model_kwargs)} if model_kwargs else {},
        rounds=args.rounds,
        warmup=args.warmup,
        steps=args.steps,
        memory=not args.no_memory,
        keep_freed_memory=keeps_freed_memory(args),
    )


def benchmark_device(name: str) -> str:
    """``--device`` checked as training checks it (a one-line error for ``foo``, ``mps`` or a
    CUDA device that is not there); ``auto`` as the device it picks."""
    from crossformer.engine.distributed import resolve_device

    device = resolve_device(name)
    return str(device) if name == "auto" else name


def run(args: argparse.Namespace, model_kwargs: dict[str, Any] | None = None) -> int:
    """``model_kwargs``: as :func:`build_config`."""
    import crossformer.models  # noqa: F401  (registers the variants)
    from crossformer.benchmark import format_summary, run_benchmark, summarise
    from crossformer.models import require_known_model

    if args.compare == "auto":  # the bare flag: a detection config's peer alone
        raise UserInputError("--compare needs a NAME with --model (e.g. --compare swin_tiny_patch4_window7_224); "
                             "alone it takes torchvision's Mask R-CNN for a detection --config")
    if args.compare is not None and args.compare == args.model:  # the peer was dropped without a word
        raise UserInputError(f"--compare {args.compare} is --model itself: give another model to compare with")
    names = [model_name(args)] + ([args.compare] if args.compare else [])
    for name in names:
        require_known_model(name)
    config = build_config(args, model_kwargs)
    log = benchmark_log(args)
    sampler = None
    if args.peak:  # the square GEMM timed after every round, beside the model's rates
        from crossformer.benchmark import GemmSampler

        sampler = GemmSampler.square(config.device)
    summary = summarise(run_benchmark(names, config, log=log, between_rounds=sampler), config, compare=args.compare)
    if args.peak:
        from crossformer.benchmark import peak_report

        summary["peak"] = peak_report(args.model, config, summary, square_samples=sampler.samples)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(format_summary(summary))
    if args.peak:
        from crossformer.benchmark import format_peak

        print(format_peak(summary["peak"]))
    for m in config.modes:
        if f"{m}_ratio" in summary:
            print(ratio_line(summary, m, args.model, args.compare))
    return 0
