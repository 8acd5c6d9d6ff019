"""Image folders, their errors, the sharded sampler, transforms and the built-in digits."""

from __future__ import annotations

import errno
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from classification_fixtures import make_image_folder
from crossformer.atomic import OutputError
from crossformer.data import (
    DataError,
    ImageFolderDataset,
    ShardedSampler,
    build_eval_transform,
    build_loader,
    build_train_transform,
    check_readable,
    prepare_digits,
)
from crossformer.engine import DistContext
from crossformer.errors import UserInputError


def test_classes_come_from_train_and_validation_is_an_alias(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 2, "validation": 1})
    hidden = tmp_path / "train" / "cat" / ".ipynb_checkpoints"  # hidden folders and files are no images of the class
    hidden.mkdir()
    (hidden / "0.png").write_bytes((tmp_path / "train" / "cat" / "0.png").read_bytes())
    (tmp_path / "train" / "cat" / ".1.png").write_bytes(b"")
    train = ImageFolderDataset(tmp_path, "train")
    val = ImageFolderDataset(tmp_path, "val", classes=train.classes)
    assert train.classes == ["cat", "dog", "eel"]
    assert len(train) == 6 and len(val) == 3
    assert val.split_dir.name == "validation"
    # every label is the index of the folder the file sits in
    for path, target in val.samples:
        assert Path(path).parent.name == train.classes[target]


def test_any_common_format_and_grayscale_become_rgb(tmp_path: Path) -> None:
    from PIL import Image

    make_image_folder(tmp_path, {"train": 1})
    Image.new("L", (40, 40), 7).save(tmp_path / "train" / "cat" / "gray.jpg")
    Image.new("RGBA", (40, 40)).save(tmp_path / "train" / "dog" / "alpha.webp")
    # JPEGs as browsers save them on Windows: they were left out without a word
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "eel" / "web.jfif", "JPEG")
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "eel" / "old.JPE", "JPEG")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, "train", transform=build_eval_transform(32))
    assert len(dataset) == 7
    shapes = {tuple(dataset[i][0].shape) for i in range(len(dataset))}
    assert shapes == {(3, 32, 32)}


def test_16_bit_and_exif_rotated_images_are_read_as_they_look(tmp_path: Path) -> None:
    from PIL import Image

    from crossformer.data import read_rgb

    make_image_folder(tmp_path, {"train": 1})
    # mid-grey in 16 bits: Pillow's own RGB conversion clipped it to white
    deep = tmp_path / "train" / "cat" / "deep.png"
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    # a 40x20 photo whose EXIF says "rotate 90 degrees": seen 20 wide, 40 high
    turned = tmp_path / "train" / "dog" / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (200, 10, 10)).save(turned, exif=exif)
    dataset = ImageFolderDataset(tmp_path, "train")
    images = {Path(path).name: dataset[i][0] for i, (path, _) in enumerate(dataset.samples)}
    assert np.abs(np.asarray(images["deep.png"]).astype(int) - 128).max() <= 1
    assert np.asarray(read_rgb(deep)).tolist() == np.asarray(images["deep.png"]).tolist()
    # training and evaluation see what predict sees (read_rgb), not the unrotated pixels
    assert images["turned.jpg"].size == read_rgb(turned).size == (20, 40)
    ramp = tmp_path / "ramp.png"  # 0..65535 onto 0..255: 257 x k is k exactly
    Image.fromarray((np.arange(256) * 257).astype(np.uint16).reshape(16, 16)).save(ramp)
    assert np.asarray(read_rgb(ramp))[..., 0].flatten().tolist() == list(range(256))


def test_the_header_size_turns_with_each_exif_orientation_that_turns_the_image(tmp_path: Path) -> None:
    from PIL import Image

    from crossformer.data import read_rgb
    from crossformer.data.folder import oriented_size

    for orientation in range(1, 9):  # 5-8 transpose, turn or transverse it
        path = tmp_path / f"{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (40, 20)).save(path, exif=exif)
        with Image.open(path) as img:
            assert oriented_size(img) == read_rgb(path).size[::-1], orientation  # (height, width) as it is read


def test_linked_folders_are_followed_but_a_link_back_up_is_refused(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1})
    extra = make_image_folder(tmp_path / "elsewhere", {"more": 2}, classes=("cat",)) / "more" / "cat"
    (tmp_path / "train" / "cat" / "more").symlink_to(extra, target_is_directory=True)
    assert len(ImageFolderDataset(tmp_path, "train")) == 5  # 3 classes x 1, and the linked folder's 2
    # a link to a folder above it would list every image again and again, other classes' under this one
    (tmp_path / "train" / "cat" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(DataError, match=r"cat/loop links to .*train, a folder that holds it") as err:
        ImageFolderDataset(tmp_path, "train")
    assert "\n" not in str(err.value)


def test_a_class_folder_linked_to_a_missing_place_is_named(tmp_path: Path) -> None:
    # a class kept on an unmounted drive left the labels without a word (3 classes, not 4)
    make_image_folder(tmp_path, {"train": 1})
    (tmp_path / "train" / "zebra").symlink_to(tmp_path / "unmounted" / "zebra", target_is_directory=True)
    line = f"{tmp_path / 'train' / 'zebra'} links to {tmp_path / 'unmounted' / 'zebra'}, which does not exist: "
    with pytest.raises(DataError, match=f"^{re.escape(line)}mount or restore it, or delete the link$"):
        ImageFolderDataset(tmp_path, "train")
    # a link named as a file is a stray file, passed over as one
    (tmp_path / "train" / "zebra").unlink()
    (tmp_path / "train" / "notes.txt").symlink_to(tmp_path / "unmounted" / "notes.txt")
    assert ImageFolderDataset(tmp_path, "train").classes == ["cat", "dog", "eel"]


def test_a_class_folder_spelt_in_other_unicode_characters_is_named_as_such(tmp_path: Path) -> None:
    # "val lacks class folder 'ému'" while a folder looking the same was there (macOS writes NFD)
    import unicodedata

    nfc = unicodedata.normalize("NFC", "ému")
    make_image_folder(tmp_path, {"train": 1}, classes=("cat", nfc))
    make_image_folder(tmp_path, {"val": 1}, classes=("cat", unicodedata.normalize("NFD", nfc)))
    nfd = unicodedata.normalize("NFD", nfc)
    line = (f"lacks class folder {nfc!r} (1 of 2 classes missing) ({nfd!r} has it in other Unicode characters: rename "
            f"it as the training folder spells it)")
    with pytest.raises(DataError, match=re.escape(line)):
        ImageFolderDataset(tmp_path, "val", classes=["cat", nfc])


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"val": 1}, "has no train/ folder"),
        ({"train": 0, "val": 1}, "holds no images"),
    ],
)
def test_missing_or_empty_split_names_the_folder(tmp_path: Path, layout: dict, message: str) -> None:
    make_image_folder(tmp_path, layout)
    with pytest.raises(DataError, match=message) as err:
        ImageFolderDataset(tmp_path, "train")
    assert "\n" not in str(err.value) and isinstance(err.value, UserInputError)


def test_a_data_folder_that_is_not_there_is_named_with_the_layout_it_needs(tmp_path: Path) -> None:
    """Each task's data root: a path that is not there (a typo, or the docs' /path/imagenet as
    written) is named with the layout its folder must have, as a folder of the wrong layout is."""
    from crossformer.data.folder import find_split
    from crossformer.detection.data import coco_paths
    from crossformer.segmentation.data import find_ade_root

    missing = tmp_path / "nowhere"
    for find, layout in ((lambda: find_split(missing, "train"), "train/<class>/"),
                         (lambda: coco_paths(missing, "train"), "annotations/instances_{train,val}2017.json"),
                         (lambda: find_ade_root(missing), "images/<split>/")):
        with pytest.raises(DataError) as err:
            find()
        message = str(err.value)
        assert message.startswith(f"data folder not found: {missing}") and layout in message and "\n" not in message


def test_a_split_given_as_the_data_folder_points_to_its_parent(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1, "val": 1})
    for split in ("train", "val"):
        with pytest.raises(DataError, match=rf"{split} is itself a split folder, not the data folder that holds {split}/: pass its parent, {tmp_path}$"):
            ImageFolderDataset(tmp_path / split, split)


def test_split_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path, "train")


def test_images_beside_the_class_folders_are_refused_not_dropped(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1})
    (tmp_path / "train" / "notes.txt").write_text("not an image: ignored")
    assert len(ImageFolderDataset(tmp_path, "train")) == 3
    (tmp_path / "train" / "cat" / "0.png").rename(tmp_path / "train" / "stray.png")
    (tmp_path / "train" / "cat" / "1.png").write_bytes((tmp_path / "train" / "dog" / "0.png").read_bytes())
    with pytest.raises(DataError, match=r"train/stray.png lies outside the class folders \(1 image\(s\) there\)"):
        ImageFolderDataset(tmp_path, "train")


def test_val_must_hold_exactly_the_training_classes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1})
    make_image_folder(tmp_path, {"val": 1}, classes=("cat", "dog"))
    with pytest.raises(DataError, match="lacks class folder 'eel'"):
        ImageFolderDataset(tmp_path, "val", classes=["cat", "dog", "eel"])
    make_image_folder(tmp_path, {"val": 1}, classes=("eel", "fox"))
    with pytest.raises(DataError, match="fox is not a training class"):
        ImageFolderDataset(tmp_path, "val", classes=["cat", "dog", "eel"])


def test_unreadable_image_is_reported_not_raised_in_workers(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 2})
    broken = tmp_path / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    dataset = ImageFolderDataset(tmp_path, "train", transform=build_eval_transform(32))
    loader = build_loader(dataset, 7, ShardedSampler(len(dataset), shuffle=False, pad=False), 1, seed=0, drop_last=False)
    images, targets, failures = next(iter(loader))
    assert images.shape == (6, 3, 32, 32) and len(targets) == 6
    assert len(failures) == 1 and str(broken) in failures[0]
    # one deleted since the folder was listed: the same kind of failure, in as few words
    gone = tmp_path / "train" / "cat" / "0.png"
    gone.unlink()
    assert dataset[dataset.samples.index((str(gone), 0))][2] == f"{gone}: file not found"


def test_the_data_check_names_the_first_unreadable_image_and_counts_the_rest(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"val": 1})
    bad = [tmp_path / "val" / "cat" / "a.png", tmp_path / "val" / "dog" / "b.png"]
    for path in bad:
        path.write_bytes(b"not a png")
    paths = [str(p) for p in sorted((tmp_path / "val").rglob("*.png"))]
    first = re.escape(str(bad[0]))
    with pytest.raises(DataError, match=rf"^cannot read validation image {first}: .* \(and 1 more\); fix or delete it"):
        check_readable(paths, DistContext(), num_workers=0, skip_corrupt=False)
    found = check_readable(paths, DistContext(), num_workers=0, skip_corrupt=True)
    assert [line.split(": ")[0] for line in found] == [str(p) for p in bad]


def test_sampler_shards_are_disjoint_and_cover_the_epoch() -> None:
    shards = [ShardedSampler(10, rank, 3, shuffle=True, seed=1) for rank in range(3)]
    for s in shards:
        s.set_epoch(4)
    seen = [list(s) for s in shards]
    assert all(len(x) == 4 == len(s) for x, s in zip(seen, shards))  # padded to 12
    assert set(sum(seen, [])) == set(range(10))
    # unpadded (evaluation): every index exactly once
    unpadded = [ShardedSampler(10, r, 3, shuffle=False, pad=False) for r in range(3)]
    assert sorted(sum((list(s) for s in unpadded), [])) == list(range(10))
    assert [len(s) for s in unpadded] == [len(list(s)) for s in unpadded] == [4, 3, 3]
    # a new epoch is a new order, the same epoch is the same order
    again = ShardedSampler(10, 0, 3, shuffle=True, seed=1)
    again.set_epoch(4)
    assert list(again) == seen[0]
    again.set_epoch(5)
    assert list(again) != seen[0]


def test_sampler_resumes_mid_epoch() -> None:
    sampler = ShardedSampler(20, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=8)
    assert list(sampler) == full[8:] and len(sampler) == 12


def test_grouped_sampler_fills_each_batch_from_one_group_and_covers_every_sample() -> None:
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]  # 5 and 6: each padded to whole batches of 2 on 2 ranks
    shards = [ShardedSampler(len(groups), rank, 2, seed=7, groups=groups, batch_size=2) for rank in range(2)]
    for s in shards:
        s.set_epoch(3)
    seen = [list(s) for s in shards]
    assert [len(x) for x in seen] == [len(s) for s in shards] == [8, 8]
    for order in seen:
        assert all(groups[a] == groups[b] for a, b in zip(order[::2], order[1::2]))
    assert set(sum(seen, [])) == set(range(len(groups)))
    assert sorted(groups[i] for i in sum(seen, [])) == [0] * 8 + [1] * 8  # padded within its group
    shards[0].set_epoch(3, start=4)  # resuming mid-epoch
    assert list(shards[0]) == seen[0][4:] and len(shards[0]) == 4
    shards[0].set_epoch(4)
    assert list(shards[0]) != seen[0]


def test_train_transform_is_random_and_eval_is_not(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(torch.randint(0, 255, (48, 64, 3), dtype=torch.uint8).numpy())
    train_tf, eval_tf = build_train_transform(32), build_eval_transform(32)
    assert train_tf(image).shape == eval_tf(image).shape == (3, 32, 32)
    assert not torch.equal(train_tf(image), train_tf(image))
    assert torch.equal(eval_tf(image), eval_tf(image))
    # crop_pct 1: a square image of the size is only normalised (0.875 would cut its margin off)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    square = image.crop((8, 0, 56, 48)).resize((32, 32))
    pixels = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    torch.testing.assert_close(build_eval_transform(32, crop_pct=1.0)(square), (pixels - mean) / std)


def test_train_transform_takes_its_flip_crop_and_erasing_settings() -> None:
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))

    def draw(seed: int, **settings) -> torch.Tensor:
        """The 32x32 training input of ``image``, its random crop over the whole square unless ``scale``."""
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        values = {"auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0, "hflip": 0.0, "scale": (1.0, 1.0),
                  **settings}
        return build_train_transform(32, **values)(image)

    whole = draw(0)
    assert all(torch.equal(draw(seed), whole) for seed in range(1, 8))  # scale (1, 1): the whole square
    assert not all(torch.equal(draw(seed, scale=(0.1, 0.5)), whole) for seed in range(8))
    assert torch.equal(draw(0, hflip=1.0), whole.flip(-1))
    assert all(not torch.equal(draw(seed, re_prob=1.0), whole) for seed in range(8))  # erased every time


@pytest.mark.slow
def test_digits_are_written_once_as_an_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.setenv("CROSSFORMER_CACHE", str(tmp_path))
    root = prepare_digits()
    assert root == tmp_path / "digits"
    train, val = ImageFolderDataset(root, "train"), ImageFolderDataset(root, "val", classes=[str(i) for i in range(10)])
    assert train.classes == [str(i) for i in range(10)]
    assert len(train) + len(val) == 1797 and 340 < len(val) < 370
    assert not {Path(p).name for p, _ in train.samples} & {Path(p).name for p, _ in val.samples}
    stamp = (root / train.samples[0][0]).stat().st_mtime_ns
    assert prepare_digits() == root
    assert (root / train.samples[0][0]).stat().st_mtime_ns == stamp  # not rewritten


def test_digits_on_a_full_disk_are_one_line_and_leave_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an OSError traceback from Pillow's save, and the half-written hidden folder left behind
    from PIL import Image

    pytest.importorskip("sklearn")
    monkeypatch.setenv("CROSSFORMER_CACHE", str(tmp_path))

    def disk_full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    line = f"cannot write {tmp_path / 'digits'}: no space left on the device"
    with pytest.raises(OutputError, match=f"^{re.escape(line)}$"):
        prepare_digits()
    assert list(tmp_path.iterdir()) == []


def test_digits_interrupted_leave_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while the images were written left the hidden .digits-* folder behind
    from PIL import Image

    pytest.importorskip("sklearn")
    monkeypatch.setenv("CROSSFORMER_CACHE", str(tmp_path))
    saved = []

    def interrupted(image, path, *args, **kwargs) -> None:
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(path)
        Path(path).write_bytes(b"")

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_digits()
    assert len(saved) == 3 and list(tmp_path.iterdir()) == []


def test_randaugment_posterize_at_zero_bits_gives_black_not_an_error() -> None:
    from PIL import Image
    from timm.data import auto_augment

    from crossformer.data import build_train_transform

    image = Image.new("RGB", (40, 40), (200, 120, 40))
    black = auto_augment.NAME_TO_OP["PosterizeIncreasing"](image, 0)
    assert black.size == image.size and black.getextrema() == ((0, 0), (0, 0), (0, 0))
    # the authors' recipe end to end: strong magnitudes do reach 0 bits
    transform = build_train_transform(32)
    torch.manual_seed(0)
    random.seed(0)
    for _ in range(300):
        assert transform(image).shape == (3, 32, 32)


def test_names_beyond_ascii_are_drawn_with_a_font_that_has_their_letters() -> None:
    # Pillow's default font drew "grün" as "gr□n" in predict's captions and legends
    from PIL import Image, ImageFont

    from crossformer.data.draw import _unicode_font, draw_boxes, draw_legend, label_font

    font = _unicode_font(11)
    if font is None:
        pytest.skip("no TrueType font with glyphs beyond ASCII on this system")
    assert label_font(["grün box 0.93", "road"]) is font
    assert label_font(["road way"]).getname() == ImageFont.load_default().getname()  # ASCII: as before
    missing = np.asarray(font.getmask("\U0010fffd"))  # a code point no font draws: its empty box
    assert not np.array_equal(np.asarray(font.getmask("ü")), missing)
    image = Image.new("RGB", (120, 80))
    drawn = {text: np.asarray(draw_boxes(image, np.array([[10.0, 30.0, 90.0, 70.0]]), [text], [(255, 0, 0)]))
             for text in ("gr\u00fcn", "gr\U0010fffdn")}
    assert not np.array_equal(*drawn.values())
    assert draw_legend(image, [("grün", (255, 0, 0))]).size[0] >= image.size[0]
