"""``crossformer predict``: top-k labels with scores for images or folders of images."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import add_model_arg_argument, add_model_argument, model_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--checkpoint", required=True, metavar="FILE")
    add_model_argument(parser, required=False)
    add_model_arg_argument(parser)
    parser.add_argument("--topk", type=int, default=5, metavar="K")
    parser.add_argument("--class-names", metavar="FILE", help="one label per line (for files that record none)")
    parser.add_argument("--img-size", type=int, metavar="N")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from crossformer.classification import predict
    from crossformer.errors import UserInputError

    names = None
    if args.class_names:
        path = Path(args.class_names)
        if not path.is_file():
            raise UserInputError(f"class-names file not found: {path}")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.topk < 1:
        raise UserInputError(f"--topk must be at least 1, got {args.topk}")
    results = predict(args.images, args.checkpoint, model=args.model, topk=args.topk, class_names=names,
                      img_size=args.img_size, batch_size=args.batch_size, use_ema=args.ema, device=args.device, model_kwargs=model_args(args))
    try:
        for result in results:
            if args.json:
                print(json.dumps({"path": result.path, "labels": result.labels, "scores": result.scores}))
            else:
                shown = ", ".join(f"{label} {score:.3f}" for label, score in zip(result.labels, result.scores))
                print(f"{result.path}: {shown}")
            sys.stdout.flush()
    except BrokenPipeError:  # piped into `head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
