"""``crossformer evaluate``: top-1 / top-5 / loss of a checkpoint on DATA/val."""

from __future__ import annotations

import argparse
import json

from .common import add_model_arg_argument, add_model_argument, model_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="ours (.pth/.safetensors) or the authors' release")
    parser.add_argument("--data", required=True, metavar="PATH", help="folder with val/<class>/* (or validation/)")
    add_model_argument(parser, required=False)
    add_model_arg_argument(parser)
    parser.add_argument("--split", default="val", help="split folder to evaluate (default val)")
    parser.add_argument("--img-size", type=int, metavar="N", help="default: the checkpoint's (224 for official files)")
    parser.add_argument("--crop-pct", type=float, metavar="F", help="centre-crop ratio (default 0.875: resize 256, crop 224)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N")
    parser.add_argument("--num-workers", type=int, default=4, metavar="N")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--amp", default="auto", choices=("auto", "none", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda")
    parser.add_argument("--skip-corrupt", action="store_true", help="count and skip unreadable images")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import os

    from crossformer.classification import evaluate

    metrics = evaluate(
        args.checkpoint, args.data, model=args.model, split=args.split, img_size=args.img_size,
        crop_pct=args.crop_pct, batch_size=args.batch_size, num_workers=args.num_workers, use_ema=args.ema,
        amp=args.amp, device=args.device, skip_corrupt=args.skip_corrupt, model_kwargs=model_args(args),
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports the reduced metrics
        return 0
    if args.json:
        print(json.dumps(metrics))
    else:
        skipped = f", {metrics['skipped']} unreadable skipped" if metrics["skipped"] else ""
        print(f"{metrics['model']} at {metrics['img_size']}: top-1 {metrics['acc1']:.2f}%  top-5 {metrics['acc5']:.2f}%  "
              f"loss {metrics['loss']:.4f}  ({metrics['images']} images{skipped})")
    return 0
