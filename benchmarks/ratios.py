"""Several models against one peer in one process (the issue #3 protocol), JSON to stdout.

    python benchmarks/ratios.py --models crossformer_tiny crossformer_pp_small \
        --compare swin_tiny_patch4_window7_224 --rounds 9

Same measurement as ``crossformer benchmark --compare`` (crossformer.benchmark), but
several models share the peer's rounds, which halves the time of a full comparison.
"""

from __future__ import annotations

import argparse
import json
import sys

from crossformer.benchmark import DEFAULT_BATCH, BenchConfig, format_summary, run_benchmark, summarise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--compare", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    args = parser.parse_args()
    config = BenchConfig(
        modes=tuple(args.modes),
        batch_size={m: args.batch_size or DEFAULT_BATCH[m] for m in args.modes},
        img_size=(args.img_size, args.img_size),
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        rounds=args.rounds,
        steps=args.steps,
        memory=args.memory,
    )
    names = [*args.models, args.compare]
    results = run_benchmark(names, config, log=lambda m: print(m, file=sys.stderr, flush=True))
    summary = summarise(results, config, compare=args.compare)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
