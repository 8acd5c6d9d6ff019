"""The segmentation task's command-line verbs beyond ``train`` (registry ``COMMANDS``).

- ``evaluate --config FILE --checkpoint FILE --data ADE_ROOT [--multi-scale] [--flip]
  [--mode whole|slide]``: mIoU, mAcc, aAcc and the per-class table (``--json``: one JSON
  object; ``--output FILE``: the JSON written too); torchrun splits the images.
- ``predict IMAGE_OR_DIR... --config FILE --checkpoint FILE --output DIR``: an overlay and a
  label-map PNG per image.
- ``flops --config FILE [--img-size H W] [--json]``: parameters and MACs (512x2048 by default)
  beside the authors' table.
- ``benchmark --config FILE``: inference images/s at 512x512 and 512x2048, side by side with
  segmentation_models_pytorch's UPerNet on a timm ``swin_tiny_patch4_window7_224`` encoder.

The segmentor is the config's ``model`` section; the checkpoint is ours (``crossformer train``)
or the authors' mmseg release.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ..commands.common import (benchmark_log, head_classes, note_on_stderr, refuse_classifier_flags,
                               result_printer, shown_path)
from ..engine.registry import VerbHandler, no_arguments
from ..errors import UserInputError
from .classes import ADE20K_CLASSES
from .config import SegmentationConfig, SegTestConfig

__all__ = ["COMMANDS", "AUTHORS_TABLE"]

# The authors' ADE20K tables (segmentation/README.md; CrossFormer++ parameter counts from the
# paper): (kind, backbone) -> params (M), GFLOPs at 512x2048, single-scale and multi-scale mIoU.
AUTHORS_TABLE: dict[tuple[str, str], dict[str, float]] = {
    ("fpn", "crossformer_small"): dict(params_m=34.3, gflops=209.8, miou=46.4),
    ("fpn", "crossformer_base"): dict(params_m=55.6, gflops=320.1, miou=48.0),
    ("fpn", "crossformer_large"): dict(params_m=95.4, gflops=482.7, miou=49.1),
    ("fpn", "crossformer_pp_small"): dict(params_m=27.1),
    ("fpn", "crossformer_pp_base"): dict(params_m=55.6),
    ("upernet", "crossformer_small"): dict(params_m=62.3, gflops=979.5, miou=47.6, ms_miou=48.4),
    ("upernet", "crossformer_base"): dict(params_m=83.6, gflops=1089.7, miou=49.7, ms_miou=50.6),
    ("upernet", "crossformer_large"): dict(params_m=125.5, gflops=1257.8, miou=50.4, ms_miou=51.4),
    ("upernet", "crossformer_pp_small"): dict(params_m=53.1),
    ("upernet", "crossformer_pp_base"): dict(params_m=83.7),
}
PEER_ENCODER = "swin_tiny_patch4_window7_224"
BENCH_SIZES = ((512, 512), (512, 2048))
# what inference reads of a segmentation config (drop_path and pretrained only train)
_MODEL_KEYS = ("model.kind", "model.backbone", "model.backbone_kwargs", "model.num_classes", "model.channels",
               "model.aux_channels")
_DATA_KEYS = ("data.root", "data.val_images", "data.val_labels", "data.classes", "data.reduce_zero_label",
              "data.label_suffix", "data.label_colours", "data.ignore_colours", "data.skip_corrupt")
_RUN_KEYS = ("run.amp", "run.device", "run.cpu_threads")
_EVALUATE_KEYS = (*_MODEL_KEYS, *_DATA_KEYS, "test", "run.num_workers", *_RUN_KEYS)
_PREDICT_KEYS = (*_MODEL_KEYS, "data.classes", "data.palette", "data.label_colours", "data.skip_corrupt", "test",
                 *_RUN_KEYS)


def _check_classes(checkpoint: dict[str, Any], dataset: Any, path: str) -> None:
    """Refuse a data set whose classes are others than the ones the checkpoint names (ours
    and mmseg's name them; mmseg spells ADE20K's "bed " with a space): the same count of
    other classes would be scored as if they were the model's."""
    from ..data import DataError
    from ..data.class_list import first_category_difference
    from .checkpoint import read_segmentation_meta

    names = read_segmentation_meta(checkpoint)["classes"]
    if names is None or len(names) != dataset.num_classes:  # unnamed, or another count: evaluate_segmentor says so
        return
    differ = first_category_difference([c.strip() for c in dataset.classes], [n.strip() for n in names], "the data",
                                       "the checkpoint")
    if differ is not None:
        raise DataError(f"{dataset.image_dir} names other classes than {path} was trained on ({differ}); evaluate on "
                        "the data set the model was trained for")


# ---------------------------------------------------------------------------- evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="ours (crossformer train) or the authors' mmseg file")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")


def _evaluate(args: argparse.Namespace, config: SegmentationConfig, given: dict[str, Any]) -> int:
    from ..engine import RunLogger, resolve_precision, skipped_on_stderr
    from ..engine.distributed import setup_distributed, teardown_distributed
    from ..atomic import check_output_path, write_text_atomic
    from .checkpoint import load_segmentor
    from .data import absent_classes_note
    from .evaluate import evaluate_segmentor
    from .task import build_datasets

    if args.output:  # checked before the evaluation, which may take hours
        check_output_path(args.output, inputs=(args.checkpoint,))
    _, dataset = build_datasets(config.data, training=False)
    ctx = setup_distributed(config.run.device)
    try:
        segmentor, checkpoint = load_segmentor(config, args.checkpoint, args.ema)
        _check_classes(checkpoint, dataset, args.checkpoint)
        segmentor.to(ctx.device)
        logger = RunLogger(None, enabled=ctx.is_main)
        # skipped files are named on stderr, terminal or not: stdout holds the table or JSON alone
        metrics = evaluate_segmentor(
            segmentor, dataset, config.test.inference(), ctx, resolve_precision(config.run.amp, ctx.device).autocast,
            config.data.skip_corrupt, logger if sys.stderr.isatty() else None, config.run.num_workers,
            skipped_on_stderr() if ctx.is_main else None,
        )
    finally:
        teardown_distributed(ctx)
    if not ctx.is_main:  # under torchrun, rank 0 reports the reduced metrics
        return 0
    absent = absent_classes_note(metrics.label_counts(), dataset)
    if absent is not None:  # on stderr, as training's data check warns: stdout holds the table or JSON alone
        print(f"warning: {absent}", file=sys.stderr)
    result = {"checkpoint": str(args.checkpoint), "data": str(dataset.image_dir), **metrics.to_dict()}
    if args.output:
        write_text_atomic(args.output, json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(metrics.table())
        skipped = f", {metrics.skipped} unreadable skipped" if metrics.skipped else ""
        print(f"{args.checkpoint} on {dataset.image_dir} ({_settings(metrics.settings)}{skipped})")
    return 0


def _settings(settings: dict[str, Any]) -> str:
    scales = "multi-scale" if len(settings.get("ratios", [1.0])) > 1 else "single scale"
    return f"{settings.get('mode')}, {scales}{', flip' if settings.get('flip') else ''}"


# ---------------------------------------------------------------------------- predict


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE")
    parser.add_argument("--output", default="output/predict", metavar="DIR", help="where the PNGs go (default output/predict)")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity (default 0.5)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")


def _labels_of(checkpoint: dict[str, Any], num_classes: int) -> tuple[list[str], Any, bool]:
    """Class names, palette and reduce-zero-label of a checkpoint (ADE20K's for 150 classes
    without names, numbered classes otherwise)."""
    from .checkpoint import read_segmentation_meta
    from .classes import ADE20K_PALETTE

    meta = read_segmentation_meta(checkpoint)
    names, palette = meta["classes"], meta["palette"]
    if names is None and num_classes == len(ADE20K_CLASSES):
        names, palette = ADE20K_CLASSES, ADE20K_PALETTE
    if names is None or len(names) != num_classes:
        names, palette = [f"class {i}" for i in range(num_classes)], None
    stored = checkpoint.get("meta", {}).get("reduce_zero_label") if isinstance(checkpoint.get("meta"), dict) else None
    reduce = bool(stored) if stored is not None else tuple(n.strip() for n in names) == ADE20K_CLASSES
    return list(names), palette, reduce


def _given_names(classes: str | tuple[str, ...], num_classes: int, checkpoint: str) -> list[str]:
    """``data.classes``'s names (a file or the names), one for each of the segmentor's classes."""
    from ..data import load_class_list

    names = load_class_list(classes)
    if len(names) != num_classes:
        raise UserInputError(f"data.classes names {len(names)} classes but {checkpoint} predicts {num_classes}: give one "
                             "name for each, in the order of the model's outputs")
    return names


def _predict(args: argparse.Namespace, config: SegmentationConfig, given: dict[str, Any]) -> int:
    from ..engine import resolve_precision
    from ..engine.distributed import resolve_device
    from ..data.draw import class_colours
    from .checkpoint import load_segmentor
    from .predict import SegPrediction, predict_images

    if not 0 <= args.opacity <= 1:
        raise UserInputError(f"--opacity must be in [0, 1], got {args.opacity}")
    device = resolve_device(config.run.device)
    segmentor, checkpoint = load_segmentor(config, args.checkpoint, args.ema)
    segmentor.to(device)
    names, palette, reduce = _labels_of(checkpoint, segmentor.num_classes)
    data = config.data
    if data.classes is not None:  # names for a file that records none, or others for the same classes
        names = _given_names(data.classes, segmentor.num_classes, args.checkpoint)
    for key, colours in (("data.palette", data.palette), ("data.label_colours", data.label_colours)):
        if colours is not None:  # given here (at most one of them), it replaces the checkpoint's colours
            palette = class_colours(colours, len(names), key)

    def line(result: SegPrediction) -> str:
        return (f"{shown_path(result.path)}: {shown_path(result.overlay)}, {shown_path(result.label_map)} "
                f"({', '.join(result.classes) or 'no class'})")

    say = result_printer(args.json, dataclasses.asdict, line)

    predict_images(
        segmentor, args.images, args.output, names, palette, config.test.inference(), reduce,
        data.skip_corrupt, args.opacity, resolve_precision(config.run.amp, device).autocast, note_on_stderr,
        coloured_labels=data.label_colours is not None, on_result=say,
    )
    return 0


# ---------------------------------------------------------------------------- flops, benchmark


def _sizes(args: argparse.Namespace, default: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    from ..commands.common import given_img_size

    size = given_img_size(args)
    return (size,) if size is not None else default


def _model_classes(verb: str, config: SegmentationConfig) -> int:
    """The class count training would build the segmentor for (ADE20K's 150 where it cannot be known)."""
    return head_classes(verb, config.model.num_classes, config.data.known_classes, len(ADE20K_CLASSES), "ADE20K's")


def _flops(args: argparse.Namespace, config: SegmentationConfig, given: dict[str, Any]) -> int:
    import torch

    from .checkpoint import describe_segmentor
    from .flops import segmentor_flops
    from .task import build_model

    refuse_classifier_flags(args, ("--model", "--num-classes", "--traced"), "segmentor")
    (height, width), = _sizes(args, ((512, 2048),))
    model = dataclasses.replace(config.model, pretrained=None)
    with torch.device("meta"):
        segmentor = build_model(model, _model_classes("flops", config))
    counts = segmentor_flops(segmentor, height, width)
    # the settings the text's model line shows, under detection's keys where they are the same
    settings = {k: getattr(model, k) for k in ("backbone_kwargs", "channels", "aux_channels") if getattr(model, k)}
    result = {"model": f"{model.kind}_{model.backbone}", "kind": model.kind, "backbone": model.backbone, **settings,
              "img_size": [height, width], "num_classes": segmentor.num_classes, **counts}
    authors = AUTHORS_TABLE.get((model.kind, model.backbone)) if _authors_settings(config) else None
    if authors and (height, width) == (512, 2048) and segmentor.num_classes == 150:
        result.update({f"authors_{k}": v for k, v in authors.items()})
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model       {describe_segmentor(dataclasses.asdict(model))} at {height}x{width}, {segmentor.num_classes} classes")
    print(f"params      {counts['params']:,} ({counts['params'] / 1e6:.1f}M, auxiliary head included)")
    print(f"MACs        {counts['macs']:,} ({counts['macs'] / 1e9:.1f}G: backbone {counts['backbone_macs'] / 1e9:.1f}G "
          f"on the real groups + heads {counts['head_macs'] / 1e9:.1f}G, the authors' convention)")
    print(f"backbone    {counts['backbone_macs_analytic'] / 1e9:.1f}G by the classification analytic formula")
    if "authors_params_m" in result:
        flops = f" / {result['authors_gflops']}G FLOPs" if "authors_gflops" in result else ""
        print(f"authors     {result['authors_params_m']}M params{flops}")
    return 0


def _authors_settings(config: SegmentationConfig) -> bool:
    """Whether the backbone settings only restate the authors' grouping (a bundled row)."""
    return set(config.model.backbone_kwargs) <= {"group_size", "interval"}


def _benchmark(args: argparse.Namespace, config: SegmentationConfig, given: dict[str, Any]) -> int:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise UserInputError(
            "benchmark --config <segmentation config> runs smp's UPerNet beside ours: pip install segmentation-models-pytorch"
        ) from None

    from ..benchmark import fixed_input_size, format_summary, run_benchmark, summarise
    from ..commands.benchmark import benchmark_device, build_config, ratio_line
    from ..variant_table import require_known_model
    from .task import build_model

    refuse_classifier_flags(args, ("--model", "--num-classes", "--grad-checkpointing", "--peak"), "segmentor")
    if args.mode not in (None, "infer"):  # --mode both was timed as inference alone, silently
        raise UserInputError("benchmark --config <segmentation>: measures inference; training speed is in `crossformer train`'s log")
    args.mode = "infer"
    args.device = benchmark_device(args.device)
    encoder = PEER_ENCODER if args.compare in (None, "auto") else args.compare
    require_known_model(encoder, setting="--compare")
    sizes = _sizes(args, BENCH_SIZES)
    for height, width in sizes:
        if height % 32 or width % 32:  # ours takes any size; smp's UPerNet beside it does not
            raise UserInputError(f"--img-size {height} {width}: the segmentation benchmark runs smp's UPerNet beside "
                                 "ours, which takes sides that are multiples of 32")
    model = dataclasses.replace(config.model, pretrained=None)
    classes = _model_classes("benchmark", config)
    ours = f"{model.kind}_{model.backbone}"
    peer = f"smp_upernet_{encoder}"
    fixed_size = fixed_input_size(encoder)  # a Swin encoder is built for the size it runs at
    args.compare = None  # summarise() compares by our names below
    log = benchmark_log(args)
    summaries = []
    for height, width in sizes:
        args.img_size = [height, width]
        bench = build_config(args)
        bench.num_classes = classes
        if args.batch_size is None:
            bench.batch_size = {"infer": 1}
        factories = {
            ours: lambda: build_model(model, classes).eval(),
            peer: lambda size=(height, width): smp.UPerNet(
                encoder_name=f"tu-{encoder}", encoder_weights=None, classes=classes,
                **({"img_size": size} if fixed_size else {}),
            ).eval(),
        }
        summaries.append(summarise(run_benchmark(factories, bench, log=log), bench, compare=peer))
    if args.json:
        print(json.dumps({"model": ours, "compare": peer, "sizes": summaries}))
        return 0
    for summary in summaries:
        print(format_summary(summary))
        print(ratio_line(summary, "infer", ours, peer))
    return 0


# ---------------------------------------------------------------------------- export


def export_example(test: SegTestConfig) -> tuple[int, int]:
    """An export's default example size, ``(H, W)``: what ``predict`` feeds the network, the
    sliding window or (``whole``) a square of the test scale's shorter side, which each resized
    image reaches on its short side. The training crop was the default: the demo's 64x64 gave
    a graph for 64..79 pixels, NaN at every size predict runs at."""
    if test.mode == "slide":
        return tuple(test.slide_crop)
    short = min(test.scale)
    return short, short


def _export(args: argparse.Namespace, config: SegmentationConfig, given: dict[str, Any]) -> int:
    """The segmentor as ONNX (every size the example's graph serves, or with ``--static`` the
    example's alone: :func:`export_example` unless ``--img-size``) or TorchScript (that size)
    from normalised images to full-size logits, or its weights."""
    from ..commands.common import img_size
    from ..commands.export import check_dense_options, check_options, dense_output, write_dense_weights, write_traced
    from .checkpoint import load_segmentor
    from .segmentor import FullSizeLogits

    check_dense_options(args, "segmentor", "mmseg")
    check_options(args)
    segmentor, checkpoint = load_segmentor(config, args.checkpoint, args.ema)
    name, output = dense_output(args, config)
    if args.format == "safetensors":
        return write_dense_weights(segmentor, checkpoint, output)
    height, width = img_size(args, default=export_example(config.test))
    names, _, _ = _labels_of(checkpoint, segmentor.num_classes)
    pipeline = config.pipeline
    metadata = {"crossformer.classes": json.dumps(names), "crossformer.input":
                f"RGB, (x - mean) / std on 0-255 values: mean {tuple(pipeline.mean)}, std {tuple(pipeline.std)}"}
    return write_traced(args, FullSizeLogits(segmentor).eval(), output, name, height, width, dynamic=not args.static,
                        metadata=metadata)


COMMANDS: dict[str, VerbHandler] = {
    "evaluate": VerbHandler(_evaluate_arguments, _evaluate, _EVALUATE_KEYS),
    "predict": VerbHandler(_predict_arguments, _predict, _PREDICT_KEYS),
    "flops": VerbHandler(no_arguments, _flops, ()),
    "benchmark": VerbHandler(no_arguments, _benchmark, ()),
    "export": VerbHandler(no_arguments, _export, ()),
}
