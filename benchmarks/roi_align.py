"""RoIAlign on the CPU: torchvision's function against ours (rows 24 and 60 of RESULTS.md).

    python benchmarks/roi_align.py --reps 5

For each case, the forward alone (inference: ours splits the rois over torch's threads) and
forward + backward (ours: matrix products on maps of at most ``MATMUL_BACKWARD_PIXELS`` pixels,
torchvision's kernel above) run in turn on the same map, rois and output gradient (2 warm-up
rounds, then ``--reps`` timed ones). Prints the mean times, the speed-ups and the largest
differences. ``--matmul-always`` times the matrix-product backward on every map, to check the
threshold.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from crossformer.detection import roi_align as roi_align_module
from crossformer.detection.roi_align import roi_align

# (images, channels, height, width, rois, output size, scale, longest roi side in input pixels)
CASES = [
    (4, 64, 28, 28, 256, 7, 0.25, 110),  # the detection demo's box head (112-pixel images)
    (4, 64, 28, 28, 64, 14, 0.25, 110),  # ... and its mask head
    (4, 64, 40, 40, 256, 7, 0.25, 150),
    (4, 64, 64, 64, 256, 7, 0.25, 250),
    (2, 256, 50, 76, 500, 7, 0.0625, 600),
    (2, 256, 100, 152, 512, 7, 0.125, 300),
    (2, 256, 200, 304, 512, 7, 0.25, 110),  # P2 at 800x1216
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--matmul-always", action="store_true", help="our backward's products on every map")
    args = parser.parse_args()
    if args.matmul_always:
        roi_align_module.MATMUL_BACKWARD_PIXELS = 1 << 40
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; our backward's products on maps of at most "
          f"{roi_align_module.MATMUL_BACKWARD_PIXELS} pixels")
    for n, channels, height, width, count, size, scale, longest in CASES:
        features = torch.randn(n, channels, height, width, requires_grad=True)
        corner = torch.rand(count, 2) * torch.tensor([width / scale, height / scale]) * 1.1 - 5
        rois = torch.cat([torch.randint(0, n, (count, 1)).float(), corner, corner + torch.rand(count, 2) * longest], 1)
        grad = torch.randn(count, channels, size, size)
        functions = {"torchvision": lambda: torchvision_roi_align(features, rois, size, scale, 0, aligned=True),
                     "ours": lambda: roi_align(features, rois, size, scale)}
        times = {(mode, name): 0.0 for mode in ("forward", "train") for name in functions}
        errors = {}
        for rep in range(2 + args.reps):
            for mode in ("forward", "train"):
                results = {}
                for name, fn in functions.items():
                    start = time.perf_counter()
                    if mode == "forward":
                        with torch.no_grad():
                            results[name] = fn()
                    else:
                        (results[name],) = torch.autograd.grad(fn(), features, grad)
                    if rep >= 2:
                        times[mode, name] += (time.perf_counter() - start) / args.reps
                errors[mode] = (results["ours"] - results["torchvision"]).abs().max().item()
        line = f"{height}x{width} C{channels} {count} rois {size}x{size}:"
        for mode, label in (("forward", "forward"), ("train", "forward+backward")):
            tv, ours = times[mode, "torchvision"], times[mode, "ours"]
            line += (f" {label} torchvision {tv * 1e3:.1f} ms, ours {ours * 1e3:.1f} ms, {tv / ours:.2f}x"
                     f" (max diff {errors[mode]:.1e});")
        print(line)

if __name__ == "__main__":
    main()
