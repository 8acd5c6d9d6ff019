"""``crossformer make-data KIND DIR``: write a synthetic data set in a standard layout.

Each kind is one entry of :data:`MAKERS`: ``coco`` (detection: COCO-format JSON and JPEG
images of shapes with exact masks), ``ade`` (segmentation: the ADE20K layout). A task adds its own kind with one entry: a one-line
description, a default image count, the share of images held out for validation and a function
``(dir, images, seed, held_out) -> summary line``.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Maker:
    help: str
    default_images: int
    held_out: float  # the share of the images written to the validation split
    write: Callable[[Path, int, int, float], str]  # (dir, images, seed, held_out) -> what was written, one line
    holds: tuple[str, ...]  # the entries of DIR the set is made of, which a rewrite replaces whole


def _coco(root: Path, images: int, seed: int, held_out: float) -> str:
    from crossformer.detection.synthetic import make_coco_dataset

    made = make_coco_dataset(root, images=images, seed=seed, val_fraction=held_out)
    return (f"wrote a COCO-format set to {root}: {made.train_images} train / {made.val_images} val images, "
            f"{made.objects} objects, {made.crowds} crowd regions, {made.empty_images} images without objects "
            f"(annotations/instances_{{train,val}}2017.json, train2017/, val2017/)")


def _ade(root: Path, images: int, seed: int, held_out: float) -> str:
    from crossformer.segmentation.demo import write_ade

    return write_ade(root, images, seed, held_out)


MAKERS: dict[str, Maker] = {
    "coco": Maker("detection: shapes on textured backgrounds with polygon / RLE masks, COCO layout", 200, 0.25, _coco,
                  ("annotations", "train2017", "val2017")),
    "ade": Maker("segmentation: textured scenes of 7 classes with unlabelled pixels, ADE20K layout", 200, 0.2, _ade,
                 ("ADEChallengeData2016",)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = "; ".join(f"{name}: {maker.help}" for name, maker in MAKERS.items())
    parser.add_argument("kind", choices=sorted(MAKERS), metavar="KIND", help=f"what to write ({kinds})")
    parser.add_argument("dir", metavar="DIR", help="the folder to write: new, empty, or holding a set make-data wrote, whose files are replaced")
    parser.add_argument("--images", type=int, default=None, metavar="N",
                        help="images in all (default: " + ", ".join(f"{n} {m.default_images}" for n, m in MAKERS.items())
                        + "), of which a share is held out for validation ("
                        + ", ".join(f"{n} {round(m.held_out * 100)}%%" for n, m in MAKERS.items()) + ")")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): the same seed writes the same set")


MARK = "crossformer-make-data.txt"  # names the kind of set make-data wrote in the folder, which a rerun replaces


def run(args: argparse.Namespace) -> int:
    from crossformer.atomic import make_folder, write_text_atomic
    from crossformer.engine.output import is_marked
    from crossformer.errors import UserInputError, listing

    maker = MAKERS[args.kind]
    images = maker.default_images if args.images is None else args.images
    if images < 2:
        raise UserInputError(f"--images must be at least 2 (one per split), got {images}")
    root = Path(args.dir)
    if root.exists() and not root.is_dir():
        raise UserInputError(f"{root} exists and is not a folder")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if entries and not is_marked(root / MARK, args.kind):  # a user's own set: its JSON and images were replaced
        raise UserInputError(f"{root} already holds {listing(entries)}, not what `make-data {args.kind}` wrote there: "
                             f"it replaces the files of its set, so pass a new or empty folder")
    make_folder(root)
    write_text_atomic(root / MARK, f"{args.kind}\n")  # first: a rewrite cut short may be run again
    for name in maker.holds:  # the earlier set whole: a smaller one left its other images in (ade: read as the set's)
        shutil.rmtree(root / name, ignore_errors=True)
    print(maker.write(root, images, args.seed, maker.held_out))
    return 0
