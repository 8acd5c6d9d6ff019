"""Pixel normalisation of the dense tasks (mmcv's ``img_norm_cfg``): ImageNet's channel mean and
standard deviation on 0-255 RGB values, as the authors' mmdetection and mmsegmentation configs
give them, and CrossFormer's smallest input side. A module of its own, importing nothing, so that
the task configs read it without torch."""

__all__ = ["IMAGENET_MEAN_255", "IMAGENET_STD_255", "MIN_INPUT_SIZE"]

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
# Smallest input side: the stage-3 map must keep at least one token.
MIN_INPUT_SIZE = 32
