"""Correctness of the model on an accelerator against the CPU, one JSON object to stdout.

    PYTHONPATH=src python3 benchmarks/gpu_correctness.py --device cuda

1. fp32 logits on the device vs the CPU (same weights; TF32 off), both LDA semantics,
   an exact and a padded input size, eval and training gradients;
2. one bf16-autocast AdamW training step of a tiny model (finite loss and gradients);
3. gradient checkpointing: same gradients, and the training peak memory of
   crossformer_base at batch 16 with and without it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import crossformer  # noqa: F401
from crossformer.benchmark import BenchConfig, build_model, make_step, peak_memory_mb
from crossformer.models import CrossFormer

TINY = {
    "v1": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), group_size=7, interval=(8, 4, 2, 1),
               use_acl=False, long_distance="fixed_interval"),
    "pp": dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 4, 8), group_size=(4, 4, 14, 7),
               interval=(4, 2, 1, 1), use_acl=True, long_distance="fixed_group"),
}


def tiny(tag: str) -> CrossFormer:
    torch.manual_seed(0)
    model = CrossFormer(**TINY[tag], num_classes=10, drop_path_rate=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def grads(model: CrossFormer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad.detach() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--base-batch", type=int, default=16)
    args = parser.parse_args()
    dev = args.device
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
                 "torch": torch.__version__}

    for tag in TINY:
        for size in [(224, 224), (70, 94)]:
            key = f"{tag}_{size[0]}x{size[1]}"
            cpu_model = tiny(tag)
            dev_model = tiny(tag).to(dev)
            x = torch.randn(2, 3, *size)
            y = torch.tensor([1, 7])
            with torch.no_grad():
                eval_diff = (cpu_model.eval()(x) - dev_model.eval()(x.to(dev)).cpu()).abs().max().item()
            cpu_logits, cpu_grads = grads(cpu_model.train(), x, y)
            dev_logits, dev_grads = grads(dev_model.train(), x.to(dev), y.to(dev))
            dev_model.set_grad_checkpointing(True)
            _, ckpt_grads = grads(dev_model, x.to(dev), y.to(dev))
            out[key] = {
                "eval_logits_max_diff": eval_diff,
                "train_logits_max_diff": (cpu_logits - dev_logits.cpu()).abs().max().item(),
                "train_grads_max_diff": max_diff(cpu_grads, dev_grads),
                "checkpointed_grads_max_diff": max_diff(dev_grads, ckpt_grads),
            }
            print(key, out[key], flush=True)

    # bf16 autocast: one AdamW step of a tiny model
    model = tiny("pp").to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 224, 224, device=dev), torch.randint(0, 10, (8,), device=dev)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    opt.step()
    out["bf16_train_step"] = {"loss": loss.item(), "loss_finite": bool(torch.isfinite(loss).item()),
                              "grads_finite": finite}
    print("bf16", out["bf16_train_step"], flush=True)

    # gradient checkpointing: training peak memory of crossformer_base
    for ckpt in (False, True):
        cfg = BenchConfig(modes=("train",), batch_size={"train": args.base_batch}, device=dev,
                          grad_checkpointing=ckpt)
        model = build_model("crossformer_base", cfg)
        step = make_step(model, "train", cfg)
        step()
        start = time.perf_counter()
        out[f"base_train_peak_mb_ckpt_{ckpt}"] = peak_memory_mb(step, dev)
        out[f"base_train_step_s_ckpt_{ckpt}"] = time.perf_counter() - start
        del model, step
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
