"""``crossformer export``: a classifier, backbone, segmentor or detector as ONNX, TorchScript or safetensors.

Classifiers, backbones and segmentors (a segmentation ``--config``, or our segmentation
checkpoint) export to ONNX with symbolic batch, height and width; detectors (a detection
``--config`` or checkpoint) with one image of symbolic height and width, their task's
``export`` building the graph."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..variant_table import IMAGENET_CLASSES
from .common import (
    add_img_size_argument,
    add_model_arg_argument,
    add_model_argument,
    class_count,
    img_size,
    model_args,
    recorded_config,
    refuse_given_flags,
    run_task_verb,
)

if TYPE_CHECKING:
    from crossformer.export import SizeRange

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
MIN_OPSET = 18


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, any_timm_model=False)  # our training checkpoints name theirs
    add_model_arg_argument(parser)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="what to write")
    parser.add_argument(
        "--checkpoint", metavar="FILE",
        help="weights to export: official .pth, crossformer training checkpoint, state dict or .safetensors "
        "(default: fresh initialisation)",
    )
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    parser.add_argument("--output", "-o", metavar="FILE", help="file to write (default: MODEL.onnx / .pt / .safetensors)")
    add_img_size_argument(parser, None, "the checkpoint's training size, else 224; a segmentor's sliding "
                                        "window, or a square of its test scale's shorter side; a detector's test scale", purpose="example size")
    parser.add_argument(
        "--num-classes", type=class_count, default=None, metavar="N",
        help="classifier size (default: the checkpoint's head, else a classification --config's data's class "
        "count, else 1000; 0 for pooled features)",
    )
    parser.add_argument(
        "--features", action="store_true",
        help="export the backbone: four NCHW stage maps (strides 4, 8, 16, 32) instead of logits",
    )
    parser.add_argument("--opset", type=int, default=None, metavar="N", help=f"ONNX opset (default 18, at least {MIN_OPSET})")
    parser.add_argument(
        "--static", action="store_true",
        help="ONNX: fix height and width to --img-size (default: dynamic over the printed range)",
    )
    parser.add_argument(
        "--no-check", action="store_true",
        help="ONNX: skip comparing onnxruntime with PyTorch after the export",
    )


def _check_points(size_range, height: int, width: int) -> list[tuple[int, int]]:
    """The example size and the corners of the valid range (an open end: 1.5x the example)."""
    top_h = size_range.max_height or max(height * 3 // 2, size_range.min_height)
    top_w = size_range.max_width or max(width * 3 // 2, size_range.min_width)
    points = [(height, width), (size_range.min_height, top_w), (top_h, size_range.min_width)]
    return list(dict.fromkeys(points))


def _model_settings(args: argparse.Namespace, checkpoint: dict | None, config_settings: dict,
                    trained_classes: int | None) -> tuple[str, dict, int]:
    """Model name, constructor settings and classifier size: the options', else the
    checkpoint's, else (settings) the config's."""
    from crossformer.errors import UserInputError
    from crossformer.models import recorded_model, require_known_model

    name, settings = recorded_model(checkpoint or {}, args.model)
    if not name:
        source = (f"{args.checkpoint} does not name its model and fits no registered variant" if checkpoint
                  else "no --checkpoint to read it from")
        raise UserInputError(f"--model is needed: {source} (e.g. --model crossformer_small)")
    require_known_model(name, variants_only=True)
    settings = {**config_settings, **settings, **model_args(args)}
    num_classes = args.num_classes
    if num_classes is None and checkpoint is None:
        num_classes = IMAGENET_CLASSES
    elif num_classes is None:
        num_classes = trained_classes or 0
    return name, settings, num_classes


def _head_size(args: argparse.Namespace, checkpoint: dict | None) -> int | None:
    """The class count of a checkpoint's trained head (None: no checkpoint, or no head)."""
    from crossformer.models import extract_state_dict

    head = extract_state_dict(checkpoint, use_ema=args.ema, source=args.checkpoint).get("head.weight") if checkpoint else None
    return None if head is None else int(head.shape[0])


def _description(checkpoint: dict | None, name: str, settings: dict, num_classes: int, features: bool,
                 ema: bool, trained_classes: int | None) -> dict:
    """What the safetensors file records about its model: the checkpoint's description, with
    the model as built (name, settings), class names and scores only where they still fit the head,
    whether its weights are the training's EMA (``--ema``) and whether it is a features backbone."""
    from crossformer.models import EMA_WEIGHTS_KEY, checkpoint_description

    description = {**checkpoint_description(checkpoint or {}), "model_name": name, "model_kwargs": settings}
    if ema:
        description[EMA_WEIGHTS_KEY] = True
    names = description.get("class_names")
    if not features and num_classes != trained_classes:
        description.pop("metrics", None)  # a fresh head (--num-classes): the checkpoint's scores are not its
    if features or (isinstance(names, list) and len(names) != num_classes):
        description.pop("class_names", None)
    if features:  # a backbone: no head, no final norm
        description["features_only"] = True
    return description


def check_dense_options(args: argparse.Namespace, kind: str, authors_format: str) -> None:
    """One-line errors for a segmentor's or detector's export (``kind``): the options that
    describe a classifier or backbone (its config describes the model), and no ``--checkpoint``
    (ours or the authors' ``authors_format`` file)."""
    from crossformer.errors import UserInputError

    refuse_given_flags(args, ("--features", "--num-classes", "--model", "--model-arg"),
                       f"is for classifiers and backbones; a {kind}'s config describes it")
    if not args.checkpoint:
        raise UserInputError(f"--checkpoint is needed: the {kind}'s weights (ours or the authors' {authors_format} file)")


def dense_output(args: argparse.Namespace, config: Any) -> tuple[str, Path]:
    """A segmentor's or detector's name (``kind_backbone``) and the file its export writes."""
    from crossformer.atomic import check_output_path

    name = f"{config.model.kind}_{config.model.backbone}"
    return name, check_output_path(args.output or f"{name}{FORMATS[args.format]}", inputs=(args.checkpoint,))


def write_dense_weights(model: Any, checkpoint: Mapping[str, Any], output: Path) -> int:
    """``--format safetensors`` for a segmentor or detector: its weights, with what the
    checkpoint records (classes, and for ours the config it was trained with)."""
    from crossformer.models import checkpoint_description, save_safetensors

    path = save_safetensors(model.state_dict(), output, checkpoint_description(checkpoint))
    print(f"wrote {path} (weights, with the classes and the config our checkpoints record)")
    return 0


def check_options(args: argparse.Namespace) -> None:
    """One-line errors for options no export can use; the ONNX packages when they are needed."""
    from crossformer import export as exporting
    from crossformer.errors import UserInputError

    suffix = Path(args.output).suffix.lower() if args.output else ""
    named = [name for name, ending in FORMATS.items() if ending == suffix and name != args.format]
    if named:  # a TorchScript file named .onnx was written without a word, and failed where it was loaded
        raise UserInputError(f"-o {args.output} ends in {suffix}, the {named[0]} ending, but --format is {args.format}: "
                             f"name it {FORMATS[args.format]}, or pass --format {named[0]}")
    if args.format == "onnx":
        if args.opset is not None and args.opset < MIN_OPSET:
            raise UserInputError(f"--opset must be at least {MIN_OPSET} (LayerNormalization), got {args.opset}")
        exporting.require_onnx()


def write_traced(args: argparse.Namespace, model, output, name: str, height: int, width: int,
                 dynamic: bool, metadata: dict[str, str] | None = None, size_range: SizeRange | None = None,
                 batch: int | None = None) -> int:
    """Write ``model`` (in eval mode) as TorchScript or ONNX (then checked against
    onnxruntime unless ``--no-check``), saying what was written; the exit status.
    ``size_range`` and ``batch``: as :func:`crossformer.export.export_onnx` takes them."""
    from crossformer import export as exporting
    from crossformer.errors import UserInputError

    if args.format == "torchscript":
        path = exporting.export_torchscript(model, output, (height, width))
        print(f"wrote {path} (traced at {height}x{width}; any batch size, that image size only)")
        return 0
    print(f"exporting {name} to ONNX from a {height}x{width} example (this takes a while) ...")
    valid = exporting.export_onnx(model, output, (height, width), dynamic=dynamic, opset=args.opset, metadata=metadata,
                                  size_range=size_range, batch=batch)
    print(f"wrote {output}")
    print(f"valid input sizes: {valid} (outside them: NaN outputs, or an onnxruntime error)")
    if args.no_check:
        return 0
    counted = getattr(model, "counted_outputs", None)  # e.g. "detections": variable-length outputs
    counts: dict[tuple[int, int], int] | None = {} if counted else None
    try:
        errors = exporting.compare_onnx(model, output, _check_points(valid, height, width), batch=batch or 1,
                                        counts=counts)
    except UserInputError as err:
        print(f"not checked: {err}")
        return 0
    report = ", ".join(f"{err:.1e} at {h}x{w}" for (h, w), err in errors.items())
    print(f"max |onnxruntime - pytorch| (relative to outputs above 1): {report}")
    if counts is not None:
        found = ", ".join(f"{n} at {h}x{w}" for (h, w), n in counts.items())
        empty = not any(counts.values())
        print(f"{counted} compared on random images: {found}"
              + ("; none found, so compare the file with PyTorch on your own images" if empty else ""))
    if not all(err <= 1e-4 for err in errors.values()):
        print("error: onnxruntime and PyTorch disagree by more than 1e-4 (relative to outputs above 1)")
        return 1
    return 0


def _misfit(args: argparse.Namespace, checkpoint: Mapping[str, Any], name: str, settings: dict[str, Any],
            model: Any) -> str:
    """Why the weights of ``checkpoint`` do not load into ``model`` (``name`` with ``settings``):
    the first differences and the flags to change, as evaluate and predict say it (the hint
    went past the 400 characters of a listing of keys)."""
    from crossformer.classification.model import misfit_message
    from crossformer.models import extract_state_dict
    from crossformer.models.weights import unwrap_model

    expected = unwrap_model(model)[0].state_dict()
    # the head and final norm of a model built without them (features, --num-classes 0) are no difference
    weights = {k: v for k, v in extract_state_dict(checkpoint, use_ema=args.ema, source=args.checkpoint).items()
               if not k.startswith(("head.", "norm.")) or f"{k.split('.')[0]}.weight" in expected}
    return misfit_message(args.checkpoint, checkpoint, name, settings, weights, expected)


def run(args: argparse.Namespace, model_kwargs: dict | None = None) -> int:
    """Export a classifier or backbone; ``model_kwargs``: constructor settings of ``--model``
    (a classification config's ``model.kwargs``). A detection or segmentation checkpoint
    of ours goes to its task's ``export`` (as ``--config`` does)."""
    import warnings

    import timm

    import crossformer.models  # noqa: F401  (registers the variants)
    from crossformer import export as exporting
    from crossformer.atomic import check_output_path
    from crossformer.errors import UserInputError, one_line, settings_that_fail
    from crossformer.models import CheckpointError, extract_state_dict, load_state, read_checkpoint, save_safetensors

    if not args.config and args.checkpoint and recorded_config(args.checkpoint)[0] is not None:
        return run_task_verb(args, "export", args.overrides)
    check_options(args)
    model = None
    try:
        checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
        trained_classes = _head_size(args, checkpoint)
        name, settings, num_classes = _model_settings(args, checkpoint, model_kwargs or {}, trained_classes)
        height, width = img_size(args, default=(checkpoint or {}).get("img_size", 224))
        output = check_output_path(args.output or f"{name}{'_features' if args.features else ''}{FORMATS[args.format]}",
                                   inputs=[args.checkpoint] if args.checkpoint else [])
        if checkpoint and checkpoint.get("model_kwargs") and name == checkpoint.get("model_name"):
            shown = ", ".join(f"{k}={v}" for k, v in settings.items())
            print(f"model {name} with the checkpoint's settings: {shown}")
        with settings_that_fail(name, settings):
            model = timm.create_model(name, num_classes=num_classes, features_only=args.features, **settings)
        if checkpoint is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load_state(model, checkpoint, args.checkpoint, use_ema=args.ema)
            for warning in caught:
                print(f"warning: {one_line(warning.message, 400)}")
    except CheckpointError as err:
        if model is None or checkpoint is None:
            raise UserInputError(one_line(err, 400)) from None
        raise UserInputError(_misfit(args, checkpoint, name, settings, model)) from None
    model.eval()

    if args.format == "safetensors":
        description = _description(checkpoint, name, settings, num_classes, args.features, args.ema, trained_classes)
        if checkpoint is not None and not args.features and args.num_classes is None:
            # An unchanged checkpoint is converted as it is; otherwise the model as built.
            path = save_safetensors(extract_state_dict(checkpoint, use_ema=args.ema, source=args.checkpoint), output,
                                    description)
        else:
            path = exporting.export_safetensors(model, output, description)
        print(f"wrote {path} (weights, with the model's name and settings; load with crossformer.load_checkpoint, "
              "or give it to predict / evaluate as --checkpoint)")
        return 0
    metadata = None if args.features or not num_classes else _classifier_metadata(checkpoint or {})
    return write_traced(args, model, output, name, height, width, dynamic=not args.static, metadata=metadata)


def _classifier_metadata(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """What a classifier's ONNX file says of its input and labels (as the dense tasks' files
    do): the preprocessing ``crossformer predict`` applies, and the class names the checkpoint
    records, where it records them."""
    import json

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    size = checkpoint.get("img_size", 224)
    crop_pct, interpolation = checkpoint.get("crop_pct", 0.875), checkpoint.get("interpolation", "bicubic")
    metadata = {"crossformer.input": f"RGB, resized ({interpolation}) to img_size / crop_pct and centre-cropped to "
                                     f"img_size (img_size {size}, crop_pct {crop_pct}), then (x / 255 - mean) / std: "
                                     f"mean {tuple(IMAGENET_DEFAULT_MEAN)}, std {tuple(IMAGENET_DEFAULT_STD)}"}
    if checkpoint.get("class_names"):
        metadata["crossformer.classes"] = json.dumps(list(checkpoint["class_names"]))
    return metadata
