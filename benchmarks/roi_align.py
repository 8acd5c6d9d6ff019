"""RoIAlign forward + backward on the CPU: torchvision's kernels against ours (row 24 of RESULTS.md).

    python benchmarks/roi_align.py --reps 5

Both run in turn on the same map, rois and output gradient (2 warm-up pairs, then ``--reps``
timed pairs); prints the mean times, the speed-up and the largest differences. Our function
is timed whatever the map's size, so the threshold ``MATMUL_BACKWARD_PIXELS`` can be checked.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from crossformer.detection.roi_align import MATMUL_BACKWARD_PIXELS, _RoIAlign

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
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; ours is used for maps of at most {MATMUL_BACKWARD_PIXELS} pixels")
    for n, channels, height, width, count, size, scale, longest in CASES:
        features = torch.randn(n, channels, height, width, requires_grad=True)
        corner = torch.rand(count, 2) * torch.tensor([width / scale, height / scale]) * 1.1 - 5
        rois = torch.cat([torch.randint(0, n, (count, 1)).float(), corner, corner + torch.rand(count, 2) * longest], 1)
        grad = torch.randn(count, channels, size, size)
        times = {"torchvision": 0.0, "ours": 0.0}
        for rep in range(2 + args.reps):
            for name, fn in (("torchvision", lambda: torchvision_roi_align(features, rois, size, scale, 0, aligned=True)),
                             ("ours", lambda: _RoIAlign.apply(features, rois, size, scale))):
                start = time.perf_counter()
                (got,) = torch.autograd.grad(fn(), features, grad)
                if rep >= 2:
                    times[name] += (time.perf_counter() - start) / args.reps
                if name == "torchvision":
                    want = got
            error = (got - want).abs().max().item()
        print(f"{height}x{width} C{channels} {count} rois {size}x{size}: torchvision {times['torchvision'] * 1e3:.1f} ms, "
              f"ours {times['ours'] * 1e3:.1f} ms, {times['torchvision'] / times['ours']:.2f}x; max |grad diff| {error:.1e}")


if __name__ == "__main__":
    main()
