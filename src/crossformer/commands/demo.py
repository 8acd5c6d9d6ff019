"""``crossformer demo``: train, evaluate and predict on built-in data in a few minutes on 2 CPU cores.

``--task`` picks the demo (classification: the digits; detection: synthetic shapes with
masks; segmentation: synthetic ADE20K-layout scenes); ``--task all`` runs each in turn and
prints one summary table. A task adds its demo
with one entry in :data:`DEMOS`: the module whose ``run_demo(output, overrides)`` returns
its figures (numbers by name, ``seconds``, optionally ``output``) and whose ``DEFAULT_OUTPUT`` names its folder.
"""

from __future__ import annotations

import argparse
import importlib

# task -> the module with run_demo and DEFAULT_OUTPUT
DEMOS: dict[str, str] = {
    "classification": "crossformer.classification.demo",
    "detection": "crossformer.detection.demo",
    "segmentation": "crossformer.segmentation.demo",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=(*DEMOS, "all"), default="classification",
                        help="which demo (default classification); all: every one in turn, then a summary")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="where the run goes (an earlier demo's output there is replaced; default output/demo, output/demo-<task>)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="change a setting of the demo's config, e.g. epochs=5")


def _summary(results: dict[str, dict]) -> str:
    lines = [f"{'demo':<16}{'result (held-out)':<44}{'time':>8}  output"]
    for task, result in results.items():
        figures = ", ".join(f"{k} {v:.3g}" for k, v in result.items()
                            if isinstance(v, float) and not k.endswith("seconds"))
        lines.append(f"{task:<16}{figures:<44}{result['seconds']:>7.0f}s  {result.get('output', '')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from crossformer.engine.config import parse_overrides
    from crossformer.errors import UserInputError

    tasks = list(DEMOS) if args.task == "all" else [args.task]
    if len(tasks) > 1 and (args.overrides or args.output):
        raise UserInputError("--task all runs every demo as it is: no --output or KEY=VALUE settings")
    results = {}
    for task in tasks:
        module = importlib.import_module(DEMOS[task])
        output = args.output or module.DEFAULT_OUTPUT
        result = module.run_demo(output, parse_overrides(args.overrides))
        results[task] = {**result, "output": result.get("output", output)}
    if len(tasks) > 1:
        print(_summary(results))
    return 0
