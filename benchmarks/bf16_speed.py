"""CPU inference in float32, under plain bf16 autocast, and with the bf16 fast path (issue 15, row 20).

    python benchmarks/bf16_speed.py --model crossformer_tiny --batch-size 32 --rounds 5

The three run in turn each round on the same model and images; prints images/s (median)
and the median per-round speed-up over float32 with its spread. "plain autocast" switches
off :func:`crossformer.models.layers.onednn_inference_bf16` (what autocast gave before it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import timm
import torch

import crossformer  # noqa: F401  (registers the variants)
from crossformer.models import layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crossformer_tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    images = torch.randn(args.batch_size, 3, 224, 224)

    def fp32() -> None:
        with torch.inference_mode():
            model(images)

    def bf16() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)

    def plain_autocast() -> None:
        with mock.patch.object(layers, "onednn_inference_bf16", lambda *a: False):
            bf16()

    runs = {"fp32": fp32, "bf16 plain autocast": plain_autocast, "bf16": bf16}
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        ratios = [a / b for a, b in zip(seconds["fp32"], values)]
        print(f"{args.model} {name:<20} {args.batch_size / statistics.median(values):6.1f} img/s  "
              f"{statistics.median(ratios):.2f}x fp32 [{min(ratios):.2f}, {max(ratios):.2f}]")


if __name__ == "__main__":
    main()
