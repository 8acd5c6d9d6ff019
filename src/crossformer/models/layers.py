"""Linear layers with a faster CPU inference path.

On CPU, when no gradient is needed, oneDNN's linear with a fused epilogue
(``torch.ops.mkldnn._linear_pointwise``) computes ``x @ W.T + b`` (and the exact GELU after
it) in one call. Measured on a 2-core Xeon at the model's shapes it is 10-40% faster
than ``F.linear`` (MKL ``addmm``, which first copies the bias into the output) and saves
the separate GELU pass; results agree to float rounding (see benchmarks/RESULTS.md).
Everywhere else (autograd, autocast, CUDA, tracing, compiling, exporting) the plain
PyTorch ops run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

__all__ = ["GeluMlp", "linear", "onednn_inference"]

_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` may take the fused oneDNN kernel for this input."""
    return (
        _LINEAR_POINTWISE is not None
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        # float32 only: measured there, and oneDNN's bf16 kernels need CPU support
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, followed by the exact GELU when ``gelu``; ``(..., in) -> (..., out)``."""
    if onednn_inference(x, layer.weight):
        return _LINEAR_POINTWISE(x, layer.weight, layer.bias, "gelu" if gelu else "none", [], "none")
    x = layer(x)
    return F.gelu(x) if gelu else x


class GeluMlp(Mlp):
    """timm's ``Mlp`` with exact GELU (keys ``fc1``, ``fc2``); CPU inference fuses bias + GELU."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__(in_features, hidden_features, act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not onednn_inference(x, self.fc1.weight):
            return super().forward(x)
        return linear(linear(x, self.fc1, gelu=True), self.fc2)
