"""Training, exact resume after SIGKILL, the NaN guard, evaluation and prediction (tiny model, tiny data)."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from classification_fixtures import TINY_MODEL, make_image_folder, tiny_config
from crossformer.classification import evaluate, load_classifier, predict, train
from crossformer.classification import task as train_module
from crossformer.data import DataError
from crossformer.errors import UserInputError
from crossformer.classification.evaluate import evaluate_batches
from crossformer.engine import DistContext, NonFiniteLossError, load_training_state, resolve_precision
from processes import run_process

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny 2-epoch run with the full recipe and EMA; shared by the read-only tests below."""
    output = tmp_path_factory.mktemp("run")
    metrics = train(tiny_config(data, output, model_ema=True, model_ema_decay=0.5))
    return output, metrics


def test_training_writes_checkpoints_and_logs(trained: tuple[Path, dict]) -> None:
    output, metrics = trained
    assert metrics["epoch"] == 2 and metrics["global_step"] == 12  # 24 images / batch 4, 2 epochs
    assert {"val/acc1", "val/acc5", "val/loss", "train/loss", "val_ema/acc1"} <= set(metrics)
    state = load_training_state(output / "last.pth")  # loads with weights_only=True
    assert state["epoch"] == 2 and state["batches_done"] == 0 and state["class_names"] == ["cat", "dog", "eel"]
    assert state["model_name"] == "crossformer_tiny" and state["model_kwargs"] == TINY_MODEL
    assert {"model", "model_ema", "optimizer", "rank_state", "config"} <= set(state)
    assert (output / "best.pth").is_file()
    assert not [p for p in output.iterdir() if ".tmp" in p.name]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val/acc1" in r]
    assert [r["epoch"] for r in epochs] == [0, 1] and epochs[-1]["val/acc1"] == metrics["val/acc1"]
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert len(lrs) == 12 and max(lrs) > lrs[-1]  # per-step cosine schedule after warm-up
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    assert "epoch 1/2" in (output / "log.txt").read_text()


def test_evaluate_reproduces_the_training_metrics(trained: tuple[Path, dict], data: Path) -> None:
    output, metrics = trained
    result = evaluate(output / "last.pth", data, device="cpu", num_workers=0)
    assert result["images"] == 9
    assert result["acc1"] == pytest.approx(metrics["val/acc1"])
    assert result["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    ema = evaluate(output / "last.pth", data, device="cpu", num_workers=0, use_ema=True)
    assert ema["loss"] == pytest.approx(metrics["val_ema/loss"], rel=1e-5)


def test_evaluate_finds_data_under_the_home_folder_as_training_does(trained: tuple[Path, dict], data: Path,
                                                                      capsys, monkeypatch) -> None:
    """``data.root=~/DATA`` (no shell expands a ``~`` there): training's config read it as the home
    folder, evaluate said "data folder not found: ~/DATA"."""
    from crossformer.cli import main

    monkeypatch.setenv("HOME", str(data.parent))
    assert main(["evaluate", "--checkpoint", str(trained[0] / "last.pth"), f"data.root=~/{data.name}", "--device", "cpu",
                 "--num-workers", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 9
    assert evaluate(trained[0] / "last.pth", f"~/{data.name}", device="cpu", num_workers=0)["images"] == 9


def test_evaluate_counts_top1_and_top5_hits_and_leaves_the_model_training() -> None:
    # the "model" returns its input: logits ranking class 0 first, class 6 last, for every image
    logits = torch.arange(7, 0, -1, dtype=torch.float32).expand(4, 7)
    targets = torch.tensor([0, 1, 4, 5])  # ranked 1st, 2nd, 5th and 6th
    batches = [(logits[:3], targets[:3], []), (logits[3:], targets[3:], [])]
    model = torch.nn.Identity().train()
    metrics = evaluate_batches(model, batches, DistContext(), resolve_precision("none", torch.device("cpu")))
    assert (metrics["acc1"], metrics["acc5"], metrics["images"]) == (25.0, 75.0, 4)
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)))
    assert model.training  # evaluation during training puts the model back as it was


def test_resuming_on_other_classes_is_refused(trained: tuple[Path, dict], tmp_path: Path) -> None:
    other = make_image_folder(tmp_path / "data", {"train": 2, "val": 1}, classes=("ant", "bee", "cow"))  # others, as many
    with pytest.raises(UserInputError, match="last.pth was trained on other classes than .*train; use the same data"):
        train(tiny_config(other, tmp_path / "run", epochs=3, resume=str(trained[0] / "last.pth")))


def test_training_refuses_validation_without_a_training_class(tmp_path: Path) -> None:
    # numbered by its own folders, "eel" missing from val would make val's labels mean other classes
    data = make_image_folder(tmp_path / "data", {"train": 2})
    make_image_folder(data, {"val": 1}, classes=("cat", "dog"))
    with pytest.raises(DataError, match="val lacks class folder 'eel'"):
        train(tiny_config(data, tmp_path / "run"))


def test_checkpoints_record_the_evaluation_crop_they_were_trained_with(data: Path) -> None:
    task = train_module.ClassificationTask(tiny_config(data, "unused", crop_pct=1.0), DistContext())
    assert task.checkpoint_extras()["crop_pct"] == 1.0  # what evaluate and predict then crop to


def test_the_run_line_says_model_parameters_classes_and_images(data: Path) -> None:
    task = train_module.ClassificationTask(tiny_config(data, "unused"), DistContext())
    params = sum(p.numel() for p in task.model.parameters()) / 1e6
    assert task.describe() == (f"{task.config.model.name}: {params:.2f}M params, {len(task.classes)} classes, "
                               f"{len(task.train_set)} train / {len(task.val_set)} val images")


def test_the_training_order_follows_the_runs_seed(data: Path) -> None:
    orders = []
    for seed in (0, 1):
        sampler = train_module.ClassificationTask(tiny_config(data, "unused", seed=seed), DistContext()).train_sampler
        sampler.set_epoch(0)
        orders.append(list(sampler))
    assert orders[0] != orders[1]


def test_evaluate_refuses_other_classes(trained: tuple[Path, dict], tmp_path: Path) -> None:
    other = make_image_folder(tmp_path, {"val": 1}, classes=("cat", "dog"))
    with pytest.raises(DataError, match="lacks class folder 'eel'"):
        evaluate(trained[0] / "best.pth", other, device="cpu", num_workers=0)


def test_predict_matches_the_model(trained: tuple[Path, dict], data: Path) -> None:
    results = predict([data / "val" / "dog", data / "val" / "cat" / "0.png"], trained[0] / "best.pth", topk=2, device="cpu")
    assert [Path(r.path).name for r in results] == ["0.png", "1.png", "2.png", "0.png"]
    assert all(len(r.labels) == 2 and set(r.labels) <= {"cat", "dog", "eel"} for r in results)
    assert all(r.scores[0] >= r.scores[1] and 0 < sum(r.scores) <= 1 + 1e-6 for r in results)
    loaded = load_classifier(trained[0] / "best.pth")
    assert loaded.class_names == ["cat", "dog", "eel"] and loaded.img_size == 32
    with pytest.raises(DataError, match="no such image"):
        predict([data / "missing.png"], trained[0] / "best.pth", device="cpu")
    with pytest.raises(UserInputError, match="--topk must be at least 1, got 0"):  # it gave one label, quietly
        predict([data / "val" / "dog"], trained[0] / "best.pth", topk=0, device="cpu")


def test_predict_in_batches_smaller_than_the_files_labels_every_file(trained: tuple[Path, dict], data: Path) -> None:
    files = sorted((data / "val").rglob("*.png"))
    at_once = predict(files, trained[0] / "best.pth", device="cpu")
    in_pairs = predict(files, trained[0] / "best.pth", batch_size=2, device="cpu")
    assert len(at_once) == len(files) == 9
    assert [(r.path, r.labels) for r in in_pairs] == [(r.path, r.labels) for r in at_once]
    torch.testing.assert_close([r.scores for r in in_pairs], [r.scores for r in at_once])


def test_predict_takes_one_path_as_well_as_a_list(trained: tuple[Path, dict], data: Path, monkeypatch) -> None:
    """``predict("cat.jpg", ...)``: one image or folder, as a str or a Path, is that image or
    folder (not the characters of its name, of which "/" would be the whole file system)."""
    monkeypatch.chdir(data)
    checkpoint = trained[0] / "best.pth"
    listed = predict(["val/cat/0.png", "val/dog"], checkpoint, device="cpu")
    for one, expected in (("val/cat/0.png", listed[:1]), (Path("val/dog"), listed[1:])):
        got = predict(one, checkpoint, device="cpu")
        assert [(r.path, r.labels) for r in got] == [(r.path, r.labels) for r in expected]
        torch.testing.assert_close([r.scores for r in got], [r.scores for r in expected])  # batched otherwise


def test_predict_takes_class_names_as_a_file_as_well_as_a_list(trained: tuple[Path, dict], data: Path,
                                                               tmp_path: Path, monkeypatch) -> None:
    """``class_names="abc"`` is the file ``abc`` (as --class-names reads it), not the three
    names "a", "b" and "c" that would label a 3-class model without a word."""
    monkeypatch.chdir(tmp_path)
    Path("abc").write_text("wall\nsky\nroad\n", encoding="utf-8")
    image, checkpoint = data / "val" / "cat" / "0.png", trained[0] / "best.pth"
    [listed] = predict(image, checkpoint, topk=3, class_names=["wall", "sky", "road"], device="cpu")
    for names in ("abc", Path("abc")):
        [result] = predict(image, checkpoint, topk=3, class_names=names, device="cpu")
        assert result.labels == listed.labels
    assert sorted(listed.labels) == ["road", "sky", "wall"]  # the names given, not those the checkpoint records


def test_files_without_class_names_are_labelled_as_imagenet_at_1000_classes(tmp_path: Path, data: Path) -> None:
    """The authors' releases record no class names; their 1000 outputs are ImageNet-1k's."""
    from crossformer.classification.predict import imagenet_class_names
    from crossformer.models import CrossFormer

    names = imagenet_class_names()
    assert len(set(names)) == 998 and names[:3] == ["tench", "goldfish", "great white shark"]  # "crane" and "maillot" twice
    assert names[281] == "tabby" and names[999] == "toilet tissue"
    image = data / "val" / "cat" / "0.png"
    notes: list[str] = []
    for classes in (1000, 999, 7):  # ImageNet's names at exactly 1000 outputs
        model = CrossFormer(**TINY_MODEL, num_classes=classes)
        torch.save({"model": model.state_dict()}, tmp_path / f"bare{classes}.pth")
        [result] = predict([image], tmp_path / f"bare{classes}.pth", model="crossformer_tiny", model_kwargs=TINY_MODEL,
                           img_size=32, topk=3, device="cpu", on_note=notes.append)
        model.eval()
        with torch.no_grad():
            expected = model(_eval_batch(image, 32)).topk(3).indices[0].tolist()  # the file's own numbering
        assert result.labels == ([names[i] for i in expected] if classes == 1000 else [str(i) for i in expected])
    assert [n for n in notes if "records no class names" in n] == [
        f"{tmp_path / 'bare1000.pth'} (crossformer_tiny) records no class names: labels are ImageNet-1k's "
        "(--class-names FILE gives others)"
    ]
    # a registered variant's weights need no model name: the authors' files are used as they are
    import timm

    official = timm.create_model("crossformer_tiny").eval()
    torch.save({"model": official.state_dict(), "epoch": 299, "max_accuracy": 81.5}, tmp_path / "crossformer-t.pth")
    [result] = predict([image], tmp_path / "crossformer-t.pth", topk=2, device="cpu", on_note=notes.append)
    assert any(n.startswith(f"{tmp_path / 'crossformer-t.pth'} (crossformer_tiny) records no class names") for n in notes)
    with torch.no_grad():
        expected = official(_eval_batch(image, 224)).topk(2).indices[0].tolist()
    assert result.labels == [names[i] for i in expected]
    with pytest.raises(UserInputError, match="bare7.pth does not name its model and fits no registered variant: "
                                             r"pass --model NAME \(and --model-arg"):
        predict([image], tmp_path / "bare7.pth", device="cpu")  # a size of its own


def _eval_batch(path: Path, size: int) -> torch.Tensor:
    from crossformer.data import build_eval_transform, open_image

    return build_eval_transform(size, 0.875, "bicubic")(open_image(path)).unsqueeze(0)


def test_label_smoothing_without_mixing_smooths_the_loss() -> None:
    from crossformer.classification.config import AugmentConfig

    logits, targets = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    log_probs = logits.log_softmax(dim=1)
    for smoothing in (0.1, 0.0):
        mixup, criterion = train_module._criterion(AugmentConfig(mixup=0.0, cutmix=0.0, label_smoothing=smoothing), 3)
        expected = (1 - smoothing) * -log_probs[0, 0] + smoothing * -log_probs.mean()
        assert mixup is None and float(criterion(logits, targets)) == pytest.approx(float(expected))


def test_unreadable_training_image_stops_or_is_skipped(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    broken = data / "train" / "dog" / "9.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"cannot read image {broken}"):
        train(tiny_config(data, tmp_path / "a", epochs=1))
    metrics = train(tiny_config(data, tmp_path / "b", epochs=1, skip_corrupt=True))
    assert metrics["train/unreadable_images"] == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data: Path, tmp_path: Path, monkeypatch) -> None:
    real = train_module._criterion

    def poisoned(augment, num_classes):
        mixup, loss = real(augment, num_classes)
        calls = iter(range(10**6))

        def loss_going_nan(logits, targets):
            value = loss(logits, targets)
            return value * float("nan") if next(calls) == 5 else value  # the 6th step diverges

        return mixup, loss_going_nan

    monkeypatch.setattr(train_module, "_criterion", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 0 step 5;.*last good checkpoint is .*last.pth"):
        train(tiny_config(data, tmp_path, save_every_steps=2))
    state = load_training_state(tmp_path / "last.pth")
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from classification_fixtures import tiny_config
from crossformer.classification import train
def kill(step):
    if step == 9:  # mid-epoch 1; the last checkpoint (step 8) is one update behind
        os.kill(os.getpid(), signal.SIGKILL)
train(tiny_config({data!r}, {output!r}, **{settings!r}), on_step_end=kill)
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_unkilled_run(data: Path, tmp_path: Path) -> None:
    settings = dict(deterministic=True, save_every_steps=4, epochs=3, model_ema=True, model_ema_decay=0.9)
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    script = textwrap.dedent(_KILLED_RUN).format(
        tests=str(Path(__file__).parent), data=str(data), output=str(killed_dir), settings=settings
    )
    proc = run_process([sys.executable, "-c", script], timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    interrupted = load_training_state(killed_dir / "last.pth")
    assert (interrupted["epoch"], interrupted["batches_done"], interrupted["global_step"]) == (1, 2, 8)

    resumed = train(tiny_config(data, killed_dir, resume="auto", **settings))
    clean = train(tiny_config(data, clean_dir, **settings))
    assert resumed == clean  # every metric, bit for bit
    a, b = load_training_state(killed_dir / "last.pth"), load_training_state(clean_dir / "last.pth")
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key])


def test_gradient_accumulation_and_bf16_on_cpu(data: Path, tmp_path: Path) -> None:
    metrics = train(tiny_config(data, tmp_path, epochs=1, accum_steps=2, amp="bf16"))
    assert metrics["global_step"] == 3  # 6 batches, one update per 2
    assert "global batch 8, lr 7.81e-06" in (tmp_path / "log.txt").read_text()  # 5e-4 x 8 / 512
    assert all(v.dtype == torch.float32 for v in load_training_state(tmp_path / "last.pth")["model"].values())


def test_resume_auto_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(data: Path, tmp_path: Path) -> None:
    first = train(tiny_config(data, tmp_path, epochs=1, resume="auto"))
    assert first["global_step"] == 6
    again = train(tiny_config(data, tmp_path, epochs=1, resume="auto"))
    assert again["global_step"] == 6 and again["epoch"] == 1


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="reference checkpoints ship beside the repo in ../shared")
def test_evaluate_an_official_checkpoint_with_bicubic_resize_and_centre_crop(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision import transforms as T

    from crossformer.models import load_checkpoint

    classes = [f"n{i:08d}" for i in range(10)]
    data = make_image_folder(tmp_path, {"val": 1}, classes=tuple(classes), size=260)
    Image.new("RGB", (300, 260), (10, 200, 30)).save(data / "val" / classes[3] / "wide.png")
    reference = dict(embed_dim=32, depths=[2, 2, 4, 2], num_heads=[1, 2, 4, 8])
    result = evaluate(REFERENCE / "v1_cls.pth", data, model="crossformer_tiny", model_kwargs=reference,
                      device="cpu", num_workers=0)
    assert result["images"] == 11

    # The same by hand: resize the short side to 224/0.875 = 256 (bicubic), centre-crop 224.
    import timm

    model = load_checkpoint(timm.create_model("crossformer_tiny", num_classes=10, **reference), REFERENCE / "v1_cls.pth").eval()
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images, targets = [], []
    for index, name in enumerate(classes):
        for path in sorted((data / "val" / name).iterdir()):
            images.append(tf(Image.open(path).convert("RGB")))
            targets.append(index)
    with torch.no_grad():
        logits = model(torch.stack(images))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets)).item()
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    with pytest.raises(Exception, match="--model"):
        evaluate(REFERENCE / "v1_cls.pth", data, device="cpu", num_workers=0)


def test_predict_reads_a_named_file_by_its_content(trained: tuple[Path, dict], data: Path, tmp_path: Path) -> None:
    """A PNG named without an extension (or with an unusual one) was refused ("is not an image
    file"); a file the user names is read by its content. Folders still list images by extension."""
    checkpoint = trained[0] / "best.pth"
    image = data / "val" / "cat" / "0.png"
    shutil.copy(image, tmp_path / "photo")
    shutil.copy(image, tmp_path / "photo.dat")
    got = predict([image, tmp_path / "photo", tmp_path / "photo.dat"], checkpoint, device="cpu")
    assert [r.labels for r in got[1:]] == [got[0].labels] * 2
    torch.testing.assert_close([r.scores for r in got[1:]], [got[0].scores] * 2)
    with pytest.raises(DataError, match="no images in folder"):  # a folder's files go by their extension
        predict(tmp_path, checkpoint, device="cpu")


def _task_on_the_digits(cache: Path) -> str:
    """Under :func:`~two_ranks.on_two_ranks`: a classification task on the built-in digits,
    written into ``cache`` by rank 0, or its one-line error."""
    import os

    from crossformer.classification import resolve_config
    from crossformer.engine import setup_distributed

    os.environ["CROSSFORMER_CACHE"] = str(cache)
    config = resolve_config(model="crossformer_tiny", overrides={"model.kwargs": TINY_MODEL, "img_size": 32,
                                                                  "num_workers": 0, "device": "cpu"})
    try:
        train_module.ClassificationTask(config, setup_distributed("cpu"))
    except UserInputError as err:
        return str(err)
    return "built"


@pytest.mark.slow
def test_digits_rank_0_cannot_write_stop_every_rank_with_its_line(tmp_path):
    # rank 0 stopped alone (a NotADirectoryError traceback) while rank 1 waited for the digits in a barrier
    from two_ranks import on_two_ranks

    (tmp_path / "file").write_text("")
    said = f"cannot write {tmp_path / 'file' / 'cache'}: {tmp_path / 'file'} is a file, not a folder"
    assert on_two_ranks(_task_on_the_digits, tmp_path / "file" / "cache") == [said, said]


def test_bf16_agreement_script_reads_a_training_checkpoint(trained: tuple[Path, dict], data: Path, monkeypatch, capsys) -> None:
    """benchmarks/bf16_agreement.py (issue 15's agreement figure) broke unseen when the loaded
    classifier lost its mean and std: it runs on a checkpoint of ours and its data."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bf16_agreement_script", ROOT / "benchmarks" / "bf16_agreement.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output, _ = trained
    monkeypatch.setattr(sys, "argv", ["bf16_agreement.py", "--checkpoint", str(output / "best.pth"), "--data", str(data)])
    script.main()
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 9  # 3 held-out images of each of 3 classes
    assert 0.0 <= result["acc1_fp32"] <= 1.0 and 0.0 <= result["top1_agreement"] <= 1.0
    assert 0.0 < result["max_logit_diff"] < 1.0  # bf16 changes the logits, slightly


def test_predict_under_bf16_autocast(trained: tuple[Path, dict], data: Path) -> None:
    """``amp="bf16"`` (``--amp bf16``, ``run.amp=bf16``) runs predict under autocast; before,
    the command took ``run.amp=bf16`` and predicted in float32."""
    import warnings

    from crossformer.errors import PerformanceWarning

    output, _ = trained
    fp32 = predict(data / "val", output / "best.pth", amp="none", topk=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)  # a CPU without bf16 instructions emulates it
        bf16 = predict(data / "val", output / "best.pth", amp="bf16", topk=3)
    assert [r.path for r in bf16] == [r.path for r in fp32] and len(fp32) == 9
    diffs = [abs(dict(zip(a.labels, a.scores))[label] - score)
             for a, b in zip(fp32, bf16) for label, score in zip(b.labels, b.scores)]
    assert 0.0 < max(diffs) < 0.05  # bf16 rounding moves the probabilities, a little


def test_evaluate_with_run_deterministic_times_no_kernel_choice(trained: tuple[Path, dict], data: Path, capsys,
                                                               monkeypatch) -> None:
    """``run.deterministic=true`` was accepted by evaluate and changed nothing: the process timed
    its kernel choices (a bf16 evaluation's figures moved from one run to the next)."""
    from crossformer.cli import main
    from crossformer.models import layers

    output, _ = trained
    argv = ["evaluate", "--checkpoint", str(output / "best.pth"), "--data", str(data), "--device", "cpu",
            "--num-workers", "0", "--json"]
    monkeypatch.setattr(layers, "_GEMM_CHOICES", {})
    assert main([*argv, "run.deterministic=true"]) == 0
    assert layers.gemm_choices() == {} and not torch.are_deterministic_algorithms_enabled()  # and put back after
    deterministic = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert layers.gemm_choices()  # the default times them
    assert json.loads(capsys.readouterr().out)["acc1"] == deterministic["acc1"]
