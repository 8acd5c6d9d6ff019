"""Top-1 agreement of CPU bf16 autocast with float32 on a trained checkpoint (issue 15).

    crossformer demo --output /tmp/demo        # trains the digits model
    python benchmarks/bf16_agreement.py --checkpoint /tmp/demo/best.pth --data ~/.cache/crossformer/digits

Runs the held-out split through the model twice per batch (float32, then bf16 autocast), as
``crossformer evaluate`` prepares it, and prints the share of images whose top-1 class is
the same, each precision's accuracy and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json

import torch

from crossformer.classification.model import load_classifier
from crossformer.data import ImageFolderDataset, build_eval_transform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    loaded = load_classifier(args.checkpoint, None, None, False, torch.device("cpu"), None)
    transform = build_eval_transform(loaded.img_size, loaded.crop_pct, loaded.interpolation)
    dataset = ImageFolderDataset(args.data, args.split, classes=loaded.class_names, transform=transform)
    model = loaded.model.eval()
    same = correct32 = correct16 = 0
    max_diff = 0.0
    for start in range(0, len(dataset), args.batch_size):
        items = [dataset[i] for i in range(start, min(start + args.batch_size, len(dataset)))]
        images = torch.stack([image for image, _, _ in items])
        targets = torch.tensor([target for _, target, _ in items])
        with torch.inference_mode():
            fp32 = model(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(images).float()
        same += int((fp32.argmax(1) == bf16.argmax(1)).sum())
        correct32 += int((fp32.argmax(1) == targets).sum())
        correct16 += int((bf16.argmax(1) == targets).sum())
        max_diff = max(max_diff, (fp32 - bf16).abs().max().item())
    n = len(dataset)
    print(json.dumps({"images": n, "top1_agreement": same / n, "acc1_fp32": correct32 / n, "acc1_bf16": correct16 / n,
                      "max_logit_diff": max_diff}))


if __name__ == "__main__":
    main()
