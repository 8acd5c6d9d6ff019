"""A detector's ONNX file in onnxruntime against the same graph in eager PyTorch, on the CPU.

    python benchmarks/detection_onnx.py --kind mask_rcnn --backbone crossformer_small --img-size 800 1216 --rounds 3

Builds the detector with random weights, its classifiers drawn wide so that the full 100
detections pass the score threshold (the post-processing then does its full work), exports
``DetectionGraph`` (crossformer.detection.export) from the given size, and times both on one
synthetic picture resized to that size, interleaved each round after a warm-up call each.
Prints the median seconds per image and the ratio, with the detections each found.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="mask_rcnn", choices=("retinanet", "mask_rcnn", "cascade_mask_rcnn"))
    parser.add_argument("--backbone", default="crossformer_small")
    parser.add_argument("--img-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import onnxruntime as ort

    from crossformer.detection.detectors import build_detector
    from crossformer.detection.export import DetectionGraph, graph_input
    from crossformer.export import export_onnx

    torch.manual_seed(0)
    detector = build_detector(args.kind, args.backbone, num_classes=80).eval()
    heads = detector.bbox_head if args.kind == "retinanet" else detector.roi_head
    for name, module in heads.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and "reg" not in name:
            torch.nn.init.normal_(module.weight, std=0.3)
    graph = DetectionGraph(detector).eval()
    height, width = args.img_size
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).resize((width, height))
    images, _ = graph_input(picture, max_size=max(height, width), min_size=min(height, width))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detector.onnx"
        start = time.perf_counter()
        export_onnx(graph, path, (height, width), size_range=graph.size_range(height, width), batch=1)
        print(f"{args.kind} on {args.backbone}: exported from {height}x{width} in {time.perf_counter() - start:.0f} s")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_eager() -> int:
            with torch.inference_mode():
                return int(graph(images)[0].shape[0])

        def run_onnx() -> int:
            return int(session.run(None, {"images": images.numpy()})[0].shape[0])

        found = {"pytorch": run_eager(), "onnxruntime": run_onnx()}  # warm-up
        times: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.rounds):
            for name, run in (("pytorch", run_eager), ("onnxruntime", run_onnx)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in median.items():
        print(f"{name:<12} {t:6.2f} s per image  [{min(times[name]):.2f}, {max(times[name]):.2f}]  {found[name]} detections")
    print(f"onnxruntime / pytorch time: {median['onnxruntime'] / median['pytorch']:.2f}x "
          f"(torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
