"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import functools
import sys
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from ..errors import UserInputError


def head_classes(verb: str, model_classes: int | None, data_classes: Callable[[], int | None], assumed: int,
                 whose: str) -> int:
    """The class count training would build a dense model's heads for: ``model_classes``
    (``model.num_classes``), else the data's as ``data_classes()`` finds it without opening an
    image, else ``assumed`` (``whose``: the data set it is the count of), said on stderr."""
    count = model_classes or data_classes()
    if count is None:
        print(f"crossformer {verb}: model.num_classes is null (the data's class count) and the config names no data "
              f"found on this machine, so the heads are counted for {assumed} classes ({whose}); pass model.num_classes=N",
              file=sys.stderr)
    return count or assumed


def _models_taken(any_timm_model: bool) -> str:
    return "crossformer_tiny ... crossformer_pp_huge" + (", or any timm model" if any_timm_model else "")


def add_model_argument(parser: argparse.ArgumentParser, any_timm_model: bool = True) -> None:
    """``--model``: optional to argparse, since ``--config`` (or a checkpoint) may name the model;
    a command that needs it reads it with :func:`model_name`. ``any_timm_model``: the command
    takes other timm models too (benchmark), not only the CrossFormers (flops, export)."""
    parser.add_argument("--model", metavar="NAME", help=f"a registered variant ({_models_taken(any_timm_model)})")


def model_name(args: argparse.Namespace, any_timm_model: bool = True) -> str:
    """``--model``, which a command given no ``--config`` needs; a one-line error without it."""
    if not args.model:
        raise UserInputError(f"give --model NAME ({_models_taken(any_timm_model)}) or --config NAME_OR_FILE")
    return args.model


def result_printer(as_json: bool, record: Callable[[Any], dict[str, Any]],
                   line: Callable[[Any], str]) -> Callable[[Any], None]:
    """The predict commands' output: each result as one line on stdout as it comes (flushed, so
    that a long folder shows its progress), its ``record`` as JSON with ``--json``, else ``line``."""
    import json

    def say(result: Any) -> None:
        print(json.dumps(record(result)) if as_json else line(result), flush=True)

    return say


def shown_path(path: Any) -> str:
    """A file name as a line of text shows it: as it is, or quoted with its escapes where it holds
    a control character (a newline in a name split a result's line in two)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def note_on_stderr(message: str) -> None:
    """A predict command's note (a file skipped, a format left out): on stderr, so that stdout
    holds the results alone (``--json``)."""
    print(f"crossformer predict: {message}", file=sys.stderr, flush=True)


def benchmark_log(args: argparse.Namespace) -> Callable[[str], None] | None:
    """Where a benchmark's progress lines go: stderr, or nowhere under ``--json`` (stdout holds the JSON)."""
    return None if args.json else functools.partial(print, file=sys.stderr, flush=True)


def class_count(text: str) -> int:
    """``--num-classes``'s type: a whole number, 0 or more (0: no classifier, pooled features)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_img_size_argument(parser: argparse.ArgumentParser, default: int | None, default_help: str,
                          purpose: str = "input size") -> None:
    """``--img-size N`` or ``H W``, ``default`` where not given (None: the command decides);
    ``default_help``: what the help says the default is."""
    parser.add_argument(
        "--img-size", type=int, nargs="+", default=None if default is None else [default],
        metavar="N", help=f"{purpose}: N (square) or H W (default {default_help})",
    )


def img_size(args: argparse.Namespace, default: int | Sequence[int] = 224) -> tuple[int, int]:
    """``--img-size`` as ``(height, width)``, at least the model's minimum input size.

    ``default`` (N or [H, W], e.g. the size a checkpoint records) applies when the flag is absent.
    """
    from ..pixels import MIN_INPUT_SIZE

    size = args.img_size or ([default] if isinstance(default, int) else list(default))
    if len(size) not in (1, 2):
        raise UserInputError(f"--img-size takes N or H W, got {' '.join(map(str, size))}")
    height, width = (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    if min(height, width) < MIN_INPUT_SIZE:
        raise UserInputError(f"--img-size must be at least {MIN_INPUT_SIZE}, got {height}x{width}")
    return height, width


def given_img_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """``--img-size`` as ``(height, width)`` (checked as :func:`img_size` checks it) where the
    command line gave it, else None: a dense config's flops and benchmark then take their own
    sizes, since the flag's default (224) is a classifier's."""
    return img_size(args) if getattr(args, "img_size_given", False) else None


def add_model_arg_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="a model constructor setting for files that do not record theirs, e.g. embed_dim=32 (repeatable)",
    )


def model_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-arg`` values as keyword arguments (values read as YAML: 32, [2,2,4,2])."""
    from ..engine.config import parse_overrides

    return parse_overrides(args.model_arg)


def refuse_given_flags(args: argparse.Namespace, flags: Sequence[str], reason: str) -> None:
    """One-line error ``"FLAG REASON"`` for the first of ``flags`` (``--num-classes``, ...)
    given on the command line: the shared benchmark / flops / export parser takes flags that a
    dense task's handler does not read, and a flag taken and ignored would change nothing."""
    for flag in flags:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if value is not None and value is not False and value != []:  # given (0 is a value)
            raise UserInputError(f"{flag} {reason}")


# the classifier flags whose like a dense config holds (its model.num_classes, model.backbone)
_CONFIG_DESCRIBES = ("--model", "--num-classes")


def refuse_classifier_flags(args: argparse.Namespace, flags: Sequence[str], kind: str) -> None:
    """:func:`refuse_given_flags` for dense flops and benchmark: the ``kind`` ("detector",
    "segmentor") they measure is the config's; a flag no config setting stands for
    (``--peak``, ``--grad-checkpointing``, ...) is not offered for it."""
    refuse_given_flags(args, [f for f in flags if f in _CONFIG_DESCRIBES],
                       f"is for classifiers; a {kind}'s config describes it: change the config with "
                       f"KEY=VALUE settings (e.g. model.num_classes=N, model.backbone=NAME)")
    refuse_given_flags(args, [f for f in flags if f not in _CONFIG_DESCRIBES],
                       f"is for classifiers; a {kind} is measured without it")


def backbone_settings(kwargs: Mapping[str, Any]) -> str:
    """`` (key=value, ...)``: a dense model's backbone settings, sorted, without the stochastic
    depth (training only); "" for none."""
    shown = ", ".join(f"{key}={value}" for key, value in sorted(kwargs.items()) if key != "drop_path_rate")
    return f" ({shown})" if shown else ""


# ---------------------------------------------------------------------------- config flags

_CONFIG_DEST = "config:"  # argparse destination prefix of flags derived from configuration fields
CONFIG_CLASS = "config_class"  # where the parsed arguments keep the class those flags came from
_ONE_OR_MANY = "one_or_many"  # the keys whose flag takes one value or several (``N`` or ``H W``; a file or names)


def config_flags(config_cls: type, keys: tuple[str, ...] | None = None,
                 shown_defaults: Mapping[str, str] | None = None, shown_config: Any | None = None,
                 comments: Mapping[str, str] | None = None) -> dict[str, tuple[str, str, Any]]:
    """``--flag`` -> ``(section.field, help, type hint)`` for the fields of a sectioned configuration.

    A field whose name no other section has gets ``--field-name``; others ``--section-field-name``.
    A section's ``shorthand`` field is set by ``--section`` (``--model NAME``, ``--data PATH``).
    Mapping fields and lists of lists have no flag (``KEY=VALUE`` sets them). ``keys`` (sections or
    ``section.field``) limits the flags to those; ``None``: all. ``shown_defaults`` replaces the
    default a flag's help shows (a verb that reads a key's value elsewhere when it is not given);
    ``shown_config`` (a ``config_cls`` instance: the ``--config`` file's settings) supplies the
    other defaults shown, else ``config_cls()``. ``comments`` replaces a key's help (the field's
    comment in the source) where a verb uses it differently from training.
    """
    import typing

    from ..engine.config import leaf_keys

    leaves = leaf_keys(config_cls)
    counts: dict[str, int] = {}
    for _, name in leaves.values():
        counts[name] = counts.get(name, 0) + 1
    hints = typing.get_type_hints(config_cls)
    defaults = shown_config if shown_config is not None else config_cls()
    flags: dict[str, tuple[str, str, Any]] = {}
    for key, (section, name) in leaves.items():
        if keys is not None and section not in keys and key not in keys:
            continue
        section_cls = hints[section]
        hint = typing.get_type_hints(section_cls)[name]
        if typing.get_origin(hint) is dict or hint is dict or _holds_lists(hint):
            continue
        default = getattr(getattr(defaults, section), name)
        if isinstance(default, tuple):
            default = " ".join(map(str, default)) or "none"
        if getattr(section_cls, "shorthand", None) == name:
            flag = f"--{section}"
        elif counts[name] == 1:
            flag = f"--{name.replace('_', '-')}"
        else:
            flag = f"--{section}-{name.replace('_', '-')}"
        comment = (comments or {}).get(key) or _field_comments(section_cls).get(name)
        # an unset text or path says nothing as "(default None)"; the comment says what unset means
        shown = "" if default is None or default == "" else f" (default {default})"
        if shown_defaults and key in shown_defaults:
            shown = f" (default: {shown_defaults[key]})"
        flags[flag] = (key, f"{key}{': ' + comment if comment else ''}{shown}", hint)
    return flags


def _holds_lists(hint: Any) -> bool:
    """Whether a field's values are lists of lists (``data.palette``: one [R, G, B] per class),
    which a flag's space-separated words cannot spell: ``KEY=[[...], ...]`` sets them."""
    import typing

    options = typing.get_args(hint) if typing.get_origin(hint) is not tuple else (hint,)
    return any(typing.get_origin(o) is tuple and any(typing.get_origin(i) is tuple for i in typing.get_args(o))
               for o in options)


@functools.cache  # inspect.getsource parses the class's whole module: once per class, not per field and parse
def _field_comments(section_cls: type) -> Mapping[str, str]:
    """The comment after each field of a section's source (``name: int = 1  # what it is``)."""
    import inspect
    import re

    try:
        source = inspect.getsource(section_cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE)
    return MappingProxyType({name: comment.strip().replace("%", "%%") for name, comment in found})


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, keys: tuple[str, ...] | None = None,
                         shown_defaults: Mapping[str, str] | None = None, shown_config: Any | None = None,
                         comments: Mapping[str, str] | None = None) -> None:
    """Flags for the configuration's fields (see :func:`config_flags`); unset flags change nothing."""
    import typing
    from types import UnionType

    found = config_flags(config_cls, keys, shown_defaults, shown_config, comments)
    one_or_many = set()
    for flag, (key, help_text, hint) in found.items():
        metavar = key.rsplit(".", 1)[1].upper()
        kwargs: dict[str, Any] = dict(dest=_CONFIG_DEST + key, default=argparse.SUPPRESS, help=help_text, metavar=metavar)
        options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, UnionType) else [hint]
        base = options[0]
        scalar = _scalar_or_its_tuple(options)
        if scalar is not None:  # img_size: N or H W; data.classes: a file or the names
            kwargs.update(type=scalar, nargs="+", metavar="N" if scalar is int else metavar)
            one_or_many.add(key)
        elif base is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
            kwargs.pop("metavar")
        elif typing.get_origin(base) is typing.Literal:
            kwargs.update(choices=typing.get_args(base))
            kwargs.pop("metavar")
        elif typing.get_origin(base) is tuple:
            args = typing.get_args(base)
            item = args[0] if args else str
            kwargs.update(type=item if item in (int, float) else str,
                          nargs="+" if len(args) != 2 or args[1] is Ellipsis else len(args))
        elif base in (int, float, str):
            nullable = type(None) in typing.get_args(hint)  # X | None: "null" gives None
            kwargs.update(type=_or_null(base) if nullable else base)
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(**{CONFIG_CLASS: config_cls, _ONE_OR_MANY: frozenset(one_or_many)})
    _explain_model_flag(parser, found)


@functools.cache
def _or_null(kind: type) -> Callable[[str], Any]:
    """An argparse type for a setting that may be null: ``null`` or ``none`` (as its help says,
    and as YAML reads ``KEY=null``) is None, anything else ``kind(text)``."""
    def convert(text: str) -> Any:
        return None if text.strip().lower() in ("null", "none") else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def _scalar_or_its_tuple(options: list[Any]) -> type | None:
    """``X`` where a field's (non-null) types are ``X`` and a tuple of ``X`` (``int | tuple[int, int]``,
    ``str | tuple[str, ...]``), else None."""
    import typing

    if len(options) != 2:
        return None
    tuples = [o for o in options if typing.get_origin(o) is tuple]
    scalars = [o for o in options if o in (int, float, str)]
    if len(tuples) != 1 or len(scalars) != 1:
        return None
    items = {a for a in typing.get_args(tuples[0]) if a is not Ellipsis}
    return scalars[0] if items == {scalars[0]} else None


def _explain_model_flag(parser: argparse.ArgumentParser, found: Mapping[str, tuple[str, str, Any]]) -> None:
    """A hidden ``--model`` for a config whose model section has no shorthand (detection,
    segmentation; ``found``: its flags, :func:`config_flags`), where argparse would call
    ``--model`` unknown or an abbreviation of ``--model-ema``. It keeps what sets the task's
    model, for :func:`refuse_classification_model` to say before parsing."""
    flags = {key: flag for flag, (key, _, _) in found.items()}
    if "--model" in flags.values() or not any(key.startswith("model.") for key in flags):
        return
    named = [flags[key] for key in ("model.kind", "model.backbone") if key in flags]
    parser.add_argument("--model", nargs="?", dest=_REFUSED_MODEL, const=" and ".join(named) or "model.KEY=VALUE",
                        help=argparse.SUPPRESS)


_REFUSED_MODEL = "refused_model"  # the hidden --model of a dense command (:func:`_explain_model_flag`)


def refuse_classification_model(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A one-line error for ``--model`` in a detection or segmentation command's ``argv``
    (``parser``: the command's), naming where the task came from (``--config`` or our
    ``--checkpoint``) and what to do instead."""
    refused = [action for action in parser._actions if action.dest == _REFUSED_MODEL]
    if not refused or not any(arg == "--model" or arg.startswith("--model=") for arg in argv):
        return
    set_by, task = refused[0].const, parser.get_default(CONFIG_CLASS)().task
    config, checkpoint = _flag_value(argv, "--config"), _flag_value(argv, "--checkpoint")
    if config is None and checkpoint is not None:
        raise UserInputError(f"--model names a classification model, but {checkpoint} holds a {task} model (the "
                             f"task comes from the checkpoint): leave out --model (the checkpoint records its "
                             f"model), or pass a classification checkpoint")
    raise UserInputError(f"--model names a classification model, but {config} is a {task} config: its model is set "
                         f"by {set_by} (see --help)")


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration settings given as flags: ``{"section.field": value}``."""
    values: dict[str, Any] = {}
    one_or_many = getattr(args, _ONE_OR_MANY, frozenset())
    for dest, value in vars(args).items():
        if dest.startswith(_CONFIG_DEST):
            key = dest[len(_CONFIG_DEST):]
            if isinstance(value, list) and key in one_or_many:
                if key.endswith("img_size") and len(value) not in (1, 2):
                    raise UserInputError(f"--img-size takes N or H W, got {' '.join(map(str, value))}")
                value = value[0] if len(value) == 1 else value
            values[key] = value
    return values


def command_line_settings(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """``{"section.field": value}`` from the ``KEY=VALUE`` ``overrides`` and the flags given.

    A field set both ways is refused (one line): which of the two was meant is a guess, and
    the one not taken would go unchecked."""
    from ..engine.config import parse_overrides

    flags = config_values(args)
    config_cls = getattr(args, CONFIG_CLASS, None)
    if flags and config_cls is not None:
        _refuse_set_twice(config_cls, overrides, flags)
    return {**parse_overrides(overrides), **flags}


def _refuse_set_twice(config_cls: type, overrides: list[str], flags: Mapping[str, Any]) -> None:
    """A one-line error for a ``KEY=VALUE`` in ``overrides`` whose field a flag in ``flags``
    (``{"section.field": value}``) sets too, bare names and shorthands resolved as the config does."""
    from ..engine.config import parse_overrides
    from ..engine.registry import flatten_settings

    for item in overrides:
        for key in flatten_settings(config_cls, parse_overrides([item]), "overrides"):
            if key in flags:
                raise UserInputError(f"{key} is set twice, by {_flag_names(config_cls).get(key, key)} and by {item}: "
                                     "give it once")


def _flag_names(config_cls: type) -> dict[str, str]:
    """``{"section.field": "--flag"}`` for the configuration's flags (:func:`config_flags`)."""
    return {key: flag for flag, (key, _, _) in config_flags(config_cls).items()}


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``argv``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
    return value


def task_flags_source(argv: list[str]) -> str:
    """`` --config NAME`` or `` --checkpoint FILE`` where ``argv`` gives the one that chooses its
    task's flags (:func:`config_task`), else ``""``: a help that lists those flags needs it too."""
    for flag in ("--config", "--checkpoint"):
        value = _flag_value(argv, flag)
        if value is not None:
            import shlex

            return f" {flag} {shlex.quote(value)}"
    return ""


def config_task(argv: list[str]) -> str:
    """The task of the ``--config`` named in ``argv`` (read before the full parser exists,
    since the flags depend on the task), else the task our ``--checkpoint`` records, else
    the default task."""
    from ..engine.config import load_yaml
    from ..engine.registry import DEFAULT_TASK, TASKS, find_config

    name = _flag_value(argv, "--config")
    if name is None:
        return _recorded_task(argv) or DEFAULT_TASK
    path = find_config(name)
    task = load_yaml(path).get("task") or (path.parent.name if path.parent.name in TASKS else DEFAULT_TASK)
    if task not in TASKS:
        raise UserInputError(f"{path}: unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return task


def _recorded_task(argv: list[str]) -> str | None:
    """The task the ``--checkpoint`` in ``argv`` records (ours do), if any."""
    from ..engine.registry import TASKS

    checkpoint = _flag_value(argv, "--checkpoint")
    if checkpoint is None:
        return None
    from ..checkpoint_files import peek_checkpoint

    task = peek_checkpoint(checkpoint).get("task")
    return task if task in TASKS else None


def default_task_chosen(argv: list[str]) -> bool:
    """Whether ``argv``'s task is the default one for want of a ``--config`` or a checkpoint that
    records its task (the authors' files record none)."""
    return _flag_value(argv, "--config") is None and _recorded_task(argv) is None


def missing_task_checkpoint(argv: list[str]) -> str | None:
    """Why the ``--checkpoint`` that ``argv``'s task (and so its flags) was to come from, no
    ``--config`` naming one, cannot be read: not there, a folder, or no checkpoint (a TorchScript
    or ONNX export, text ...); None otherwise."""
    from ..checkpoint_files import readable_checkpoint

    checkpoint = _flag_value(argv, "--checkpoint")
    if checkpoint is None or _flag_value(argv, "--config") is not None:
        return None
    try:
        readable_checkpoint(checkpoint)
    except UserInputError as err:
        return str(err)
    return None


def help_config(argv: list[str], task: str) -> Any | None:
    """With ``--help``: the settings of the config the command would read (``--config``, for
    ``train`` the task's default one, e.g. the ``--model``'s bundled recipe, or the one a dense
    ``--checkpoint`` of ours was trained with) over the task's defaults, for the help to show
    as the flags' defaults. Not validated: a file that needs a flag to be complete still shows.
    ``None`` without such a config, or when it cannot be read as the task's config (the command
    itself then says what is wrong)."""
    if not any(arg in ("-h", "--help") for arg in argv):
        return None
    from ..engine.config import apply_overrides, load_yaml_layers
    from ..engine.registry import config_module, file_settings, find_config

    module = config_module(task)
    name = _flag_value(argv, "--config")
    if name is None and argv and argv[0] == "train" and hasattr(module, "default_config"):
        model = _flag_value(argv, "--model")
        name = module.default_config({"model.name": model} if model else {})
    checkpoint = _flag_value(argv, "--checkpoint")
    try:
        if name is None and checkpoint is not None:
            recorded, source = recorded_config(checkpoint)
            return None if recorded is None else apply_overrides(module.CONFIG(), recorded, source=source)
        if name is None:
            return None
        path = find_config(name)
        return apply_overrides(module.CONFIG(), file_settings(module.CONFIG, load_yaml_layers(path)), source=str(path))
    except UserInputError:
        return None


def add_config_argument(parser: argparse.ArgumentParser, default_help: str = "") -> None:
    parser.add_argument(
        "--config", metavar="NAME_OR_FILE",
        help="YAML settings (its task: classification, detection or segmentation), or a bundled config's name"
        + default_help,
    )


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``KEY=VALUE`` items (not existing files) apart from the other positional arguments."""
    import os
    import re

    pattern = re.compile(r"^[A-Za-z_][\w.]*=")
    overrides = [i for i in items if pattern.match(i) and not os.path.exists(i)]
    return [i for i in items if i not in overrides], overrides


# the help of keys that evaluate and predict read otherwise than training does
_INFERENCE_COMMENTS = {"run.batch_size": "images per forward pass, per process"}


def add_task_verb(parser: argparse.ArgumentParser, task: str, verb: str, shown_config: Any | None = None) -> None:
    """``--config``, the task's handler flags for ``verb`` and the configuration flags it reads
    (their help showing ``shown_config``'s values, see :func:`help_config`)."""
    from ..engine.registry import config_module, task_commands

    module = config_module(task)
    add_config_argument(parser, " (default with our --checkpoint: the task, and for detection and segmentation "
                                "the config, it was trained with)")
    handler = task_commands(module).get(verb)
    if handler is None:  # said when the command runs: building the parser must not fail for other verbs
        return
    handler.add_arguments(parser)
    add_config_arguments(parser, module.CONFIG, handler.config_keys, handler.shown_defaults, shown_config,
                         _INFERENCE_COMMENTS)


def recorded_config(checkpoint: str) -> tuple[dict[str, Any] | None, str | None]:
    """The configuration a detection or segmentation checkpoint of ours was trained with, and
    how errors name it; ``(None, None)`` for other files (a classification checkpoint
    describes its model itself; the authors' files need ``--config``)."""
    from ..engine.registry import DEFAULT_TASK
    from ..checkpoint_files import peek_checkpoint

    entries = peek_checkpoint(checkpoint)
    task = entries.get("task")
    if task in (None, DEFAULT_TASK):
        return None, None
    recorded = entries.get("config")
    if not isinstance(recorded, dict):  # e.g. weights written elsewhere with our description
        raise UserInputError(f"{checkpoint} holds a {task} model but not the config it was trained with: "
                             "pass that config with --config NAME_OR_FILE")
    from ..engine.config import fold_recorded_drop_path

    return fold_recorded_drop_path(recorded), f"{checkpoint} (the config it was trained with)"


def _check_checkpoint_task(checkpoint: str | None, task: str, config: str | None) -> None:
    """A checkpoint of ours records its task: one of another task than the config's is refused
    here, before a task's loader reads it as its own (and blames missing heads or classes)."""
    from ..checkpoint_files import peek_checkpoint

    recorded = peek_checkpoint(checkpoint).get("task") if checkpoint else None
    if isinstance(recorded, str) and recorded != task:
        raise UserInputError(f"{checkpoint} holds a {recorded} model, but {config} is a {task} config: pass a {task} "
                             f"checkpoint, or leave out --config (our checkpoints record the config they were trained with)")


def _check_recorded_paths(config: Any, keys: Sequence[str] | None, settings: Mapping[str, Any], checkpoint: str) -> None:
    """A one-line error for a file or folder the verb reads (``keys``: its config keys, None:
    all) that came from ``checkpoint``'s recorded config, not from the command line
    (``settings``), and is not on this machine: say where it came from and the flag to give."""
    import dataclasses
    from pathlib import Path

    from ..engine.registry import flatten_settings

    given = flatten_settings(type(config), settings, "overrides")
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        for name in getattr(section, "path_fields", ()):
            key, value = f"{f.name}.{name}", getattr(section, name)
            read = keys is None or key in keys or f.name in keys
            if read and key not in given and isinstance(value, str) and not Path(value).exists():
                raise recorded_path_gone(key, value, checkpoint, _flag_names(type(config)).get(key))


def recorded_path_gone(key: str, value: str, checkpoint: str, flag: str | None) -> UserInputError:
    """The error for a file or folder (config ``key``, given on the command line by ``flag``)
    that ``checkpoint``'s recorded config names and that is not on this machine."""
    return UserInputError(f"{key} {value} is not on this machine; it came from {checkpoint} (the config it was "
                          f"trained with): pass {f'{flag} PATH' if flag else f'{key}=PATH'}")


# verbs that run or measure a model, none of them training: a training-only setting on their
# command line is a mistake (benchmark is not one: it times training steps)
_MODEL_VERBS = ("evaluate", "predict", "flops", "export")


def _refuse_training_settings(config_cls: type, settings: Mapping[str, Any], verb: str) -> None:
    """A one-line error for a setting in ``settings`` (the command line's) that only training
    reads (the config's ``training_only``), or only predict (``predict_only``) where ``verb`` is
    another: taken, it would change nothing, without a word."""
    from ..engine.registry import flatten_settings

    for item, value in settings.items():
        try:
            keys = flatten_settings(config_cls, {item: value}, "overrides")
        except UserInputError:  # a misspelt key: the config's resolution names it
            continue
        for key in keys:
            if key in config_cls.training_only or key.split(".")[0] in config_cls.training_only:
                hint = f" (--ema {verb}s with a checkpoint's EMA weights)" if key == "run.model_ema" else ""
                raise UserInputError(f"{key} is a training setting, which {verb} does not read: leave it out{hint}")
            if key in config_cls.predict_only and verb != "predict":
                raise UserInputError(f"{key} is a predict setting (what it draws), which {verb} does not read: "
                                     f"leave it out")


def run_task_verb(args: argparse.Namespace, verb: str, overrides: list[str]) -> int:
    """Resolve the configuration (file, flags, ``overrides``) and run the task's ``verb`` handler."""
    from ..engine.config import with_home_expanded
    from ..engine.registry import resolve_config, task_commands

    config, source = args.config, None
    if config is None and getattr(args, "checkpoint", None):
        config, source = recorded_config(args.checkpoint)
    settings = command_line_settings(args, overrides)
    # before the config is checked where the flags' config class is known: a training setting's
    # own checks (schedule.name=step needs milestones) asked for more of what was then refused
    refused_early = verb in _MODEL_VERBS and getattr(args, CONFIG_CLASS, None) is not None
    if refused_early:
        _refuse_training_settings(getattr(args, CONFIG_CLASS), settings, verb)
    resolved = resolve_config(config, settings, use_default=False, source=source)
    resolved_config = with_home_expanded(resolved.config)
    if verb in _MODEL_VERBS and not refused_early:  # flops: no config flags
        _refuse_training_settings(type(resolved_config), settings, verb)
    _check_checkpoint_task(getattr(args, "checkpoint", None), resolved_config.task, args.config)
    handler = task_commands(resolved.module).get(verb)
    if handler is None:
        raise UserInputError(f"the {resolved_config.task} task has no {verb} command yet")
    if source is not None:
        _check_recorded_paths(resolved_config, handler.config_keys, settings, args.checkpoint)
    from ..engine import set_cpu_threads  # torch: once the config is known to be right

    set_cpu_threads(resolved_config.run.cpu_threads)  # as in training (one thread is much faster on a busy CPU)
    from ..engine.seeding import deterministic_kernels

    # run.deterministic: the same kernels, nothing timed (a bf16 evaluate's mIoU moved from run to run)
    with deterministic_kernels(resolved_config.run.deterministic):
        return handler.run(args, resolved_config, resolved.given)
