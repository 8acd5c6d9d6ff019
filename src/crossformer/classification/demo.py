"""The demo: train a small CrossFormer on the built-in digits, then evaluate and predict."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..data import ImageFolderDataset
from ..engine import LAST, RUN_FILES, claim_demo_output
from .config import resolve_config
from .evaluate import evaluate
from .predict import predict
from .task import train

__all__ = ["run_demo", "DEMO_TARGET_ACC1", "DEFAULT_OUTPUT"]

DEMO_TARGET_ACC1 = 97.0
DEFAULT_OUTPUT = "output/demo"


def run_demo(output: str | Path = DEFAULT_OUTPUT, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Train with the bundled ``digits`` config from scratch in ``output``; print and return
    the held-out top-1 accuracy and the wall time.

    A demo always starts afresh: its own earlier run in ``output`` is replaced (and it says
    which files); a folder holding anything else is refused (:func:`~crossformer.engine.claim_demo_output`).
    """
    start = time.perf_counter()
    output = Path(output)
    claim_demo_output(output, "classification", RUN_FILES, DEFAULT_OUTPUT)
    # (overwrite: the folder now holds the demo's mark alone)
    config = resolve_config("digits", overrides={"output": str(output), "overwrite": True, **(overrides or {})})
    root = config.data.folder()
    print(f"data: scikit-learn digits as 32x32 images in {root}")
    train(config)
    # The final weights, not best.pth: choosing the best epoch on the held-out split would flatter it.
    final = output / LAST
    metrics = evaluate(final, root, batch_size=config.run.batch_size, num_workers=0, device=config.run.device)
    print(f"evaluate {final}: top-1 {metrics['acc1']:.2f}%  top-5 {metrics['acc5']:.2f}%  "
          f"loss {metrics['loss']:.4f} on {metrics['images']} held-out images")
    held_out = ImageFolderDataset(root, "val")
    samples = held_out.samples[::71][:5]  # a few held-out images of several classes
    for (path, target), result in zip(samples, predict([p for p, _ in samples], final, topk=3, device=config.run.device)):
        shown = ", ".join(f"{label} {score:.2f}" for label, score in zip(result.labels, result.scores))
        print(f"predict {path}: {shown}  (true {held_out.classes[target]})")
    elapsed = time.perf_counter() - start
    verdict = "reached" if metrics["acc1"] >= DEMO_TARGET_ACC1 else "did NOT reach"
    print(f"demo: held-out top-1 {metrics['acc1']:.2f}% ({verdict} the {DEMO_TARGET_ACC1:.0f}% target) "
          f"in {elapsed:.0f}s wall time")
    logs = ", ".join(f"{output / name}" for name in ("log.txt", "metrics.jsonl") if (output / name).exists())
    board = f"; tensorboard --logdir {output / 'tensorboard'}" if (output / "tensorboard").is_dir() else ""
    print(f"demo: checkpoints {output / LAST} and {output / 'best.pth'}; logs {logs}{board}")
    return {"acc1": metrics["acc1"], "seconds": elapsed}
