"""Several models against one peer in one process (the issue #3 protocol), JSON to stdout.

    python benchmarks/ratios.py --models crossformer_tiny crossformer_pp_small \
        --compare swin_tiny_patch4_window7_224 --rounds 9

Same measurement and options as ``crossformer benchmark --compare`` (its flags apply;
``--model`` adds one more model), but several models share the peer's rounds, which halves
the time of a full comparison. The peer defaults to swin_tiny, peak memory is off unless
``--memory``, and the JSON summary always goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

import crossformer  # noqa: F401  (registers the variants)
from crossformer.benchmark import format_summary, run_benchmark, summarise
from crossformer.commands.benchmark import add_arguments, build_config
from crossformer.models import require_known_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--models", nargs="+", default=[], help="the models measured against --compare")
    parser.add_argument("--memory", action="store_false", dest="no_memory", help="also measure peak memory")
    parser.set_defaults(compare="swin_tiny_patch4_window7_224", no_memory=True)
    args = parser.parse_args()
    models = [args.model, *args.models] if args.model else args.models
    if not models:
        parser.error("name the models to measure: --models NAME [NAME ...]")
    names = [*models, args.compare]
    for name in names:
        require_known_model(name)
    config = build_config(args)
    results = run_benchmark(names, config, log=lambda m: print(m, file=sys.stderr, flush=True))
    summary = summarise(results, config, compare=args.compare)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
