"""``crossformer demo``: train, evaluate and predict on the built-in digits (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="output/demo", metavar="DIR", help="where the run goes (default output/demo; replaced)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="change a setting of the digits config, e.g. epochs=5")


def run(args: argparse.Namespace) -> int:
    from crossformer.classification.demo import run_demo
    from crossformer.engine.config import parse_overrides

    run_demo(args.output, parse_overrides(args.overrides))
    return 0
