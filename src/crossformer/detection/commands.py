"""The detection task's command-line verbs beyond ``train`` (registry ``COMMANDS``).

The config (``--config``) describes the detector; the checkpoint must hold that detector:
ours (a training checkpoint, which records its classes) or the authors' mmdetection files
(``meta.CLASSES``). ``evaluate`` prints COCOeval's 12 box (and 12 mask) numbers and writes
the results JSON; ``predict`` writes a PNG per image and one JSON; ``flops`` counts the
assembled detector at 800x1280 (HxW); ``benchmark`` times inference at 800x1333, optionally beside
torchvision's ``maskrcnn_resnet50_fpn``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..commands.common import (backbone_settings, benchmark_log, given_img_size, head_classes, note_on_stderr,
                               refuse_classifier_flags, result_printer, shown_path)
from ..engine.registry import VerbHandler, no_arguments
from ..errors import UserInputError
from ..data.class_list import first_category_difference
from .classes import COCO_CLASSES
from .config import DetectionConfig

if TYPE_CHECKING:  # the verbs import torch when they run: the command line reads the flags without it
    from .checkpoint import LoadedDetector

__all__ = ["COMMANDS"]

# what inference reads of a detection config (the other model and data settings only train)
_MODEL_KEYS = ("model.kind", "model.backbone", "model.backbone_kwargs", "model.num_classes", "model.channels",
               "model.fc_channels")
_TEST_SCALE_KEYS = ("data.max_size", "data.min_size", "data.skip_corrupt")
_EVALUATE_KEYS = (*_MODEL_KEYS, "data.root", "data.val_ann", "data.val_images", *_TEST_SCALE_KEYS,
                  "test.eval_batch_size", "run.num_workers", "run.amp", "run.device")
_PREDICT_KEYS = (*_MODEL_KEYS, *_TEST_SCALE_KEYS, "test.score_threshold", "run.amp", "run.device")
FLOPS_SIZE = (800, 1280)  # the authors' FLOPs input, (H, W)
BENCHMARK_SIZE = (800, 1333)  # mmdet's test scale, (H, W)
TORCHVISION_PEER = "maskrcnn_resnet50_fpn"


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="a crossformer training checkpoint or the authors' mmdetection file")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")


# ---------------------------------------------------------------------------- evaluate


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser)
    parser.add_argument("--results", metavar="FILE", default=None,
                        help="where to write the COCO results JSON (default: beside the checkpoint, <name>.results.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the metrics")


def _check_categories(dataset: Any, loaded: "LoadedDetector", ann_file: Path, checkpoint: str) -> None:
    """A one-line error for an annotation file of other categories than the detector's, naming
    the first that differs (in label order: the file's category ids sorted)."""
    from ..data import DataError

    differ = None
    if loaded.class_names is not None:
        differ = first_category_difference(dataset.class_names, list(loaded.class_names), "the file", "the checkpoint")
    if loaded.detector.num_classes != dataset.num_classes:
        raise DataError(f"{ann_file} has {dataset.num_classes} categories; {checkpoint} detects "
                        f"{loaded.detector.num_classes} classes" + (f" ({differ})" if differ else "")
                        + ": evaluate on the categories it was trained on")
    if differ is not None:
        raise DataError(f"{ann_file} names other categories than {checkpoint} was trained on ({differ}): "
                        f"evaluate on the categories it was trained on (or some of them)")


def _evaluate(args: argparse.Namespace, config: DetectionConfig, given: dict[str, Any]) -> int:
    from ..atomic import check_output_path
    from ..engine import RunLogger, resolve_precision, setup_distributed, skipped_on_stderr, teardown_distributed
    from .checkpoint import load_detector
    from .config import data_paths
    from .data import CocoDetection
    from .evaluate import COCO_METRICS, evaluate_detector, holds_masks, load_ground_truth

    ann_file, image_dir = data_paths(config.data, "val")
    # checked before the evaluation, which may take hours
    results = check_output_path(Path(args.results) if args.results else Path(args.checkpoint).with_suffix(".results.json"),
                                inputs=(args.checkpoint, ann_file))
    ctx = setup_distributed(config.run.device)
    try:
        loaded = load_detector(config, args.checkpoint, ctx.device, args.ema)
        # labelled by the checkpoint's class names: the file may number the categories otherwise
        dataset = CocoDetection(ann_file, image_dir, with_masks=False, transform=config.data.test_transform(),
                                classes=loaded.class_names, skip_missing=config.data.skip_corrupt)
        _check_categories(dataset, loaded, ann_file, args.checkpoint)
        # checked before the images are run (mask AP needs every object's segmentation), on every
        # rank: each stops with the same error rather than wait for rank 0
        ground_truth = load_ground_truth(ann_file, loaded.detector.has_masks)
        logger = RunLogger(None, enabled=ctx.is_main and not args.json)
        absent = dataset.absent_note()
        if absent is not None and ctx.is_main:  # on stderr, as segmentation's: stdout may hold the JSON alone
            print(f"warning: {absent}", file=sys.stderr, flush=True)
        if loaded.detector.has_masks and not holds_masks(ground_truth) and ctx.is_main:
            print(f"warning: {ann_file} has no object masks: box AP only", file=sys.stderr, flush=True)
        metrics = evaluate_detector(
            loaded.detector, dataset, ctx, config.test.eval_batch_size, config.run.num_workers, results_file=results,
            skip_corrupt=config.data.skip_corrupt, logger=logger, precision=resolve_precision(config.run.amp, ctx.device),
            ground_truth=ground_truth, on_skip=skipped_on_stderr("images") if ctx.is_main else None,
        )
    finally:
        teardown_distributed(ctx)
    if not ctx.is_main:
        return 0
    if args.json:
        print(json.dumps({**metrics, "results_file": str(results)}))
        return 0
    types = [t for t in ("bbox", "segm") if f"{t}_mAP" in metrics]
    print(f"{'metric':<8}" + "".join(f"{t:>8}" for t in types))
    for name in COCO_METRICS:
        print(f"{name:<8}" + "".join(f"{metrics[f'{t}_{name}']:8.3f}" for t in types))
    skipped = f", {metrics['skipped']} unreadable skipped" if metrics.get("skipped") else ""
    print(f"{int(metrics['images'])} images{skipped}; results written to {results}")
    return 0


# ---------------------------------------------------------------------------- predict

_NAMED_DETECTIONS = 5  # a line per image names its best few; --json gives them all


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser)
    parser.add_argument("--output", default="output/predict", metavar="DIR",
                        help="where the PNGs and detections.json go (default output/predict)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image (its drawn detections: class, score, COCO box)")


def _predict(args: argparse.Namespace, config: DetectionConfig, given: dict[str, Any]) -> int:
    from ..engine import resolve_device, resolve_precision
    from .checkpoint import load_detector
    from .predict import DetectionPrediction, predict_detections

    def line(result: DetectionPrediction) -> str:
        named = ", ".join(f"{d['category_name']} {d['score']:.2f}" for d in result.shown[:_NAMED_DETECTIONS])
        more = ", ..." if len(result.shown) > _NAMED_DETECTIONS else ""
        drawn = f"{len(result.shown)} drawn: {named}{more}" if result.shown else "none drawn"
        return (f"{shown_path(result.path)}: {shown_path(result.image)} (score >= {threshold}, {drawn}; "
                f"{result.detections} in all)")

    say = result_printer(args.json, dataclasses.asdict, line)

    threshold = config.test.score_threshold
    device = resolve_device(config.run.device)
    loaded = load_detector(config, args.checkpoint, device, args.ema)
    names = loaded.class_names or [f"class {i}" for i in range(loaded.detector.num_classes)]
    result = predict_detections(
        loaded.detector, args.images, args.output, names, loaded.cat_ids, config.data.test_transform(),
        threshold, config.data.skip_corrupt, note_on_stderr,
        resolve_precision(config.run.amp, device), on_result=say,
    )
    skipped = f", {len(result.skipped)} unreadable skipped" if result.skipped else ""
    print(f"wrote {len(result.images)} image(s) with detections scoring >= {threshold} to "
          f"{args.output} and all {result.detections} detections to {result.json_path}{skipped}",
          file=sys.stderr if args.json else sys.stdout)  # --json: stdout holds JSON lines only
    return 0


# ---------------------------------------------------------------------------- flops and benchmark


def _config_classes(verb: str, config: DetectionConfig) -> int:
    """The class count training would build the detector for (COCO's 80 where it cannot be known)."""
    return head_classes(verb, config.model.num_classes, config.data.known_classes, len(COCO_CLASSES), "COCO's")


def _flops(args: argparse.Namespace, config: DetectionConfig, given: dict[str, Any]) -> int:
    import torch

    from .flops import detector_flops
    from .task import build_configured_detector

    refuse_classifier_flags(args, ("--model", "--num-classes", "--traced"), "detector")
    height, width = given_img_size(args) or FLOPS_SIZE
    if height % 32 or width % 32:
        raise UserInputError(f"--img-size: detectors count padded inputs; give multiples of 32, got {height}x{width}")
    with torch.device("meta"):
        detector = build_configured_detector(config.model, _config_classes("flops", config), pretrained=False)
    counts = detector_flops(detector, height, width)
    settings = {"backbone_kwargs": config.model.backbone_kwargs} if config.model.backbone_kwargs else {}
    result = {"model": f"{config.model.kind}_{config.model.backbone}", "detector": config.model.kind,
              "backbone": config.model.backbone, **settings, "img_size": [height, width],
              "num_classes": detector.num_classes, **counts}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"detector    {config.model.kind} on {config.model.backbone}{backbone_settings(config.model.backbone_kwargs)} "
          f"at {height}x{width}, {detector.num_classes} classes")
    print(f"params      {counts['params']:,} ({counts['params'] / 1e6:.1f}M)")
    print(f"MACs        {counts['macs']:,} ({counts['macs'] / 1e9:.1f}G, the authors' convention)")
    return 0


def _benchmark(args: argparse.Namespace, config: DetectionConfig, given: dict[str, Any]) -> int:
    import torchvision

    from ..benchmark import format_summary, run_benchmark, summarise
    from ..commands.benchmark import build_config, ratio_line
    from .bench import ImagesOnly, TorchvisionImages
    from .task import build_configured_detector

    refuse_classifier_flags(args, ("--model", "--num-classes", "--channels-last", "--compile", "--grad-checkpointing",
                                   "--peak"), "detector")
    if args.mode not in (None, "infer"):
        raise UserInputError("the detection benchmark times inference; training speed is logged by crossformer train")
    if args.compare not in (None, "auto", TORCHVISION_PEER):
        raise UserInputError(f"detection compares with torchvision's {TORCHVISION_PEER} only (--compare), got {args.compare!r}")
    height, width = given_img_size(args) or BENCHMARK_SIZE
    args.img_size, args.mode = [height, width], "infer"
    bench = build_config(args)
    batch = bench.batch_size["infer"] = args.batch_size or 1  # a detector's images are 800x1333
    name = f"{config.model.kind}_{config.model.backbone}"
    num_classes = _config_classes("benchmark", config)
    models = {name: lambda: ImagesOnly(build_configured_detector(config.model, num_classes, False), height, width, batch)}
    if args.compare is not None:
        # its transform resizes every input to a shorter side of 800 by default: sized to the
        # benchmark's images, it runs them as they are (the ratio compared 64x64 with 800x800)
        models[TORCHVISION_PEER] = lambda: TorchvisionImages(torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=min(height, width), max_size=max(height, width)).eval())
    log = benchmark_log(args)
    peer = TORCHVISION_PEER if args.compare is not None else None
    summary = summarise(run_benchmark(models, bench, log=log), bench, compare=peer)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(format_summary(summary))
    if peer is not None:
        print(ratio_line(summary, "infer", name, peer))
    return 0


# ---------------------------------------------------------------------------- export


def _export(args: argparse.Namespace, config: DetectionConfig, given: dict[str, Any]) -> int:
    """The detector as ONNX, one image in and its detections out (:class:`.export.DetectionGraph`),
    from an example of the config's test scale unless ``--img-size``; or its weights."""
    import torch

    from ..commands.common import img_size
    from ..commands.export import check_dense_options, check_options, dense_output, write_dense_weights, write_traced
    from .checkpoint import load_detector
    from .export import DetectionGraph
    from .transforms import IMAGENET_MEAN, IMAGENET_STD

    check_dense_options(args, "detector", "mmdet")
    if args.format == "torchscript":
        raise UserInputError("a detector exports to ONNX or safetensors: a traced TorchScript module would keep the "
                             "example's number of detections")
    check_options(args)
    loaded = load_detector(config, args.checkpoint, torch.device("cpu"), args.ema)
    name, output = dense_output(args, config)
    if args.format == "safetensors":
        return write_dense_weights(loaded.detector, loaded.checkpoint, output)
    height, width = img_size(args, default=(config.data.min_size, config.data.max_size))
    graph = DetectionGraph(loaded.detector).eval()
    names = loaded.class_names or [f"class {i}" for i in range(loaded.detector.num_classes)]
    metadata = {
        "crossformer.classes": json.dumps(names),
        "crossformer.input": f"one RGB image resized as the test pipeline does (unpadded), (x - mean) / std on "
                             f"0-255 values: mean {IMAGENET_MEAN}, std {IMAGENET_STD}",
        "crossformer.detections": "boxes xyxy in the input's pixels, best first; labels index crossformer.classes"
                                  + ("; mask_probs: 28x28 per box, paste into the box, threshold 0.5"
                                     if loaded.detector.has_masks else ""),
    }
    if loaded.cat_ids is not None:
        metadata["crossformer.category_ids"] = json.dumps(loaded.cat_ids)
    size_range = None if args.static else graph.size_range(height, width)  # a one-line error below 225 pixels
    return write_traced(args, graph, output, name, height, width, dynamic=not args.static, metadata=metadata,
                        size_range=size_range, batch=1)


COMMANDS: dict[str, VerbHandler] = {
    "evaluate": VerbHandler(_evaluate_arguments, _evaluate, _EVALUATE_KEYS),
    "predict": VerbHandler(_predict_arguments, _predict, _PREDICT_KEYS),
    "flops": VerbHandler(no_arguments, _flops, ()),
    "benchmark": VerbHandler(no_arguments, _benchmark, ()),
    "export": VerbHandler(no_arguments, _export, ()),
}
