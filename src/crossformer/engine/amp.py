"""Mixed precision: autocast dtype per device, the fp16 grad scaler, and the optimizer step."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Iterable, get_args

import torch

from ..errors import PerformanceWarning, UserInputError
from .config import AmpMode

__all__ = ["Precision", "resolve_precision", "AmpMode", "AMP_CHOICES"]

AMP_CHOICES: tuple[str, ...] = get_args(AmpMode)

EMULATED_BF16 = ("this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 autocast runs emulated here, many "
                 "times slower than float32 (amp none, the default)")


@dataclass
class Precision:
    """How forward passes run and how the backward/step is scaled."""

    device_type: str
    dtype: torch.dtype | None  # None: full float32
    scaler: torch.amp.GradScaler | None  # fp16 only: keeps small gradients from flushing to zero

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter], clip_grad: float | None
    ) -> float:
        """Unscale, clip the global gradient norm to ``clip_grad`` (0/None: no clipping), step,
        update the scale, zero the grads. Returns the gradient norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        parameters = [p for p in parameters if p.grad is not None]
        if clip_grad:
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, clip_grad))
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in parameters])) if parameters else 0.0
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``auto``: bf16 on GPUs that support it, else fp16 on GPU; float32 on the CPU.

    ``bf16`` on a CPU without bf16 instructions warns (:class:`.PerformanceWarning`): it runs,
    emulated, many times slower than float32."""
    if amp not in AMP_CHOICES:
        raise UserInputError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            amp = "none"
        else:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type != "cuda":
        raise UserInputError("amp=fp16 needs a GPU; on the CPU use amp=bf16 or amp=none")
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if dtype is torch.bfloat16 and device.type == "cpu":
        from ..models.layers import cpu_has_bf16_kernels

        if not cpu_has_bf16_kernels():
            warnings.warn(EMULATED_BF16, PerformanceWarning, stacklevel=2)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    return Precision(device.type, dtype, scaler)
