"""Run configurations in layers: the engine's sections, the task's sections, YAML, overrides.

A configuration is a frozen dataclass whose fields are *sections* (frozen dataclasses of
settings). The engine owns three (:class:`RunConfig`, :class:`OptimizerConfig`,
:class:`ScheduleConfig`, gathered in :class:`EngineConfig`); each task subclasses
:class:`EngineConfig` and adds its own (model, data, augmentation, test settings).

Values arrive from YAML files and ``KEY=VALUE`` overrides. A key is ``section.field``
(``run.epochs``), or the bare field name when only one section has it (``epochs``); a
further ``.key`` sets one entry of a mapping field (``model.kwargs.embed_dim``). A section
that names a ``shorthand`` field also takes a bare value (``model: crossformer_tiny``).
Every value is checked against the field's type annotation; errors are one line naming
the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, TypeVar

import yaml

from ..errors import UserInputError
from .cpus import default_workers

__all__ = [
    "RunConfig", "OptimizerConfig", "ScheduleConfig", "EngineConfig",
    "load_yaml", "load_yaml_layers", "merged_settings", "parse_overrides", "apply_overrides", "config_to_dict",
    "config_differences", "leaf_keys", "resolve_key", "build_config", "check_one_start", "DENSE_ALTERNATIVES",
    "check_drop_path", "with_drop_path", "fold_recorded_drop_path",
    "replaced_alternatives", "check_run_unit_kept", "RUN_UNIT_SETTINGS", "with_absolute_paths", "with_home_expanded",
    "AmpMode",
]

C = TypeVar("C")
# run.amp (mixed precision, :mod:`.amp`); here, since the configuration is read without torch
AmpMode = Literal["auto", "none", "bf16", "fp16"]


# ---------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig:
    """How long to train and how the loop runs. Lengths count epochs *or* iterations
    (optimizer updates): set exactly one of ``epochs`` and ``iterations`` (see
    :attr:`EngineConfig.alternatives`); ``eval_every`` and
    ``checkpoint_every`` are in the same unit. ``eval_every: 0`` (the default) evaluates at
    the end of each pass over the training data in either unit: an iteration run that never
    chose a period evaluates once an epoch, not after every update."""

    epochs: int = 0  # passes over the training data (or set iterations)
    iterations: int = 0  # optimizer updates (or set epochs)
    eval_every: int = 0  # evaluate (and pick best.pth) every N epochs / iterations (0: every epoch), and at the end
    checkpoint_every: int = 0  # also write last.pth every N epochs / iterations (0: at evaluations and the end)
    save_every_steps: int = 0  # also write last.pth every N optimizer updates (0: off)
    batch_size: int = 128  # per process; global batch = batch_size x processes x accum_steps
    num_workers: int = field(default_factory=default_workers)  # loader processes (by default one per CPU available, at most 8)
    accum_steps: int = 1  # micro-batches per optimizer update
    clip_grad: float = 0.0  # clip the global gradient norm to this (0: no clipping, norm still logged)
    amp: AmpMode = "auto"  # auto: bf16 (fp16 where unsupported) on a GPU, fp32 on the CPU
    model_ema: bool = False  # keep an exponential moving average of the weights (evaluated beside them)
    model_ema_decay: float = 0.9999  # the EMA's weight on its previous value, per update
    seed: int = 0  # seeds weights, data order and augmentation (each rank adds its rank)
    deterministic: bool = False  # bitwise-reproducible kernels (slower); exact resume on GPUs
    device: str = "auto"  # auto (a GPU if there is one), cpu, cuda or cuda:N
    cpu_threads: int = 0  # torch threads per process on the CPU (0: torch's default)
    output: str = "output/train"  # the run's folder: last.pth, best.pth, log.txt, metrics.jsonl, tensorboard/
    resume: str | None = None  # "auto" (OUTPUT/last.pth if present) or a file (in OUTPUT, or OUTPUT new or empty)
    overwrite: bool = False  # replace an earlier run in output (its checkpoints and logs, deleted once this run has started)
    log_every: int = 50  # a train/lr, train/step_loss, train/grad_norm record every N updates
    tensorboard: bool = True  # also write TensorBoard events under output/tensorboard

    @property
    def by_iterations(self) -> bool:
        return self.iterations > 0

    @property
    def length(self) -> int:
        """The run's length in its own unit (epochs or iterations)."""
        return self.iterations or self.epochs

    @property
    def unit(self) -> str:
        return "iteration" if self.by_iterations else "epoch"

    def validate(self) -> None:
        for name in ("epochs", "iterations"):  # said before the pair: -1 is a wrong length, not a second one
            if getattr(self, name) < 0:
                raise UserInputError(f"run.{name} must be at least 1 (0: not set), got {getattr(self, name)}")
        if (self.epochs > 0) == (self.iterations > 0):
            raise UserInputError(
                f"run: set exactly one of run.epochs and run.iterations (got epochs={self.epochs}, "
                f"iterations={self.iterations})"
            )
        _at_least(self, 1, "batch_size", "accum_steps", "log_every")
        _at_least(self, 0, "eval_every", "checkpoint_every", "save_every_steps", "num_workers", "cpu_threads",
                  "clip_grad")
        if not 0 <= self.model_ema_decay < 1:
            raise UserInputError(f"run.model_ema_decay must be in [0, 1), got {self.model_ema_decay}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW. No weight decay on 1-d parameters (norms, biases; unless ``decay_1d``), on the
    model's ``no_weight_decay()`` names, nor on any parameter whose name contains one of
    ``no_decay_keys`` (mmseg's ``norm`` rule)."""

    lr: float = 5e-4  # peak rate; per lr_batch_reference images when scale_lr
    weight_decay: float = 0.05  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment decay rates
    eps: float = 1e-8  # AdamW's denominator term
    no_decay_keys: tuple[str, ...] = ()  # no weight decay on parameters whose name contains one of these
    decay_1d: bool = False  # decay biases and norms too, unless a key names them (the mmdet and mmseg recipes)
    scale_lr: bool = True  # linear scaling: lr, min_lr x global batch / lr_batch_reference
    lr_batch_reference: int = 512  # the global batch that lr is given for (with scale_lr)

    def validate(self) -> None:
        _at_least(self, 0, "lr", "weight_decay")
        _at_least(self, 1, "lr_batch_reference")
        if not self.eps > 0:  # 0 divides by zero where a parameter's gradient is 0: a NaN loss at the next step
            raise UserInputError(f"optimizer.eps must be above 0, got {self.eps}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise UserInputError(f"optimizer.betas must each be in [0, 1), got {list(self.betas)}")

    def unread(self) -> list[tuple[str, str, str]]:
        """The settings nothing reads under this section's choice (see :func:`refuse_unread_settings`)."""
        return [] if self.scale_lr else [("lr_batch_reference", "scale_lr", "the linear lr scaling")]


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate per optimizer update, a pure function of the update count.

    - ``cosine``: linear warm-up from ``warmup_ratio x lr`` to ``lr``, then cosine decay to ``min_lr``.
    - ``step``: ``lr x gamma^k`` after the k-th of ``milestones`` (epochs or iterations, the run's
      unit), times a linear warm-up factor rising from ``warmup_ratio`` to 1.
    - ``poly``: ``(lr - min_lr) x (1 - t/T)^power + min_lr``, times the same warm-up factor.

    The warm-up lasts ``warmup_epochs`` epochs or ``warmup_iters`` updates (at most one set),
    in a run of either unit: an epoch is the updates of one pass over the training data, so
    ``--iterations N`` over a recipe's ``warmup_epochs`` keeps its warm-up's length.
    """

    shorthand: ClassVar[str] = "name"

    name: Literal["cosine", "step", "poly"] = "cosine"  # the decay after the warm-up
    warmup_epochs: int = 0  # linear warm-up over this many epochs (or warmup_iters)
    warmup_iters: int = 0  # linear warm-up over this many updates (or warmup_epochs)
    warmup_ratio: float = 0.001  # the warm-up starts at this fraction of lr
    min_lr: float = 0.0  # cosine and poly: the final rate; scaled with lr
    milestones: tuple[int, ...] = ()  # step: multiply the rate by gamma after each of these
    gamma: float = 0.1  # step: the factor at each milestone
    power: float = 0.9  # poly: the exponent of the decay

    def validate(self) -> None:
        _at_least(self, 0, "warmup_epochs", "warmup_iters", "min_lr", "power")
        if self.warmup_epochs and self.warmup_iters:
            raise UserInputError("schedule: set at most one of schedule.warmup_epochs and schedule.warmup_iters")
        if not 0 < self.warmup_ratio <= 1:
            raise UserInputError(f"schedule.warmup_ratio must be in (0, 1], got {self.warmup_ratio}")
        if list(self.milestones) != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise UserInputError(f"schedule.milestones must rise from 1 or more, got {list(self.milestones)}")
        if self.name == "step" and not self.milestones:
            raise UserInputError("schedule.name=step needs schedule.milestones, e.g. [8, 11]")
        if not self.gamma > 0:  # a negative rate climbs the loss; 0 stops training at the first milestone
            raise UserInputError(f"schedule.gamma must be above 0, got {self.gamma}")

    def unread(self) -> list[tuple[str, str, str]]:
        """The settings nothing reads under this schedule (see :func:`refuse_unread_settings`)."""
        return [(name, "name", f"the {kind} schedule") for kind, names in (("step", ("milestones", "gamma")),
                                                                         ("poly", ("power",)))
                if self.name != kind for name in names]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's sections. A task's configuration subclasses this and adds its own
    sections; ``task`` names the task (its registry key)."""

    # pairs of settings that each choose the same thing (a class attribute, not a setting): a
    # layer (the file, the command line) that sets one and not the other replaces the choice of
    # the layers below, so ``--iterations N`` over a file's epochs needs no ``--epochs 0``
    alternatives = (
        ("run.epochs", "run.iterations"),
        ("schedule.warmup_epochs", "schedule.warmup_iters"),
    )
    # (setting, the settings it stands for): a layer that sets the first and not one of the others
    # replaces the layers below's choice of that one (both in one layer: the other refines it)
    covers: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = ()
    # the settings (sections or section.field) only training reads: evaluate and predict refuse
    # them on their command line rather than take them without effect
    training_only: ClassVar[tuple[str, ...]] = (
        "optimizer", "schedule", "run.epochs", "run.iterations", "run.eval_every", "run.checkpoint_every",
        "run.save_every_steps", "run.accum_steps", "run.clip_grad", "run.model_ema", "run.model_ema_decay",
        "run.output", "run.resume", "run.overwrite", "run.log_every", "run.tensorboard",
    )
    # the settings only predict reads (what it draws): evaluate, flops and export refuse them
    predict_only: ClassVar[tuple[str, ...]] = ()

    task: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self: C) -> C:
        """Each section's ``validate()``, the cross-section rules (:meth:`check_rules`), then each
        section's ``validate_build()``: the model built on the meta device, which imports torch
        (seconds), so it comes once every quick check has passed."""
        sections = [getattr(self, f.name) for f in dataclasses.fields(self)]
        sections = [section for section in sections if dataclasses.is_dataclass(section)]
        for section in sections:
            if hasattr(section, "validate"):
                section.validate()
        self.check_rules()
        for section in sections:
            if hasattr(section, "validate_build"):
                section.validate_build()
        return self

    def check_rules(self) -> None:
        """The rules across sections (a task extends this)."""
        if self.schedule.min_lr > self.optimizer.lr:  # the cosine and poly "decays" would climb to it
            raise UserInputError(f"schedule.min_lr ({self.schedule.min_lr}) must not exceed optimizer.lr "
                                 f"({self.optimizer.lr}): it is the rate the schedule decays to")


# a dense task's alternatives: an ImageNet backbone or a whole model to start from
DENSE_ALTERNATIVES = (*EngineConfig.alternatives, ("model.pretrained", "model.init_from"))


# Why the two of an alternatives pair exclude each other, where more than "set one" helps.
ALTERNATIVE_REASONS = {
    ("model.pretrained", "model.init_from"): "the whole model (init_from) brings its own backbone; drop model.pretrained",
}


def check_one_start(pretrained: str | None, init_from: str | None) -> None:
    """A dense model starts from an ImageNet backbone (``model.pretrained``) or from a whole
    model (``model.init_from``), which brings its backbone: not both."""
    if pretrained is not None and init_from is not None:
        pair = ("model.pretrained", "model.init_from")
        raise UserInputError(f"{pair[0]} and {pair[1]} are both set: {ALTERNATIVE_REASONS[pair]}")


# the constructors' name of the stochastic depth rate, which configs set as model.drop_path only
DROP_PATH_RATE = "drop_path_rate"
# the model section's constructor-settings mappings (classification's, detection's and segmentation's)
_MODEL_KWARGS_KEYS = ("kwargs", "backbone_kwargs")


def check_drop_path(drop_path: float | None, kwargs: Mapping[str, Any], kwargs_key: str) -> None:
    """``model.drop_path`` is in [0, 1) and the one setting of the rate: the constructor's
    spelling in ``kwargs`` (``kwargs_key``, e.g. ``model.backbone_kwargs``) is refused, since
    two names for one rate leave one of them silently unread."""
    if drop_path is not None and not 0 <= drop_path < 1:
        raise UserInputError(f"model.drop_path must be in [0, 1), got {drop_path}")
    if DROP_PATH_RATE in kwargs:
        raise UserInputError(f"{kwargs_key}.{DROP_PATH_RATE} is set by model.drop_path: "
                             f"use model.drop_path={kwargs[DROP_PATH_RATE]} instead")


def with_drop_path(kwargs: Mapping[str, Any], drop_path: float | None) -> dict[str, Any]:
    """The constructor settings ``kwargs`` with ``drop_path`` as their rate (None: the variant's)."""
    return dict(kwargs) if drop_path is None else {**kwargs, DROP_PATH_RATE: drop_path}


class DenseModelChecks:
    """What detection's and segmentation's model sections share (a mixin of their dataclasses):
    a CrossFormer variant as ``backbone`` with ``backbone_kwargs`` over the task's grouping, its
    ``drop_path`` rate, ``num_classes`` (None: the data's) and one start, ``pretrained`` or
    ``init_from``."""

    def validate_backbone(self) -> None:
        """One-line errors for the shared fields (the task's ``validate`` checks its own)."""
        from ..variant_table import require_known_model

        require_known_model(self.backbone, variants_only=True, setting="model.backbone")
        if self.num_classes is not None and self.num_classes < 1:
            raise UserInputError(f"model.num_classes must be at least 1 (or null: from the data), got {self.num_classes}")
        check_drop_path(self.drop_path, self.backbone_kwargs, "model.backbone_kwargs")
        check_one_start(self.pretrained, self.init_from)

    def validate_build(self) -> None:
        """The backbone settings build (a one-line error where not); the variant as registered does."""
        if self.backbone_kwargs:
            from ..models.dense import build_task_backbone
            from ..models.variants import check_builds

            check_builds(build_task_backbone, self.backbone, self.backbone_settings())

    def backbone_settings(self) -> dict[str, Any]:
        """``backbone_kwargs`` with the drop path rate (if set; else the variant's own)."""
        return with_drop_path(self.backbone_kwargs, self.drop_path)


def fold_recorded_drop_path(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded configuration (:func:`config_to_dict`) with a rate that older
    runs set in the model's constructor settings moved to ``model.drop_path``, so that it
    passes :func:`check_drop_path` (``model.drop_path`` kept where both were set)."""
    model = dict(recorded.get("model") or {})
    for key in _MODEL_KWARGS_KEYS:
        kwargs = dict(model.get(key) or {})
        if DROP_PATH_RATE in kwargs:
            rate = kwargs.pop(DROP_PATH_RATE)
            model[key] = kwargs
            model["drop_path"] = rate if model.get("drop_path") is None else model["drop_path"]
    return {**recorded, "model": model} if "model" in recorded else dict(recorded)


def refuse_unread_settings(config: Any, layers: Iterable[tuple[Mapping[str, Any], str]], first_checked: int = 0) -> None:
    """Refuse a setting that nothing reads under the configuration's choices (each section's
    ``unread()``: ``(field, the field that chooses, what would read it)``, e.g. a cosine run's
    ``schedule.milestones``, Semantic FPN's ``model.aux_channels``) where it is set away from its
    default in the layer that makes the choice or one above it: a run would go without it, unsaid.
    Set below the choice (``--kind retinanet`` over a Mask R-CNN file's head sizes), it is left
    unread: the layer above chose otherwise.

    ``layers``: flat ``section.field`` settings, lowest first, over the defaults; only settings
    from ``layers[first_checked:]`` are refused (a checkpoint's recorded configuration, one layer
    holding every field the run was trained with, is read as it was trained)."""
    layers = list(layers)

    def last_layer(setting: str) -> int:  # -1: the defaults
        return max((i for i, (settings, _) in enumerate(layers) if setting in settings), default=-1)

    for section in (f.name for f in dataclasses.fields(config)):
        values = getattr(config, section)
        if not hasattr(values, "unread"):
            continue
        defaults = type(values)()
        for name, chooser, read_by in values.unread():
            value, default, layer = getattr(values, name), getattr(defaults, name), last_layer(f"{section}.{name}")
            if value == default or layer < max(last_layer(f"{section}.{chooser}"), first_checked):
                continue
            choice = f"{section}.{chooser}={_shown(getattr(values, chooser)).lower()}"
            raise UserInputError(f"{layers[layer][1] if layer >= 0 else 'defaults'}: {section}.{name}={_shown(value)} "
                                 f"has no effect with {choice}: only {read_by} reads it; drop it (or set "
                                 f"{section}.{name}={_shown(default)})")


def _at_least(section: Any, low: float, *names: str) -> None:
    prefix = _SECTION_NAMES.get(type(section).__name__, "")
    for name in names:
        if getattr(section, name) < low:
            raise UserInputError(f"{prefix}{name} must be at least {low}, got {getattr(section, name)}")


_SECTION_NAMES = {"RunConfig": "run.", "OptimizerConfig": "optimizer.", "ScheduleConfig": "schedule."}


# ---------------------------------------------------------------------------- reading values


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's settings; a one-line error for a missing or malformed file.

    A file may start from another (``base: NAME_OR_PATH``: a bundled config's name, or a path
    that is tried relative to the file first) and change what it names: sections merge key by
    key, mappings within them too (``model.kwargs``), any other value replaces the base's.
    (:func:`~crossformer.engine.registry.file_settings` also lets a file's choice of one of
    its config's :attr:`~EngineConfig.alternatives` replace its base's choice of the other.)
    """
    merged: dict[str, Any] = {}
    for values, _ in load_yaml_layers(path):
        merged = merged_settings(merged, values)
    return merged


def load_yaml_layers(path: str | Path) -> list[tuple[dict[str, Any], str]]:
    """The settings of each file of ``path``'s ``base`` chain, base first, with its path."""
    return _load_with_bases(Path(path), ())


def _load_with_bases(path: Path, children: tuple[Path, ...]) -> list[tuple[dict[str, Any], str]]:
    """``path``'s settings after those of its ``base`` chain; ``children``: the files that
    named it (a loop is an error)."""
    data = _read_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return [(data, str(path))]
    if not isinstance(base, str):
        raise UserInputError(f"{path}: base must name one config (a bundled name or a file), got {base!r}")
    base_path = _find_base(base, path)
    chain = (*children, path.resolve())
    if base_path.resolve() in chain:
        raise UserInputError(f"{path}: base {base!r} leads back to {base_path}: configs cannot start from each other")
    return [*_load_with_bases(base_path, chain), (data, str(path))]


def _find_base(name: str, child: Path) -> Path:
    """A ``base`` named in ``child``: a file beside it, else a path or a bundled config's name."""
    from .registry import find_config

    beside = child.parent / name
    return beside if beside.is_file() else find_config(name)


def merged_settings(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` over it, mappings merged key by key at every depth."""
    result = dict(base)
    for key, value in changes.items():
        both_mappings = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = merged_settings(result[key], value) if both_mappings else value
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (which PyYAML resolves to
    the last silently: an earlier ``optimizer:`` section would be lost)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": the keys it brings yield to the mapping's own
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # a list as a key: the safe loader's own error says it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (line {key_node.start_mark.line + 1}): keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in one file."""
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UserInputError(f"{path} is not a UTF-8 text file: a config is YAML text (save it as UTF-8)") from None
    except yaml.YAMLError as err:
        raise UserInputError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a mapping of settings, found {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["run.epochs=5", "model.kwargs.embed_dim=32"]`` -> ``{"run.epochs": 5, "model.kwargs.embed_dim": 32}``.

    Values are read as YAML scalars/lists, so ``5`` is an int, ``5e-4`` a float and
    ``[1,1,2,1]`` a list.
    """
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"expected KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: say what is wrong with it
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise UserInputError(f"{key.strip()}={raw}: not a valid YAML list or mapping ({problem})") from None
            value = raw
        quoted = raw.strip().startswith(("'", '"'))  # text meant as text: "2024" stays a string
        result[key.strip()] = _number_or_text(value) if isinstance(value, str) and not quoted else value
    return result


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads ``5e-4`` (no dot) as text; people mean the number."""
    try:
        return float(text)
    except ValueError:
        return text


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` checked (and lightly converted) against the annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(key, value, option)
            except UserInputError as err:
                errors.append(str(err))
        raise UserInputError(errors[-1] if len(options) == 1 else f"{key} must be {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserInputError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            value = _number_or_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # every range check below passes NaN; no setting means infinity
            raise UserInputError(f"{key} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):  # a Python caller's pathlib.Path, wherever a path string goes
            value = os.fspath(value)
        if isinstance(value, (bool, int, float, datetime.date)):  # YAML reads 2024, 1e3, yes, 2024-12-07 so
            raise UserInputError(f"{key} must be a string, got {value!r}, which YAML read from unquoted text: "
                                 f"quote it (KEY='\"TEXT\"' on a command line, KEY: \"TEXT\" in a file)")
        if not isinstance(value, str):
            raise UserInputError(f"{key} must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise UserInputError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if args and len(value) != len(args):
            raise UserInputError(f"{key} must be a list of {len(args)}, got {list(value)!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserInputError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    return value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _describe(hint: Any) -> str:
    """A union's options in words: ``str | tuple[str, ...] | None`` -> "a string or a list of strings or null"."""
    return " or ".join(_describe_one(arg) for arg in typing.get_args(hint))


def _describe_one(arg: Any) -> str:
    """One option: "an integer", "a list of 2", "a list of strings", "a list of lists of 3"."""
    if typing.get_origin(arg) is not tuple:
        return _NAMES.get(arg, getattr(arg, "__name__", str(arg)))
    items = typing.get_args(arg)
    if len(items) != 2 or items[1] is not Ellipsis:
        return f"a list of {len(items)}"
    item = items[0]  # any length: say what each item is
    if typing.get_origin(item) is tuple:
        return "a list of lists" + _describe_one(item).removeprefix("a list")
    return f"a list of {_PLURALS.get(item, 'values')}"


# ---------------------------------------------------------------------------- keys


def _is_sectioned(config: Any) -> bool:
    return any(dataclasses.is_dataclass(getattr(config, f.name)) for f in dataclasses.fields(config))


def leaf_keys(config_cls: type) -> dict[str, tuple[str, str]]:
    """Every ``section.field`` of a sectioned configuration class -> ``(section, field)``."""
    result: dict[str, tuple[str, str]] = {}
    for section, cls in _hints(config_cls).items():
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                result[f"{section}.{f.name}"] = (section, f.name)
    return result


def resolve_key(config_cls: type, key: str, source: str = "config") -> tuple[str, str, str]:
    """``key`` -> ``(section, field, rest)``; ``rest`` is a mapping entry (``kwargs.embed_dim``)."""
    leaves = leaf_keys(config_cls)
    parts = key.split(".")
    sections = {s for s, _ in leaves.values()}
    if parts[0] in sections:
        if len(parts) == 1:
            raise UserInputError(f"{source}: {key!r} is a section; set one of its keys, e.g. {key}.<name>")
        full = f"{parts[0]}.{parts[1]}"
        if full not in leaves:
            valid = ", ".join(n for s, n in leaves.values() if s == parts[0])
            raise UserInputError(f"{source}: unknown setting {full!r}; {parts[0]} has: {valid}")
        return parts[0], parts[1], ".".join(parts[2:])
    owners = [s for s, n in leaves.values() if n == parts[0]]
    if len(owners) == 1:
        return owners[0], parts[0], ".".join(parts[1:])
    if len(owners) > 1:
        raise UserInputError(f"{source}: {parts[0]!r} is in several sections; write {' or '.join(f'{o}.{parts[0]}' for o in owners)}")
    raise UserInputError(f"{source}: unknown setting {parts[0]!r}; valid settings: {', '.join(sorted(leaves))}")


# ---------------------------------------------------------------------------- applying values


def _set_fields(obj: Any, values: Mapping[str, Any], prefix: str, source: str) -> Any:
    """A copy of the flat dataclass ``obj`` with ``values`` (``field`` or ``field.entry``) set."""
    hints = _hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name, _, entry = key.partition(".")
        if name not in fields:
            raise UserInputError(f"{source}: unknown setting {prefix + name!r}; valid settings: {', '.join(prefix + f for f in fields)}")
        if entry:
            current = changes.get(name, getattr(obj, name))
            if not isinstance(current, dict):
                raise UserInputError(f"{source}: {prefix + name} is not a mapping, so {prefix + key!r} cannot be set")
            changes[name] = _set_entry(dict(current), entry, value, f"{source}: {prefix + name}")
        else:
            changes[name] = _coerce(f"{source}: {prefix + name}", value, hints[name])
    return dataclasses.replace(obj, **changes)


def _set_entry(mapping: dict[str, Any], dotted: str, value: Any, owner: str) -> dict[str, Any]:
    """``mapping`` (the setting ``owner``, e.g. ``"config: model.kwargs"``) with ``dotted`` set."""
    head, _, rest = dotted.partition(".")
    if rest:
        current = mapping.get(head) or {}
        if not isinstance(current, dict):
            raise UserInputError(f"{owner}.{head} is {current!r}, not a mapping, so {owner.rpartition(': ')[2]}.{dotted} "
                                 f"cannot be set")
        value = _set_entry(dict(current), rest, value, f"{owner}.{head}")
    mapping[head] = value
    return mapping


def apply_overrides(config: C, values: Mapping[str, Any], source: str = "config") -> C:
    """A copy of ``config`` with ``values`` set (see the module docstring for the keys).

    ``values`` may be nested like a YAML file (``{"run": {"epochs": 5}}``) or flat with
    dotted keys (``{"run.epochs": 5, "epochs": 5}``). Unknown keys are an error naming the
    valid ones (a typo must not be ignored silently). Configurations without sections
    (plain dataclasses) take ``field`` and ``field.entry`` keys.
    """
    if not _is_sectioned(config):
        return _set_fields(config, values, "", source)
    hints = _hints(type(config))
    per_section: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        if key in hints and not dataclasses.is_dataclass(hints[key]):
            top[key] = value  # a plain top-level field (``task``)
            continue
        if key in hints and isinstance(value, dict):  # a YAML section
            for sub, v in value.items():
                section, name, rest = resolve_key(type(config), f"{key}.{sub}", source)
                per_section.setdefault(section, {})[".".join(filter(None, (name, rest)))] = v
            continue
        if key in hints:  # a bare value for a section: its shorthand field
            shorthand = getattr(hints[key], "shorthand", None)
            if shorthand is None:
                raise UserInputError(f"{source}: {key} is a section and takes a mapping, got {value!r}")
            per_section.setdefault(key, {})[shorthand] = value
            continue
        section, name, rest = resolve_key(type(config), key, source)
        per_section.setdefault(section, {})[".".join(filter(None, (name, rest)))] = value
    for setting in replaced_alternatives(type(config), per_section, source):  # to its unset value
        section, name = setting.split(".")
        unset = {f.name: f.default for f in dataclasses.fields(getattr(config, section))}[name]
        per_section.setdefault(section, {})[name] = unset
    changes: dict[str, Any] = {
        name: _coerce(f"{source}: {name}", value, hints[name]) for name, value in top.items()
    }
    for section, section_values in per_section.items():
        changes[section] = _set_fields(getattr(config, section), section_values, f"{section}.", source)
    return dataclasses.replace(config, **changes)


def replaced_alternatives(config_cls: type, per_section: Mapping[str, Mapping[str, Any]], source: str) -> list[str]:
    """The ``section.field`` settings of ``config_cls``'s :attr:`~EngineConfig.alternatives`
    that one layer (``{section: {field: value}}``, from ``source``) replaces in the layers below
    it: those whose partner it sets to a value (not 0 or null) while leaving them alone. A layer
    setting both to values is an error naming it. So are those of its
    :attr:`~EngineConfig.covers` whose covering setting it sets while leaving them alone."""
    replaced = [other for covering, others in getattr(config_cls, "covers", ()) if _layer_value(per_section, covering)
                for other in others if not _layer_sets(per_section, other)]
    for pair in getattr(config_cls, "alternatives", ()):
        for chosen, other in (pair, pair[::-1]):
            chosen_section, chosen_name = chosen.split(".")
            other_section, other_name = other.split(".")
            layer_other = per_section.get(other_section, {})
            value = per_section.get(chosen_section, {}).get(chosen_name)
            if value and layer_other.get(other_name):
                reason = ALTERNATIVE_REASONS.get(pair, f"set exactly one of {pair[0]} and {pair[1]}")
                raise UserInputError(f"{source}: {chosen} and {other} are both set ({chosen_name}={value}, "
                                     f"{other_name}={layer_other[other_name]}): {reason}")
            if value and other_name not in layer_other:
                replaced.append(other)
    return replaced


# settings counted in the run's unit, epochs or iterations (0 and [] count nothing)
RUN_UNIT_SETTINGS = ("run.eval_every", "run.checkpoint_every", "schedule.milestones")


def _run_unit(settings: Mapping[str, Any]) -> str | None:
    """The unit a layer's flat ``section.field`` settings choose for the run, if they choose one."""
    if settings.get("run.iterations"):
        return "iterations"
    return "epochs" if settings.get("run.epochs") else None


def check_run_unit_kept(config_cls: type, layers: Iterable[tuple[Mapping[str, Any], str]]) -> None:
    """Refuse a layer that changes the run's unit (``--iterations 1000`` over a recipe's
    ``epochs: 12``) without restating what the settings below it count in the old unit: the
    recipe's ``milestones: [8, 11]`` would cut the rate at updates 8 and 11, its
    ``checkpoint_every: 1`` write a checkpoint after every update, and segmentation's default
    ``eval_every: 16000`` under ``epochs: 2`` never evaluate.

    ``layers``: flat ``section.field`` settings, lowest first, over ``config_cls``'s defaults
    (a task's own defaults count as a layer where they differ from the engine's)."""
    defaults, engine = config_cls(), EngineConfig()
    if not isinstance(defaults, EngineConfig):
        return
    unit = defaults.run.unit + "s" if defaults.run.length else None
    counted: dict[str, tuple[Any, str]] = {}  # setting -> (value, the layer that gave it)
    for setting in RUN_UNIT_SETTINGS:
        value = _setting_value(defaults, setting)
        if value != _setting_value(engine, setting):
            counted[setting] = (value, f"the {defaults.task} defaults")
    for settings, source in layers:
        new_unit = _run_unit(settings)
        if unit and new_unit and new_unit != unit:
            stale = {s: counted[s] for s in RUN_UNIT_SETTINGS if s in counted and s not in settings and counted[s][0]}
            if stale:
                listed = ", ".join(f"{s}={_shown(value)}" for s, (value, _) in stale.items())
                origins = "; ".join(dict.fromkeys(origin for _, origin in stale.values()))
                raise UserInputError(
                    f"{source}: run.{new_unit} replaces run.{unit}, but {listed} (from {origins}) "
                    f"count{'s' if len(stale) == 1 else ''} {unit}: set {'it' if len(stale) == 1 else 'them'} in "
                    f"{new_unit} too ({' '.join(f'{s}=...' for s in stale)}), or keep run.{unit}")
        unit = new_unit or unit
        counted.update({s: (settings[s], Path(source).name) for s in RUN_UNIT_SETTINGS if s in settings})


def _setting_value(config: Any, setting: str) -> Any:
    section, name = setting.split(".")
    return getattr(getattr(config, section), name)


def _shown(value: Any) -> str:
    """A setting's value as a user writes it (a tuple default as a YAML list, None as null)."""
    if value is None:
        return "null"
    return str(list(value)) if isinstance(value, (tuple, list)) else str(value)


def _layer_value(per_section: Mapping[str, Mapping[str, Any]], setting: str) -> Any:
    section, name = setting.split(".")
    return per_section.get(section, {}).get(name)


def _layer_sets(per_section: Mapping[str, Mapping[str, Any]], setting: str) -> bool:
    section, name = setting.split(".")
    return name in per_section.get(section, {})


def _with_paths(config: C, change: Callable[[str], str]) -> C:
    """``config`` with ``change`` applied to the files and folders its sections read (each
    section's ``path_fields``)."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        values = {name: getattr(section, name) for name in getattr(section, "path_fields", ())}
        # a field that may hold a path or the values themselves (data.classes: a file or the names) keeps the values
        changed = {name: change(v) for name, v in values.items() if isinstance(v, str)}
        if changed:
            changes[f.name] = dataclasses.replace(section, **changed)
    return dataclasses.replace(config, **changes)


def with_absolute_paths(config: C) -> C:
    """``config`` with the files and folders its sections read made absolute from the current
    directory (``~`` the home folder): a checkpoint records the config, and its ``evaluate``
    must find the same data from any directory."""
    return _with_paths(config, lambda path: os.path.abspath(os.path.expanduser(path)))


def with_home_expanded(config: C) -> C:
    """``config`` with ``~`` in the files and folders its sections read made the home folder,
    as training reads them: no shell expands it in ``data.val_ann=~/...``."""
    return _with_paths(config, os.path.expanduser)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A (sectioned) dataclass as plain YAML/JSON/weights-only-safe values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def _flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(recorded: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The settings in which two :func:`config_to_dict` results differ, as ``"key VALUE (was OLD)"``.

    Keys under any of the ``ignore`` prefixes are left out (where a run writes, how many workers).
    """
    old, new = _flat(recorded), _flat(current)
    ignored = tuple(ignore)
    changed = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(ignored) or old.get(key) == new.get(key):
            continue
        changed.append(f"{key} {new.get(key, 'unset')} (was {old.get(key, 'unset')})")
    return changed


def build_config(config_cls: type[C], *layers: tuple[Mapping[str, Any], str]) -> C:
    """``config_cls()`` with each ``(values, source)`` layer applied in order, then validated."""
    result = config_cls()
    for values, source in layers:
        result = apply_overrides(result, values, source=source)
    return result.validate() if hasattr(result, "validate") else result
