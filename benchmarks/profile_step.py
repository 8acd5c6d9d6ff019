"""Where one inference batch or training step of a model spends its time, op by op.

    python benchmarks/profile_step.py --model crossformer_small --mode train --device cuda --amp bf16 --batch-size 128
    python benchmarks/profile_step.py --model crossformer_tiny --mode infer     # CPU, fp32, batch 32
    python benchmarks/profile_step.py --model crossformer_small --mode train --img-size 800 1216 \
        --batch-size 2 --steps 1 --detection-grouping           # the dense size (group 7, intervals 8, 4, 2, 1)

The step is the benchmark's own (``crossformer.benchmark.make_step``: random images, AdamW
for training), warmed up, then recorded by ``torch.profiler`` over ``--steps`` steps. Prints
the ``--top`` ops by self time on the device (CUDA kernels' time on a GPU, CPU time on the
CPU) with their share, and the step's wall time; ``--json`` writes the rows too.

``--callers copy_,sum`` also splits those ops' self time by the ops that called them (up to
three levels), e.g. which grouping or padding a copy belongs to. Input shapes would say more,
but recording them (``record_shapes``) made a CPU training step twice as slow here, its
elementwise ops most of all (benchmarks/RESULTS.md, row 54), so they are left out.

    python benchmarks/profile_step.py --model crossformer_pp_small --mode train --steps 2 --callers copy_
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import crossformer  # noqa: F401  (registers the variants)
from crossformer.benchmark import DEFAULT_BATCH, BenchConfig, build_model, make_step, timed_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="crossformer_tiny")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16",), default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--detection-grouping", action="store_true",
                        help="the authors' detection grouping: group size 7, intervals 8, 4, 2, 1")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--callers", metavar="OPS", default="",
                        help="comma-separated op names (e.g. copy_,sum): their time by calling ops")
    args = parser.parse_args()

    batch = args.batch_size or DEFAULT_BATCH[args.mode]
    config = BenchConfig(modes=(args.mode,), batch_size={args.mode: batch}, img_size=tuple(args.img_size),
                         device=args.device, amp=args.amp, memory=False,
                         model_kwargs={args.model: dict(group_size=7, interval=(8, 4, 2, 1))} if args.detection_grouping else {})
    torch.manual_seed(0)
    step = make_step(build_model(args.model, config), args.mode, config)
    for _ in range(3):
        step()
    wall = min(timed_steps(step, 1, args.device) for _ in range(3))

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        timed_steps(step, args.steps, args.device)
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = sorted(events, key=lambda e: -getattr(e, key))[: args.top]
    table = [dict(op=e.key, calls=e.count // args.steps, ms_per_step=getattr(e, key) / 1e3 / args.steps,
                  share=getattr(e, key) / total) for e in rows]
    where = "device" if cuda else "CPU"
    print(f"{args.model} {args.mode} batch {batch} {args.img_size[0]}x{args.img_size[1]} "
          f"{args.amp or 'fp32'} on {args.device}: {1e3 * wall:.1f} ms per step ({batch / wall:.1f} img/s); "
          f"profiled {where} time {total / 1e3 / args.steps:.1f} ms per step")
    print(f"{'self ' + where + ' ms/step':>18} {'share':>6} {'calls':>6}  op")
    for row in table:
        print(f"{row['ms_per_step']:18.2f} {100 * row['share']:5.1f}% {row['calls']:6d}  {row['op'][:100]}")
    if args.callers:
        print_callers(prof, set(args.callers.split(",")), args.steps, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, mode=args.mode, batch=batch, device=args.device, amp=args.amp,
                           step_ms=1e3 * wall, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), rows=table), f)


def print_callers(prof: profile, names: set[str], steps: int, top: int) -> None:
    """Self CPU time of the ops named (``copy_`` matches ``aten::copy_``) per step, split by
    their three nearest calling ops, largest first."""
    split: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.name.split("::")[-1] not in names:
            continue
        chain, parent = [], event.cpu_parent
        while parent is not None and len(chain) < 3:
            chain.append(parent.name)
            parent = parent.cpu_parent
        entry = split[(event.name, " < ".join(chain))]
        entry[0] += event.self_cpu_time_total / 1e3 / steps
        entry[1] += 1
    print(f"\n{'self CPU ms/step':>18} {'calls':>6}  op < callers")
    for (name, chain), (ms, calls) in sorted(split.items(), key=lambda item: -item[1][0])[:top]:
        print(f"{ms:18.2f} {calls // steps:6d}  {name} < {chain}")


if __name__ == "__main__":
    main()
