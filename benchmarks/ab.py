"""A/B: the model code of a git revision against the working tree, same weights, in turn.

    python benchmarks/ab.py --rev HEAD --model crossformer_tiny --modes infer train --rounds 7
    python benchmarks/ab.py --rev HEAD --model crossformer_pp_small --modes train --amp bf16
    python benchmarks/ab.py --rev HEAD --model crossformer_small --img-size 800 1216 --batch-size 2 \
        --detection-grouping                      # the dense size, group size 7, intervals 8, 4, 2, 1

The revision's network (``models/crossformer.py`` and the modules it imports) is loaded as a
separate package; both models get the same state dict. Prints the median per-round
speed ratio (working tree / revision) and its spread, per mode.
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import crossformer  # noqa: F401  (registers the variants)
from crossformer.benchmark import DEFAULT_BATCH, BenchConfig, format_summary, run_benchmark, summarise
from crossformer.models import VARIANTS, CrossFormer

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str) -> type:
    """The ``CrossFormer`` class as it was at ``rev``: the package at ``rev`` loaded as
    ``crossformer_at_rev``, its two ``__init__`` files emptied so that it registers nothing with
    timm and imports only what the network's modules import (relatively)."""
    root = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "src/crossformer"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")
    pkg = root / "crossformer_at_rev"
    (root / "src" / "crossformer").rename(pkg)
    for init in (pkg / "__init__.py", pkg / "models" / "__init__.py"):
        init.write_text("")
    sys.path.insert(0, str(root))
    return importlib.import_module("crossformer_at_rev.models.crossformer").CrossFormer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--model", default="crossformer_tiny")
    parser.add_argument("--modes", nargs="+", default=["infer"], choices=["infer", "train"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--amp", choices=("bf16",), default=None, help="autocast to bfloat16")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="SIZE", help="H [W]")
    parser.add_argument("--detection-grouping", action="store_true",
                        help="the authors' detection grouping: group size 7, intervals 8, 4, 2, 1")
    args = parser.parse_args()
    arch = dict(VARIANTS[args.model].arch)
    if args.detection_grouping:
        arch.update(group_size=[7, 7, 7, 7], interval=[8, 4, 2, 1])
    old_cls = load_revision(args.rev)

    def new() -> CrossFormer:
        torch.manual_seed(0)
        return CrossFormer(**arch)

    def old() -> CrossFormer:
        model = old_cls(**arch)
        model.load_state_dict(new().state_dict())
        return model

    config = BenchConfig(modes=tuple(args.modes), rounds=args.rounds, memory=False, amp=args.amp,
                         batch_size={m: args.batch_size or DEFAULT_BATCH[m] for m in args.modes},
                         img_size=(args.img_size[0], args.img_size[-1]))
    results = run_benchmark({"worktree": new, args.rev: old}, config,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_summary(summarise(results, config, compare=args.rev)))


if __name__ == "__main__":
    main()
