"""The banded resized cross-entropy (``segmentation/loss.py``) equals resize + ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossformer.segmentation import loss as seg_loss
from crossformer.segmentation.bands import bilinear_matrix
from crossformer.segmentation.loss import resized_cross_entropy
from crossformer.segmentation.segmentor import build_segmentor

IGNORE = 255


def _plain(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    resized = F.interpolate(logits, size=labels.shape[1:], mode="bilinear", align_corners=False)
    return F.cross_entropy(resized, labels, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("in_size, out_size", [(13, 50), (20, 7), (1, 5), (16, 64), (9, 9)])
def test_bilinear_matrix_is_interpolates_resize(in_size: int, out_size: int) -> None:
    eye = torch.eye(in_size)[None, None]  # (1, 1, in, in): resizing rows only
    expected = F.interpolate(eye, size=(out_size, in_size), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(bilinear_matrix(out_size, in_size), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("band_elements", [1 << 20, 500])  # one band; bands of a few rows
@pytest.mark.parametrize(
    "logits_shape, label_size",
    [((2, 5, 13, 17), (50, 67)), ((1, 3, 20, 20), (7, 9)), ((3, 4, 8, 8), (32, 32))],
)
def test_values_and_gradients_equal_the_plain_path(monkeypatch, band_elements, logits_shape, label_size) -> None:
    monkeypatch.setattr(seg_loss, "BAND_ELEMENTS", band_elements)
    torch.manual_seed(0)
    logits = torch.randn(logits_shape, requires_grad=True)
    labels = torch.randint(0, logits_shape[1], (logits_shape[0], *label_size))
    labels[:, :2] = IGNORE
    labels[0, -1, :3] = IGNORE
    expected = _plain(logits, labels)
    expected_grad, = torch.autograd.grad(expected * 0.5, logits)
    total = resized_cross_entropy(logits, labels, IGNORE)
    grad, = torch.autograd.grad(total * 0.5, logits)
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_all_ignored_is_zero_with_zero_gradient() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 16, 16), IGNORE)
    total = resized_cross_entropy(logits, labels, IGNORE)
    total.backward()
    assert total.item() == 0 and not logits.grad.any()


def test_float32_under_bf16_autocast() -> None:
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    labels = torch.randint(0, 4, (2, 24, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = resized_cross_entropy(logits, labels, IGNORE)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, _plain(logits, labels), rtol=1e-6, atol=1e-4)


def test_segmentor_losses_take_the_banded_path_on_the_cpu(monkeypatch) -> None:
    torch.manual_seed(0)
    segmentor = build_segmentor("upernet", "crossformer_small", num_classes=6, channels=16, aux_channels=8,
                                backbone_kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)))
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 6, (2, 64, 64))
    labels[:, :5] = IGNORE
    calls = []
    monkeypatch.setattr(seg_loss._ResizedCrossEntropy, "apply", lambda *a: calls.append(a) or _plain(a[0], a[1]))
    torch.manual_seed(1)  # the same dropout draws both times
    plain = segmentor.losses(images, labels)
    assert len(calls) == 2  # decode and auxiliary heads
    monkeypatch.undo()
    torch.manual_seed(1)
    banded = segmentor.losses(images, labels)
    for key in ("loss_decode", "loss_aux"):
        torch.testing.assert_close(banded[key], plain[key], rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad(sum(banded.values()), list(segmentor.parameters()))
    expected = torch.autograd.grad(sum(plain.values()), list(segmentor.parameters()))
    for grad, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
