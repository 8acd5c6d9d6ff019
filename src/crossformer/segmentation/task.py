"""Semantic segmentation as an engine task: ADE20K (or image/label folders), the authors'
mmseg training pipeline, Semantic FPN / UPerNet, mIoU (registry entry ``segmentation``).

The run is iteration-based (the data loops over epochs as needed); the engine sums the
segmentor's losses (``loss_decode`` and, for UPerNet, the weighted ``loss_aux``), evaluates
single-scale mIoU on the validation split and keeps ``best.pth`` by it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data import DataError, ShardedSampler, build_loader, check_readable
from ..data.folder import left_out_notes
from ..engine import DistContext, Task, require_model_files, require_one_batch, resolve_precision, start_from
from ..engine import train as train_task
from ..errors import UserInputError
from .config import CONFIG, SegDataConfig, SegmentationConfig, SegModelConfig
from .data import (
    EvaluationStops, SegBatch, SegmentationDataset, absent_classes_note, ade20k_dataset, check_batch, collate_segmentation,
    skipped_file,
)
from ..models.weights import reordered_classes
from .checkpoint import CLASS_LAYERS, load_segmentor_state, read_segmentation_meta
from .colours import hex_colour
from .evaluate import SegMetrics, evaluate_segmentor
from .segmentor import Segmentor, build_segmentor
from .transforms import IGNORE_INDEX, SegTrainTransform

__all__ = [
    "SegmentationTask", "SEGMENTOR_KEYS", "build_datasets", "build_model", "segmentor_settings", "model_extras", "train",
    "min_train_batch",
    "CONFIG", "TASK",
]


def build_datasets(
    data: SegDataConfig, train_transform: Any = None, training: bool = True
) -> tuple[SegmentationDataset | None, SegmentationDataset]:
    """``(training set with train_transform, validation set untransformed)`` of ``data``;
    the training set is None unless ``training``. One-line errors for missing folders."""
    if not data.given:
        folders = (" (data.classes names the classes only: give data.val_images and data.val_labels, and for "
                   "training data.train_images and data.train_labels)") if data.classes is not None else ""
        raise UserInputError(f"no data given: pass --data ADE_ROOT (the ADEChallengeData2016 folder or its parent), or "
                             f"the folder layout{folders}")
    colours = dict(palette=data.palette, label_colours=data.label_colours, ignore_colours=data.ignore_colours)
    if data.root is not None:
        val = ade20k_dataset(data.root, "validation", **colours)
        return (ade20k_dataset(data.root, "training", train_transform, **colours) if training else None), val
    classes = data.classes
    if training:
        data.check_training_folders()
    val = SegmentationDataset(data.val_images, data.val_labels, classes, data.reduce_zero_label,
                              label_suffix=data.label_suffix, **colours)
    if not training:
        return None, val
    return SegmentationDataset(data.train_images, data.train_labels, classes, data.reduce_zero_label, train_transform,
                               label_suffix=data.label_suffix, **colours), val


def build_model(model: SegModelConfig, num_classes: int | None = None) -> Segmentor:
    """The segmentor ``model`` describes, for ``num_classes`` (or ``model.num_classes``);
    the backbone starts from ``model.pretrained`` when given."""
    classes = num_classes or model.num_classes
    if classes is None:
        raise UserInputError("model.num_classes is not set and no data set gives it: pass model.num_classes=N")
    return build_segmentor(
        model.kind, model.backbone, classes, model.backbone_settings(), model.pretrained, model.channels, model.aux_channels,
    )


def _fine_tune_load(segmentor: nn.Module, checkpoint: dict[str, Any], source: str, class_names: Sequence[str] = (),
                    note: Callable[[str], None] | None = None) -> list[str]:
    """``model.init_from``: a whole segmentor, classifiers of another class count left fresh;
    where the checkpoint names the data's ``class_names`` in another order, its classifier rows
    are put in the data's (a label map's value k is the data's class k)."""
    recorded = read_segmentation_meta(checkpoint)["classes"]
    rows = reordered_classes(recorded, class_names) if recorded else None
    entry = next((key for key in ("model", "state_dict") if isinstance(checkpoint.get(key), dict)), None)
    if entry and rows is not None:
        order = torch.tensor(rows)
        state = dict(checkpoint[entry])
        for key, value in state.items():
            if any(f"{layer}." in key for layer in CLASS_LAYERS) and value.shape[:1] == order.shape:
                state[key] = value[order]
        checkpoint = {**checkpoint, entry: state}
        if note is not None:
            note(f"{source} names the classes in another order: its classifier rows are put in the data's")
    return load_segmentor_state(segmentor, checkpoint, source, other_classes=True)


def min_train_batch(kind: str, crop_size: tuple[int, int]) -> int:
    """Images a training micro-batch needs on one process (plain BatchNorm): BatchNorm in
    training needs more than one value per channel, and UPerNet's pyramid pooling at scale 1
    (Semantic FPN's head too, on crops under 64 pixels a side: a 1x1 stride-32 map) holds
    one per image."""
    one_cell = kind == "upernet" or (crop_size[0] // 32) * (crop_size[1] // 32) <= 1
    return 2 if one_cell else 1


# the settings that decide a segmentor's weights (checked on resume and when loading ours)
SEGMENTOR_KEYS = ("kind", "backbone", "backbone_kwargs", "num_classes", "channels", "aux_channels")


def segmentor_settings(model: SegModelConfig, num_classes: int) -> dict[str, Any]:
    """The segmentor's settings as plain values (``SEGMENTOR_KEYS``)."""
    return {"kind": model.kind, "backbone": model.backbone, "backbone_kwargs": model.backbone_settings(),
            "num_classes": num_classes, "channels": model.channels, "aux_channels": model.aux_channels}


def model_extras(
    model: SegModelConfig, classes: list[str], palette: list[tuple[int, ...]], reduce_zero_label: bool,
    label_colours: list[tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """What our checkpoints carry to rebuild and label the segmentor (plain values): the model
    settings under ``segmentor`` and, as mmseg files do, ``meta`` with the classes and palette
    (and how label maps store classes: counted from 1, as ADE20K's; the colour of each where
    they are colour-coded, ``data.label_colours``, else None)."""
    meta = {"classes": list(classes), "palette": [list(c) for c in palette], "reduce_zero_label": reduce_zero_label,
            "label_colours": None if label_colours is None else [list(c) for c in label_colours]}
    return {"segmentor": segmentor_settings(model, len(classes)), "meta": meta}


def _label_colours_refusal(path: str, theirs: list | None, mine: list | None, classes: list[str]) -> str | None:
    """Why the checkpoint at ``path``, trained with ``data.label_colours`` ``theirs``, cannot
    resume a run with ``mine`` (either None: index label maps), in one line; None if alike."""
    if theirs == mine:
        return None
    if theirs is None:
        return f"{path} was trained on index label maps (no data.label_colours); resume without data.label_colours"
    if mine is None:
        return f"{path} was trained on colour-coded label maps (data.label_colours); resume with its data.label_colours"
    k = next((k for k, (a, b) in enumerate(zip(theirs, mine)) if list(a) != list(b)), 0)
    return (f"{path} was trained with class {k} ({classes[k]}) coloured {hex_colour(theirs[k])} in data.label_colours, "
            f"not {hex_colour(mine[k])}; resume with the same colours")


class SegmentationTask(Task):
    """A segmentor trained on ``data`` with the authors' pipeline; best checkpoint by mIoU."""

    primary_metric = "mIoU"

    def __init__(self, config: SegmentationConfig, ctx: DistContext) -> None:
        super().__init__(config, ctx)
        c = config
        require_model_files(c.task, pretrained=c.model.pretrained, init_from=c.model.init_from)
        self.train_set, self.val_set = build_datasets(c.data, SegTrainTransform(c.pipeline))
        self.notes.extend(left_out_notes(self.train_set, self.val_set))
        if c.model.num_classes is not None and c.model.num_classes != self.train_set.num_classes:
            raise UserInputError(
                f"model.num_classes is {c.model.num_classes} but {self.train_set.image_dir} has "
                f"{self.train_set.num_classes} classes; set model.num_classes={self.train_set.num_classes} (or null)"
            )
        if self.val_set.classes != self.train_set.classes:
            raise DataError(f"{self.val_set.image_dir} lists other classes than {self.train_set.image_dir}")
        batch = c.run.batch_size
        # SyncBN (several GPUs) normalises over every process's images; plain BatchNorm over this one's
        self.min_batch = 1 if ctx.distributed and ctx.device.type == "cuda" else min_train_batch(c.model.kind, c.pipeline.crop_size)
        if batch < self.min_batch:
            raise UserInputError(
                f"--batch-size {batch}: {c.model.kind} trains BatchNorm on a 1x1 map (pyramid pooling or a small crop's "
                f"stride-32 map), which needs at least {self.min_batch} images per process; use --batch-size {self.min_batch} "
                "or more (or run.accum_steps for a larger batch)"
            )
        require_one_batch(len(self.train_set), batch, ctx.world_size,
                          f"{self.train_set.image_dir} has {len(self.train_set)} images")
        self.train_sampler = ShardedSampler(len(self.train_set), ctx.rank, ctx.world_size, shuffle=True, seed=c.run.seed)
        self.train_loader = build_loader(
            self.train_set, batch, self.train_sampler, c.run.num_workers, c.run.seed, drop_last=True,
            pin_memory=ctx.device.type == "cuda", collate_fn=collate_segmentation, seed_each_sample=True,
        )
        model = build_model(c.model, self.train_set.num_classes)
        load = functools.partial(_fine_tune_load, class_names=self.train_set.classes, note=self.notes.append)
        self.started_from = c.model.init_from and start_from(model, c.model.init_from, load)
        self.model = ctx.sync_batchnorm(model).to(ctx.device)
        self.precision = resolve_precision(c.run.amp, ctx.device)  # evaluation's autocast
        self.inference = c.test.inference()

    # the Task interface ---------------------------------------------------------------

    def check_data(self) -> None:
        """The validation images' and label maps' headers (with ``skip_corrupt`` the unreadable
        ones are named), then each sample as evaluation reads it (:class:`.data.EvaluationStops`),
        so that bad data stops the run now rather than at the first evaluation. The second
        reading costs 1-2 % of an ADE20K epoch's data loading: its 2000 validation pairs at 7-15 ms
        against 20210 training samples at about 100 ms (one loader worker, the authors' pipeline)."""
        c, ctx = self.config, self.ctx
        paths = [path for pair in self.val_set.samples for path in pair]
        for failure in check_readable(paths, ctx, c.run.num_workers, c.data.skip_corrupt,
                                      self.log, what="validation file"):
            self.skip_validation_file(f"file {failure}")
        mine = ShardedSampler(len(self.val_set), ctx.rank, ctx.world_size, shuffle=False, pad=False)
        loader = build_loader(EvaluationStops(self.val_set, c.data.skip_corrupt), 16, mine, c.run.num_workers,
                              c.run.seed, drop_last=False, collate_fn=list)
        stop, counts = None, np.zeros(IGNORE_INDEX + 1, np.int64)
        for samples in loader:
            stop = next((line for line, _ in samples if line is not None), None)
            if stop is not None:
                break
            counts += sum(values for _, values in samples)
        ctx.raise_together(DataError(stop) if stop is not None else None)  # before the reduction every rank joins
        note = absent_classes_note(ctx.all_reduce_sum(counts.tolist()), self.val_set)
        if note is not None:  # a class that no validation label holds is a warning: a small set may lack one
            self.log.info(f"warning: {note}")

    def batch_counts(self, batch: SegBatch) -> dict[str, float]:
        unreadable = check_batch(batch, self.config.data.skip_corrupt)
        samples = len(batch.images)
        if samples < self.min_batch:  # skipping left too few images for BatchNorm: the batch is passed over
            samples = 0
        return {"samples": float(samples), "unreadable_images": float(unreadable)}

    def unreadable(self, batch: SegBatch) -> list[str]:
        return [skipped_file(failure).removeprefix("cannot read ") for failure in batch.unreadable]  # image / label map PATH: reason

    def to_device(self, batch: SegBatch) -> SegBatch:
        device = self.ctx.device
        return batch._replace(images=batch.images.to(device, non_blocking=True), labels=batch.labels.to(device, non_blocking=True))

    def losses(self, model: nn.Module, batch: SegBatch) -> dict[str, torch.Tensor]:
        return model(batch.images, batch.labels)  # {"loss_decode", "loss_aux" (UPerNet, weighted)}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        metrics = self.evaluate_metrics(model)
        return {"mIoU": metrics.miou, "mAcc": metrics.macc, "aAcc": metrics.aacc}

    def evaluate_metrics(self, model: nn.Module) -> SegMetrics:
        """The full metrics (per class too) of ``model`` on the validation split, over all ranks
        (the trainer gives every rank rank 0's buffers first: ``DistContext.share_buffers``)."""
        return evaluate_segmentor(
            model, self.val_set, self.inference, self.ctx, self.precision.autocast, self.config.data.skip_corrupt,
            on_skip=self.skip_validation_file,
        )

    def checkpoint_extras(self) -> dict[str, Any]:
        t = self.train_set
        colours = None if t.label_colours is None else t.label_colours.colours
        return model_extras(self.config.model, t.classes, t.palette, t.reduce_zero_label, colours)

    def check_resume(self, state: dict[str, Any], path: str) -> None:
        mine = self.checkpoint_extras()
        theirs = state.get("segmentor", {})
        for key in SEGMENTOR_KEYS:
            if theirs.get(key) == mine["segmentor"][key]:
                continue
            if key == "num_classes":  # the data's count (__init__ checked the config's against it)
                raise UserInputError(f"{path} was trained on {theirs.get(key)} classes but the class list of "
                                     f"{self.train_set.image_dir} has {mine['segmentor'][key]}; resume with the same data")
            raise UserInputError(f"{path} was trained with model {key} {theirs.get(key)!r}, not "
                                 f"{mine['segmentor'][key]!r}; resume with the same config")
        if list(state.get("meta", {}).get("classes", [])) != mine["meta"]["classes"]:
            raise UserInputError(f"{path} was trained on other classes than {self.train_set.image_dir}; use the same data")
        # the same classes in other colours: pixels of one colour would train another class. Not
        # data.ignore_colours: a pixel of a colour dropped from them stops the run (or its file is
        # skipped), one added was in no pixel trained on so far, one moved to a class changes
        # data.label_colours. A checkpoint written before the colours were recorded is not checked.
        # Checked before reduce_zero_label: between colour-coded and index maps, that is the change.
        theirs = state.get("meta", {}).get("label_colours", mine["meta"]["label_colours"])
        refusal = _label_colours_refusal(path, theirs, mine["meta"]["label_colours"], mine["meta"]["classes"])
        if refusal is not None:
            raise UserInputError(refusal)
        # the same classes counted from another value: every label would mean its neighbour's class
        reduced = state.get("meta", {}).get("reduce_zero_label")
        if reduced is not None and reduced != mine["meta"]["reduce_zero_label"]:
            raise UserInputError(f"{path} was trained with data.reduce_zero_label={str(reduced).lower()} (label maps count "
                                 f"classes from {1 if reduced else 0}); resume with the same setting")

    def describe(self) -> str:
        m = self.config.model
        return self.describe_images(f"{m.kind} {m.backbone}", self.train_set.num_classes, len(self.train_set),
                                    len(self.val_set), self.started_from)


def train(config: SegmentationConfig, on_step_end: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train ``config`` and return the last report's metrics (``val/mIoU`` ...), ``best_mIoU``,
    ``epoch`` and ``global_step``. See :func:`crossformer.engine.train` (torchrun, checkpoints)."""
    return train_task(SegmentationTask, config, on_step_end)


TASK = SegmentationTask
