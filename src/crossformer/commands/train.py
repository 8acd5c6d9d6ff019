"""``crossformer train``: train a classifier on an ImageNet-layout folder (or the built-in digits).

Many processes: ``torchrun --nproc-per-node N -m crossformer train ...``.
"""

from __future__ import annotations

import argparse

from .common import add_model_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, required=False)
    parser.add_argument("--data", metavar="PATH", help="folder with train/<class>/* and val/<class>/* (default: built-in digits)")
    parser.add_argument("--output", metavar="DIR", help="checkpoints and logs go here (default output/train)")
    parser.add_argument("--config", metavar="FILE", help="YAML settings, or a bundled name (default: the model's own, e.g. crossformer_small; with no --model: digits)")
    parser.add_argument("--epochs", type=int, metavar="N")
    parser.add_argument("--batch-size", type=int, metavar="N", help="images per process (global batch = N x processes x accum_steps)")
    parser.add_argument("--img-size", type=int, metavar="N")
    parser.add_argument("--resume", metavar="auto|FILE", help="continue a run: 'auto' takes OUTPUT/last.pth when it exists")
    parser.add_argument("--pretrained", metavar="FILE", help="start from these weights (official files work; a head of another size is re-initialised)")
    parser.add_argument("--device", metavar="auto|cpu|cuda", help="default auto: this rank's GPU if any, else the CPU")
    parser.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), help="mixed precision (auto: bf16/fp16 on GPU, none on CPU)")
    parser.add_argument("--num-workers", type=int, metavar="N", help="data-loading processes per training process")
    parser.add_argument("--seed", type=int, metavar="N")
    parser.add_argument("--deterministic", action="store_true", default=None, help="bitwise reproducible (slower)")
    parser.add_argument("--skip-corrupt", action="store_true", default=None, help="count and skip unreadable images instead of stopping")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting of the config, e.g. base_lr=1e-3 model_kwargs.embed_dim=32")


# command-line flag -> config setting
_FLAGS = ("data", "output", "epochs", "batch_size", "img_size", "resume", "pretrained", "device", "amp",
          "num_workers", "seed", "deterministic", "skip_corrupt")


def run(args: argparse.Namespace) -> int:
    from crossformer.classification import resolve_config, train
    from crossformer.engine import NonFiniteLossError
    from crossformer.engine.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    overrides.update({name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None})
    # Nothing named at all: the small digits configuration on the built-in data set.
    config_name = args.config or (None if args.model else "digits")
    config = resolve_config(config_name, args.model, overrides)
    try:
        metrics = train(config)
    except NonFiniteLossError as err:
        print(f"crossformer train: stopped: {err}")
        return 1
    return 0 if metrics else 1
