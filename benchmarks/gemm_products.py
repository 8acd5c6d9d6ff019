"""The three training products of every linear layer, MKL against oneDNN (issue 15, RESULTS row 18).

    python benchmarks/gemm_products.py --model crossformer_tiny --batch-size 16 --rounds 5

For each layer shape of the model at this batch (``crossformer.benchmark.model_gemm_shapes``)
and each product (forward ``x W^T + b``, input gradient ``g W``, weight gradient ``g^T x``):
GFLOP/s of both backends, the median per-round time ratio MKL / oneDNN (interleaved rounds),
and the backend that ``crossformer.models.layers`` picks for it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import crossformer  # noqa: F401  (registers the variants)
from crossformer.benchmark import model_gemm_shapes
from crossformer.models import layers


def _seconds(call, repeats: int = 2) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crossformer_tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with torch.device("meta"):
        model = timm.create_model(args.model)
    shapes = model_gemm_shapes(model, args.batch_size, args.img_size, args.img_size, chunked=False)
    for label, rows, inner, outer, _ in shapes:
        x, weight, bias, grad = torch.randn(rows, inner), torch.randn(outer, inner), torch.randn(outer), torch.randn(rows, outer)
        for product, operands in (("forward", (x, weight, bias)), ("grad_input", (grad, weight, None)),
                                  ("grad_weight", (grad, x, None))):
            calls = {b: (lambda b=b: layers._GEMMS[b](product, *operands)) for b in layers.GEMM_BACKENDS}
            for call in calls.values():
                call()
            times: dict[str, list[float]] = {b: [] for b in calls}
            for _ in range(args.rounds):
                for b, call in calls.items():
                    times[b].append(_seconds(call))
            ratio = statistics.median(m / o for m, o in zip(times["mkl"], times["onednn"]))
            chosen = layers._choose_gemm(product, *operands)[1]
            gflop = 2 * rows * inner * outer / 1e9
            print(f"{label:<14} {product:<11} {rows:>6}x{inner:<4}x{outer:<4} "
                  + "  ".join(f"{b} {gflop / statistics.median(t):6.1f}" for b, t in times.items())
                  + f" GFLOP/s  MKL/oneDNN time {ratio:.2f}  picks {chosen}", flush=True)


if __name__ == "__main__":
    main()
