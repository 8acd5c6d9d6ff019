"""Image-folder data sets, transforms, samplers and loaders, and the built-in digits set."""

from .digits import prepare_digits
from .folder import (
    IMG_EXTENSIONS, DataError, ImageFolderDataset, expand_image_paths, find_split, list_images, open_image, read_rgb,
    leave_out_folder, load_class_list, oriented_size, size_difference, unique_stem, expand_image_inputs, output_paths,
)
from .loader import (
    ImageBatch, build_loader, check_readable, collate_images, find_unreadable, gather_skipped, raise_or_count_unreadable,
)
from .sampler import ShardedSampler
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "prepare_digits",
    "IMG_EXTENSIONS", "DataError", "ImageFolderDataset", "find_split", "list_images", "open_image", "read_rgb", "oriented_size",
    "size_difference", "expand_image_paths", "expand_image_inputs", "output_paths", "unique_stem", "leave_out_folder",
    "load_class_list",
    "ImageBatch", "build_loader", "collate_images", "find_unreadable", "raise_or_count_unreadable", "gather_skipped",
    "check_readable",
    "ShardedSampler",
    "build_eval_transform", "build_train_transform",
]
