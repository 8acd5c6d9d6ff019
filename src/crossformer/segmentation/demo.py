"""The segmentation demo and its data: ``crossformer make-data ade DIR`` and
``crossformer demo --task segmentation`` (a small UPerNet that learns the synthetic set on
2 CPU cores in a few minutes, then evaluation single-scale and multi-scale + flip, and overlays)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..engine import LAST, claim_demo_output

__all__ = ["make_data", "write_ade", "run_demo", "DEMO_CONFIG", "DEMO_TARGET_MIOU", "DEMO_IMAGES", "DEFAULT_OUTPUT"]

DEMO_CONFIG = "upernet_demo"
DEMO_TARGET_MIOU = 0.5
DEMO_IMAGES = 200
DEFAULT_OUTPUT = "output/demo-segmentation"


def make_data(root: str | Path, images: int = DEMO_IMAGES, seed: int = 0, val_fraction: float = 0.2) -> Path:
    """Write the synthetic ADE20K-layout set (JPEG images, PNG label maps, 0 = unlabelled,
    ``classes.txt``; ``val_fraction`` of the images in ``validation``) under ``root``; returns its
    ADEChallengeData2016 folder."""
    from .synthetic import make_ade_dataset

    return make_ade_dataset(root, images=images, seed=seed, val_fraction=val_fraction)


def write_ade(root: Path, images: int, seed: int, val_fraction: float) -> str:
    """``crossformer make-data ade DIR``: :func:`make_data`, and one line saying what was written."""
    ade = make_data(root, images, seed, val_fraction)
    train = len(list((ade / "images" / "training").glob("*.jpg")))
    val = len(list((ade / "images" / "validation").glob("*.jpg")))
    return (f"wrote an ADE20K-layout set to {ade}: {train} training / {val} validation images, "
            f"7 classes in classes.txt, label 0 = unlabelled (images/, annotations/)")


def run_demo(output: str | Path = DEFAULT_OUTPUT, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Write the synthetic set (once) under ``output/data``, train the bundled ``upernet_demo``
    config from scratch in ``output/train``, evaluate the final weights on the held-out split
    single-scale and multi-scale + flip, and write overlays of a few held-out images to
    ``output/predict``. Prints and returns ``mIoU``, ``mIoU_ms_flip``, ``train_seconds``, ``seconds``."""
    from ..engine.registry import resolve_config
    from .checkpoint import load_segmentor
    from .data import ade20k_dataset
    from .evaluate import evaluate_segmentor
    from .predict import predict_images
    from .task import train

    start = time.perf_counter()
    output = Path(output)
    claim_demo_output(output, "segmentation", ("data", "train", "predict"), DEFAULT_OUTPUT, keep=("data",))
    data = output / "data"
    if not (data / "ADEChallengeData2016" / "classes.txt").is_file():
        make_data(data)
    print(f"data: {DEMO_IMAGES} synthetic scenes (7 classes, ADE20K layout) in {data}")
    run_dir = output / "train"
    config = resolve_config(
        DEMO_CONFIG, {"data.root": str(data), "run.output": str(run_dir), **(overrides or {})}, task="segmentation"
    ).config
    train_start = time.perf_counter()
    train(config)
    train_seconds = time.perf_counter() - train_start
    # The final weights, not best.pth: choosing by the held-out split would flatter it.
    final = run_dir / LAST
    segmentor, _ = load_segmentor(config, final)
    held_out = ade20k_dataset(data, "validation")
    results = {}
    for name, inference in (("single scale", config.test.inference()),
                            ("multi-scale + flip", config.test.inference(multi_scale=True, flip=True))):
        metrics = evaluate_segmentor(segmentor, held_out, inference)
        results[name] = metrics.miou
        print(f"evaluate {final} ({name}): mIoU {100 * metrics.miou:.2f}  mAcc {100 * metrics.macc:.2f}  "
              f"aAcc {100 * metrics.aacc:.2f} on {metrics.images} held-out images")
    print(f"per class (multi-scale + flip):\n{metrics.table()}")
    images = [path for path, _ in held_out.samples[:4]]
    predictions, _ = predict_images(segmentor, images, output / "predict", held_out.classes, held_out.palette,
                                    config.test.inference(), reduce_zero_label=True)
    for p in predictions:
        print(f"predict {p.path}: {p.overlay} ({', '.join(p.classes)})")
    elapsed = time.perf_counter() - start
    miou = results["single scale"]
    verdict = "reached" if miou >= DEMO_TARGET_MIOU else "did NOT reach"
    print(f"demo: held-out mIoU {100 * miou:.2f} single scale, {100 * results['multi-scale + flip']:.2f} multi-scale + flip "
          f"({verdict} the {100 * DEMO_TARGET_MIOU:.0f} target) after {train_seconds:.0f}s of training, "
          f"{elapsed:.0f}s wall time in all")
    return {"mIoU": miou, "mIoU_ms_flip": results["multi-scale + flip"], "train_seconds": train_seconds,
            "seconds": elapsed, "output": str(output)}
