"""``crossformer export``: a model (and its checkpoint) as ONNX, TorchScript or safetensors."""

from __future__ import annotations

import argparse

from .common import (
    add_img_size_argument,
    add_model_arg_argument,
    add_model_argument,
    img_size,
    model_args,
    require_model,
)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
MIN_OPSET = 18


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_model_arg_argument(parser)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="what to write")
    parser.add_argument(
        "--checkpoint", metavar="FILE",
        help="weights to export: official .pth, crossformer training checkpoint, state dict or .safetensors "
        "(default: fresh initialisation)",
    )
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    parser.add_argument("--output", "-o", metavar="FILE", help="file to write (default: MODEL.onnx / .pt / .safetensors)")
    add_img_size_argument(parser)
    parser.add_argument(
        "--num-classes", type=int, default=None, metavar="N",
        help="classifier size (default: the checkpoint's head, else 1000; 0 for pooled features)",
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


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checkpoint_classes(path: str, use_ema: bool) -> int | None:
    """Classifier size recorded in a checkpoint (None: it has no head)."""
    from crossformer.models import extract_state_dict, read_checkpoint

    head = extract_state_dict(read_checkpoint(path), use_ema=use_ema).get("head.weight")
    return None if head is None else int(head.shape[0])


def _check_points(size_range, height: int, width: int) -> list[tuple[int, int]]:
    """The example size and the corners of the valid range (an open end: 1.5x the example)."""
    top_h = size_range.max_height or max(height * 3 // 2, size_range.min_height)
    top_w = size_range.max_width or max(width * 3 // 2, size_range.min_width)
    points = [(height, width), (size_range.min_height, top_w), (top_h, size_range.min_width)]
    return list(dict.fromkeys(points))


def run(args: argparse.Namespace) -> int:
    import warnings

    import timm

    import crossformer  # noqa: F401  (registers the variants)
    from crossformer import export as exporting
    from crossformer.errors import UserInputError
    from crossformer.models import CheckpointError, load_checkpoint

    require_model(args.model, variants_only=True)
    height, width = img_size(args)
    if args.num_classes is not None and args.num_classes < 0:
        raise UserInputError(f"--num-classes must be 0 or more, got {args.num_classes}")
    if args.format == "onnx":
        if args.opset is not None and args.opset < MIN_OPSET:
            raise UserInputError(f"--opset must be at least {MIN_OPSET} (LayerNormalization), got {args.opset}")
        exporting._require_onnx()
    output = args.output or f"{args.model}{'_features' if args.features else ''}{FORMATS[args.format]}"

    try:
        num_classes = args.num_classes
        if num_classes is None:
            found = _checkpoint_classes(args.checkpoint, args.ema) if args.checkpoint else 1000
            num_classes = 0 if found is None else found
        settings = model_args(args)
        try:
            model = timm.create_model(args.model, num_classes=num_classes, features_only=args.features, **settings)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"cannot build {args.model} with {settings}: {err}") from None
        if args.checkpoint:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load_checkpoint(model, args.checkpoint, use_ema=args.ema)
            for warning in caught:
                print(f"warning: {_one_line(str(warning.message))}")
    except CheckpointError as err:
        raise UserInputError(_one_line(str(err))) from None
    model.eval()

    if args.format == "safetensors":
        plain = args.checkpoint and not args.features and args.num_classes is None
        # An unchanged checkpoint is converted as it is; otherwise the model as built.
        path = exporting.export_safetensors(args.checkpoint if plain else model, output)
        print(f"wrote {path} (weights only; load with crossformer.load_checkpoint)")
        return 0
    if args.format == "torchscript":
        path = exporting.export_torchscript(model, output, (height, width))
        print(f"wrote {path} (traced at {height}x{width}; any batch size, that image size only)")
        return 0

    print(f"exporting {args.model} to ONNX from a {height}x{width} example (this takes a while) ...")
    valid = exporting.export_onnx(model, output, (height, width), dynamic=not args.static, opset=args.opset)
    print(f"wrote {output}")
    print(f"valid input sizes: {valid} (outputs are NaN outside)")
    if args.no_check:
        return 0
    try:
        errors = exporting.compare_onnx(model, output, _check_points(valid, height, width))
    except UserInputError as err:
        print(f"not checked: {err}")
        return 0
    report = ", ".join(f"{err:.1e} at {h}x{w}" for (h, w), err in errors.items())
    print(f"max |onnxruntime - pytorch|: {report}")
    if not all(err <= 1e-4 for err in errors.values()):
        print("error: onnxruntime and PyTorch disagree by more than 1e-4")
        return 1
    return 0
