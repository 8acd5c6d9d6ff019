"""``crossformer flops``: parameters and MACs in the papers' convention."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..variant_table import IMAGENET_CLASSES
from .common import add_img_size_argument, add_model_argument, class_count, img_size, model_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, any_timm_model=False)
    add_img_size_argument(parser, 224, "224; with --config: a classification config's image size, a detector's "
                                       "800x1280, a segmentor's 512x2048")
    parser.add_argument("--num-classes", type=class_count, default=None, metavar="N",
                        help="classifier size (default: a classification --config's data's class count, else 1000)")
    parser.add_argument(
        "--traced", action="store_true",
        help="also count the MACs that actually execute (padding included) by running the model",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, model_kwargs: dict[str, Any] | None = None) -> int:
    """``model_kwargs``: constructor settings of ``--model`` (a classification config's ``model.kwargs``)."""
    import timm
    import torch

    from crossformer.classification.model import create_classifier
    from crossformer.models import VARIANTS, CrossFormer, analytic_macs, count_params, require_known_model, traced_macs
    from crossformer.errors import UserInputError

    settings = dict(model_kwargs or {})
    height, width = img_size(args)
    num_classes = IMAGENET_CLASSES if args.num_classes is None else args.num_classes
    name = model_name(args, any_timm_model=False)
    if not timm.is_model(name):  # an unknown name: the ones it takes, CrossFormers (registered with timm)
        require_known_model(name, variants_only=True)
    with torch.device("meta") if not args.traced else torch.device("cpu"):
        # settings it cannot take are one line naming them, as in every command that builds one
        model = create_classifier(name, num_classes, model_kwargs=settings)
    if not isinstance(model, CrossFormer):
        raise UserInputError(f"{args.model} is not a CrossFormer: the analytic count applies to CrossFormer only")
    result = {
        "model": args.model,
        **({"model_kwargs": settings} if settings else {}),  # what the text's model line shows
        "img_size": [height, width],
        "num_classes": num_classes,
        "params": count_params(model),
        "macs": analytic_macs(model, height, width),
    }
    if args.traced:
        result["traced_macs"] = traced_macs(model, height, width)
    variant = VARIANTS.get(args.model)
    if variant is not None and num_classes == IMAGENET_CLASSES and not settings:
        result.update(paper_params_m=variant.paper_params_m, paper_gflops=variant.paper_gflops)
    if args.json:
        print(json.dumps(result))
        return 0
    described = "".join(f", {key}={value}" for key, value in settings.items())
    print(f"model       {args.model}{described} at {height}x{width}, {num_classes} classes")
    print(f"params      {result['params']:,} ({result['params'] / 1e6:.1f}M)")
    print(f"MACs        {result['macs']:,} ({result['macs'] / 1e9:.3f}G, official analytic counter)")
    if args.traced:
        print(f"traced MACs {result['traced_macs']:,} ({result['traced_macs'] / 1e9:.3f}G, executed incl. padding)")
    if "paper_gflops" in result:
        # the papers' figures are at 224x224, whatever size was counted here
        print(f"paper       {result['paper_params_m']}M params / {result['paper_gflops']}G FLOPs at 224x224")
    return 0
