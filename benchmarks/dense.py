"""Backbones at detection size: inference and a training step, CrossFormer against Swin (issue 15).

    python benchmarks/dense.py --rounds 3            # 800x1216, batch 2, CPU, fp32

Every model runs as a ``features_only`` backbone (four NCHW maps), interleaved in one
process as ``crossformer benchmark`` runs them (:func:`crossformer.benchmark.run_benchmark`):
crossformer_small and crossformer_pp_small with the detection grouping (group size 7,
intervals 8, 4, 2, 1), and timm's ``swin_tiny_patch4_window7_224`` built for the same size.
The training step back-propagates a cross-entropy on the four maps, globally pooled and
concatenated, through every stage, then takes an AdamW step.
"""

from __future__ import annotations

import argparse
import json
import sys

import timm
import torch
import torch.nn as nn

import crossformer  # noqa: F401  (registers the variants)
from crossformer.benchmark import BenchConfig, format_summary, run_benchmark, summarise
from crossformer.models.dense import build_dense_backbone

PEER = "swin_tiny_patch4_window7_224"
DETECTION_GROUPING = dict(group_size=7, interval=(8, 4, 2, 1))


class PooledMaps(nn.Module):
    """``(B, 3, H, W)`` -> every map of a features backbone, pooled and concatenated: ``(B, sum C)``."""

    def __init__(self, backbone: nn.Module, nhwc: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial = (1, 2) if nhwc else (2, 3)  # timm's Swin returns NHWC maps, CrossFormer NCHW

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.mean(self.spatial) for m in self.backbone(x)], dim=1)


def _factories(img_size: tuple[int, int]) -> dict:
    def ours(name: str):
        return lambda: PooledMaps(build_dense_backbone(name, **DETECTION_GROUPING))

    def swin():
        return PooledMaps(timm.create_model(PEER, features_only=True, img_size=img_size), nhwc=True)

    return {"crossformer_small": ours("crossformer_small"), "crossformer_pp_small": ours("crossformer_pp_small"),
            PEER: swin}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--amp", choices=("bf16",), default=None)
    args = parser.parse_args()
    modes = tuple(args.modes)
    config = BenchConfig(modes=modes, batch_size={m: args.batch_size for m in modes}, img_size=tuple(args.img_size),
                         amp=args.amp, rounds=args.rounds, warmup=args.warmup, num_classes=1, memory=False)
    results = run_benchmark(_factories(tuple(args.img_size)), config,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    summary = summarise(results, config, compare=PEER)
    print(format_summary(summary), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
