"""The classification task's command-line verbs beyond ``train`` (registry ``COMMANDS``).

Settings come from the configuration keys given explicitly (flags, ``KEY=VALUE``, a
``--config`` file); what none of them gives is taken from the checkpoint (its model, input
size, crop, classes), as for the authors' files with ``--model``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..commands.common import add_model_arg_argument, model_args, note_on_stderr, result_printer, shown_path
from ..engine.launch import launched_rank
from ..engine.registry import VerbHandler, no_arguments
from .config import ClassificationConfig

__all__ = ["COMMANDS"]

# what inference reads of a classification config
_INFERENCE_KEYS = ("model.name", "data", "test", "run.batch_size", "run.num_workers", "run.amp", "run.device")


def _kwargs(args: argparse.Namespace, config: ClassificationConfig) -> dict[str, Any]:
    return {**config.model.kwargs, **model_args(args)}


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="ours (.pth/.safetensors) or the authors' release")
    add_model_arg_argument(parser)
    parser.add_argument("--split", default="val", help="split folder to evaluate (default val)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _recorded_data_root(checkpoint: str) -> Path | None:
    """The data folder a classification checkpoint of ours records (``config.data.root``; null:
    the built-in digits), None for other files; one that is gone is an error."""
    from ..checkpoint_files import peek_checkpoint
    from ..commands.common import recorded_path_gone
    from .config import DataConfig

    recorded = peek_checkpoint(checkpoint).get("config")
    data = recorded.get("data") if isinstance(recorded, dict) else None
    if not isinstance(data, dict) or "root" not in data:
        return None
    root = data["root"]
    if root is None:  # trained on the built-in digits
        return DataConfig().folder()
    if not isinstance(root, str):
        return None
    if not Path(root).is_dir():
        raise recorded_path_gone("data.root", root, checkpoint, "--data")
    return Path(root)


def _evaluate(args: argparse.Namespace, config: ClassificationConfig, given: dict[str, Any]) -> int:
    from ..errors import UserInputError
    from .evaluate import evaluate

    if config.data.root is not None or "data.root" in given:
        folder = config.data.folder()  # (--config digits sets root null: the built-in digits)
    else:  # the data the checkpoint was trained on (ours record it, absolute)
        folder = _recorded_data_root(args.checkpoint)
    if folder is None:
        raise UserInputError("no data given: pass --data PATH (a folder with val/<class>/*), "
                             "or --config digits for the built-in digits set")
    metrics = evaluate(
        args.checkpoint, folder, model=given.get("model.name"), split=args.split,
        img_size=given.get("data.img_size"), crop_pct=given.get("test.crop_pct"),
        interpolation=given.get("data.interpolation"), batch_size=given.get("run.batch_size", 64),
        num_workers=given.get("run.num_workers"), use_ema=args.ema,
        amp=config.run.amp, device=config.run.device, skip_corrupt=config.data.skip_corrupt,
        model_kwargs=_kwargs(args, config),
    )
    if launched_rank() != 0:  # under torchrun, rank 0 reports the reduced metrics
        return 0
    if args.json:
        print(json.dumps(metrics))
    else:
        skipped = f", {metrics['skipped']} unreadable skipped" if metrics["skipped"] else ""
        size = metrics["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
        print(f"{metrics['model']} at {height}x{width}: top-1 {metrics['acc1']:.2f}%  top-5 {metrics['acc5']:.2f}%  "
              f"loss {metrics['loss']:.4f}  ({metrics['images']} images{skipped})")
    return 0


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="ours (.pth/.safetensors: model, size and class names come with it) or the authors' "
                             "release (its variant is recognised by its weights)")
    add_model_arg_argument(parser)
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="labels shown per image, best first (default 5)")
    parser.add_argument("--class-names", metavar="FILE",
                        help="one label per line, in class order (replaces the names the checkpoint records)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")


def _predict(args: argparse.Namespace, config: ClassificationConfig, given: dict[str, Any]) -> int:
    from .predict import Prediction, predict

    def line(result: Prediction) -> str:
        shown = ", ".join(f"{label} {score:.3f}" for label, score in zip(result.labels, result.scores))
        return f"{shown_path(result.path)}: {shown}"

    say = result_printer(args.json, lambda r: {"path": r.path, "labels": r.labels, "scores": r.scores}, line)

    predict(args.images, args.checkpoint, model=given.get("model.name"), topk=args.topk,
            class_names=args.class_names, img_size=given.get("data.img_size"), crop_pct=given.get("test.crop_pct"),
            interpolation=given.get("data.interpolation"), batch_size=given.get("run.batch_size", 32), use_ema=args.ema, device=config.run.device,
            model_kwargs=_kwargs(args, config), skip_corrupt=config.data.skip_corrupt, on_note=note_on_stderr, on_result=say,
            amp=config.run.amp)
    return 0


_CHECKPOINTS = "the checkpoint's"  # our checkpoints record their size, crop and filter (else 224, 0.875, bicubic)
COMMANDS: dict[str, VerbHandler] = {
    "evaluate": VerbHandler(_evaluate_arguments, _evaluate, _INFERENCE_KEYS, {
        "run.batch_size": "64", "data.img_size": _CHECKPOINTS, "test.crop_pct": _CHECKPOINTS,
        "data.interpolation": _CHECKPOINTS}),
    "predict": VerbHandler(_predict_arguments, _predict,
                           ("model.name", "data.img_size", "data.interpolation", "data.skip_corrupt", "test.crop_pct",
                            "run.batch_size", "run.amp", "run.device"),
                           {"run.batch_size": "32", "data.img_size": _CHECKPOINTS, "test.crop_pct": _CHECKPOINTS,
                            "data.interpolation": _CHECKPOINTS}),
}


def _data_classes(verb: str, config: ClassificationConfig, given: dict[str, Any]) -> int | None:
    """The classifier size training would build for the config: its data's class count
    (:meth:`DataConfig.known_classes`, no image read), where the config names data (the digits
    config names the built-in digits); None (ImageNet's 1000) where it names none, as the
    ImageNet recipes, or its folder is not on this machine (said on stderr)."""
    if "data.root" not in given:
        return None
    count = config.data.known_classes()
    if count is None:
        print(f"crossformer {verb}: no class folders in {config.data.root}/train here, so the classifier has 1000 "
              "classes; pass --num-classes N for another size", file=sys.stderr)
    return count


def _model_command(verb: str):
    """Run ``crossformer <verb>`` (benchmark, flops, export) on the config's model and input
    size (flags still win)."""

    def run(args: argparse.Namespace, config: ClassificationConfig, given: dict[str, Any]) -> int:
        import importlib

        from ..errors import UserInputError

        # the model train builds from the same flags: --model replaces the config's name, and its
        # model.kwargs stay (they were dropped: flops measured another model than train trained)
        args.model = args.model or config.model.name
        settings = dict(config.model.kwargs)
        if not args.model:
            raise UserInputError(f"{verb}: the config names no model; pass --model NAME")
        if not args.img_size_given and "data.img_size" in given:
            size = config.data.img_size
            args.img_size = [size] if isinstance(size, int) else list(size)
        if args.num_classes is None and not getattr(args, "checkpoint", None):  # a checkpoint's head is its own
            args.num_classes = _data_classes(verb, config, given)
        return importlib.import_module(f"crossformer.commands.{verb}").run(args, settings)

    return run


COMMANDS["benchmark"] = VerbHandler(no_arguments, _model_command("benchmark"), ())
COMMANDS["flops"] = VerbHandler(no_arguments, _model_command("flops"), ())
COMMANDS["export"] = VerbHandler(no_arguments, _model_command("export"), ())
