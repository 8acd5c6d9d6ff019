"""Image-folder data sets, transforms, samplers and loaders, and the built-in digits set."""

from ..errors import DataError
from ..lazy import export_lazily

# Imported on first use: the loaders need torch, and a config's checks (its class list, a
# segmentation config's label colours) read .class_list and .draw alone.
__all__ = ["DataError", *export_lazily(__name__, {
    ".digits": ("prepare_digits",),
    ".folder": ("IMG_EXTENSIONS", "ImageFolderDataset", "find_split", "list_images", "open_image", "read_rgb",
                "oriented_size", "size_difference", "expand_image_paths", "expand_image_inputs", "output_paths",
                "unique_stem", "leave_out_folder"),
    ".class_list": ("load_class_list",),
    ".loader": ("ImageBatch", "build_loader", "collate_images", "find_unreadable", "raise_or_count_unreadable",
                "gather_skipped", "check_readable"),
    ".sampler": ("ShardedSampler",),
    ".transforms": ("build_eval_transform", "build_train_transform"),
})]
