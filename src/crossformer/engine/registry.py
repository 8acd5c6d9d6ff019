"""Where each task's implementation lives, and resolving ``--config NAME_OR_FILE`` to a task.

A task plugs in with one module and one entry in :data:`TASKS`. The module
(``crossformer.<task>.task``) exposes:

- ``CONFIG``: its configuration class (a subclass of :class:`~crossformer.engine.config.EngineConfig`
  whose ``task`` default is the task's name);
- ``TASK``: its :class:`~crossformer.engine.task.Task` class (``TASK(config, ctx)``);
- optionally ``default_config(values) -> str | None``: the bundled config to start from when
  none is named (``values``: the settings given on the command line);
- optionally ``check_train_command(config, given)``: a one-line ``UserInputError`` for a
  ``crossformer train`` command line whose settings are valid but would not do what was meant
  (``given``: the settings the file and the command line set).

``CONFIG`` and ``default_config`` may live in a module that imports less, named in
:data:`CONFIG_MODULES` (:func:`config_module`): the command line reads its flags from it.

The verbs beyond ``train`` it supports (``evaluate``, ``predict``, ``benchmark``, ``flops``, ``export``)
are the ``COMMANDS`` (``{verb: VerbHandler}``) of the ``commands`` module beside it
(``crossformer.<task>.commands``), which :func:`task_commands` imports only when a verb needs
them: importing a task does not import the command-line helpers.

Bundled configs live in ``crossformer/configs/<task>/<name>.yaml``; a file names its task
with ``task:`` (bundled files may leave it to their folder).
"""

from __future__ import annotations

import argparse
import importlib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from ..errors import UserInputError, did_you_mean
from .config import (build_config, check_run_unit_kept, load_yaml_layers, merged_settings, refuse_unread_settings,
                     replaced_alternatives, resolve_key)

__all__ = [
    "TASKS", "DEFAULT_TASK", "CONFIG_MODULES", "VerbHandler", "ResolvedConfig", "task_module", "config_module",
    "task_commands", "bundled_configs",
    "find_config", "resolve_config", "flatten_settings",
]

# task name -> module exposing CONFIG, TASK
TASKS: dict[str, str] = {
    "classification": "crossformer.classification.task",
    "detection": "crossformer.detection.task",
    "segmentation": "crossformer.segmentation.task",
}
DEFAULT_TASK = "classification"  # configs and commands that name no task
# task name -> a module with its CONFIG (and default_config, if any) that imports less than the
# task's module: the command line builds its flags and help from it without the training code
# (torch: seconds to import). A task not listed: its task module.
CONFIG_MODULES: dict[str, str] = {
    "classification": "crossformer.classification.config",
    "detection": "crossformer.detection.config",
    "segmentation": "crossformer.segmentation.config",
}


def no_arguments(parser: argparse.ArgumentParser) -> None:
    """A verb's ``add_arguments`` where the task adds no flags of its own (flops, benchmark and
    export keep their shared flags; the config supplies the rest)."""


@dataclass(frozen=True)
class VerbHandler:
    """A task's implementation of one command-line verb.

    ``add_arguments(parser)`` adds the verb's own flags (``--checkpoint``, ``--json``...);
    the command adds flags for the configuration keys named by ``config_keys`` (sections
    or ``section.field``; ``None``: all). ``run(args, config, given)`` does the job:
    ``config`` is the resolved configuration, ``given`` the keys set explicitly (by the file
    or the command line) as ``{"section.field": value}``.
    """

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Any, dict[str, Any]], int]
    config_keys: tuple[str, ...] | None = None
    # what the verb uses for a configuration key that is not given, where that is not the
    # configuration's default (help text, e.g. {"data.img_size": "the checkpoint's"})
    shown_defaults: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedConfig:
    config: Any  # the task's configuration, validated
    module: ModuleType  # the task's module (CONFIG, TASK)
    given: dict[str, Any]  # settings set by the file and the overrides, as section.field keys
    path: Path | None  # the YAML file read, if any


def task_module(name: str) -> ModuleType:
    """The implementation module of task ``name``; a one-line error for unknown tasks."""
    return _import_task_part(name, TASKS)


def config_module(name: str) -> ModuleType:
    """The module with task ``name``'s ``CONFIG`` and optional ``default_config``
    (:data:`CONFIG_MODULES`, else its task module); a one-line error for unknown tasks."""
    return _import_task_part(name, CONFIG_MODULES if name in CONFIG_MODULES else TASKS)


def _import_task_part(name: str, modules: Mapping[str, str]) -> ModuleType:
    """``modules[name]`` (task name -> module) imported; one-line errors for an unknown task and
    for one whose package is missing from this installation."""
    if name not in TASKS:
        raise UserInputError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    try:
        return importlib.import_module(modules[name])
    except ModuleNotFoundError as err:
        if err.name and modules[name].startswith(err.name):
            raise UserInputError(f"task {name!r} is not available in this installation") from None
        raise


def task_commands(module: ModuleType) -> Mapping[str, VerbHandler]:
    """``{verb: VerbHandler}`` of the task implemented by ``module``: the ``COMMANDS`` of the
    ``commands`` module in its package, imported now; none for a task without one."""
    package = module.__name__.rpartition(".")[0]
    if not package:
        return {}
    name = f"{package}.commands"
    try:
        return importlib.import_module(name).COMMANDS
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        return {}


def bundled_configs(task: str | None = None) -> dict[str, Path]:
    """Configs shipped in ``crossformer/configs/<task>/``: name -> file (every task's by default)."""
    root = resources.files("crossformer") / "configs"
    found: dict[str, Path] = {}
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if folder.is_dir() and (task is None or folder.name == task):
            for item in folder.iterdir():
                if item.name.endswith(".yaml"):
                    found[item.name[: -len(".yaml")]] = Path(str(item))
    return found


def find_config(name_or_path: str) -> Path:
    """A YAML file by path, else a bundled config by name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_configs()
    if name_or_path in bundled:
        return bundled[name_or_path]
    if path.suffix in (".yaml", ".yml"):
        raise UserInputError(f"config file not found: {path}")
    hint = did_you_mean(name_or_path, bundled)
    listing = "; ".join(f"{', '.join(sorted(bundled_configs(task)))} ({task})" for task in TASKS if bundled_configs(task))
    raise UserInputError(f"no config file {name_or_path!r} and no bundled config of that name; {hint}bundled: {listing}")


def flatten_settings(config_cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Nested or dotted settings as ``section.field[.entry]`` keys (resolving bare names and a
    section's bare value to its shorthand field); ``source`` names them in errors, as it does a
    setting given twice under two names (``epochs`` and ``run.epochs``), of which one would be
    silently lost."""
    flat: dict[str, Any] = {}
    named_as: dict[str, str] = {}  # each flat key: the key of ``values`` that set it
    hints = typing.get_type_hints(config_cls)
    for key, value in values.items():
        if key == "task":
            continue
        nested = key in hints and isinstance(value, dict)
        if nested:
            found = flatten_settings(config_cls, {f"{key}.{k}": v for k, v in value.items()}, source)
        elif key in hints:
            shorthand = getattr(hints[key], "shorthand", None)
            if shorthand is None:
                raise UserInputError(f"{source}: {key} is a section and takes a mapping, got {value!r}")
            found = {f"{key}.{shorthand}": value}
        else:
            section, name, rest = resolve_key(config_cls, key, source)
            found = {".".join(filter(None, (section, name, rest))): value}
        for setting in found:
            name = setting if nested else key  # run.epochs / epochs
            if setting in named_as:
                raise UserInputError(f"{source}: {setting} is set twice, as {named_as[setting]} and as {name}: "
                                     "give it once")
            named_as[setting] = name
        flat.update(found)
    return flat


def file_settings(config_cls: type, layers: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The settings of a config file over its ``base`` chain's (``layers``, base first, as
    :func:`~.config.load_yaml_layers` reads them), each
    file a layer over its base as the command line is over the file: every file's settings are
    first put in one form (``{section: {field: value}}``, mappings nested), so that a child's
    ``run: {epochs: 2}`` replaces a base's bare ``epochs: 3``; and a file that sets one of
    ``config_cls``'s :attr:`~.config.EngineConfig.alternatives` and not the other replaces its
    bases' choice of the other (:func:`~.config.replaced_alternatives`; one file setting both is an
    error naming it)."""
    merged: dict[str, Any] = {}
    for values, source in layers:
        layer = _nested_settings(config_cls, values, source)
        for setting in replaced_alternatives(config_cls, layer, source):
            section, name = setting.split(".")
            merged.get(section, {}).pop(name, None)
        merged = merged_settings(merged, layer)
    return merged


def _nested_settings(config_cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` (nested, dotted or bare) as ``{"task": ..., section: {field: value}}``, a
    mapping field's entries nested under it."""
    nested: dict[str, Any] = {"task": values["task"]} if "task" in values else {}
    for key, value in flatten_settings(config_cls, values, source).items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        both_mappings = isinstance(value, dict) and isinstance(node.get(last), dict)
        node[last] = merged_settings(node[last], value) if both_mappings else value
    return nested


def _task_hint(layers: list[tuple[dict[str, Any], str]], assumed: str) -> str:
    """Where a file that names no task (read as ``assumed``'s) holds another task's settings,
    keys and values: the line to add."""
    for other in TASKS:
        if other != assumed:
            config_cls = config_module(other).CONFIG
            try:
                build_config(config_cls, (file_settings(config_cls, layers), "file"))
            except UserInputError:
                continue
            return f" (the file names no task and is read as {assumed}; for {other} settings add 'task: {other}')"
    return ""


def resolve_config(
    config: str | Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None,
    task: str | None = None, use_default: bool = True, source: str | None = None,
    check_given: Callable[[dict[str, Any]], None] | None = None,
) -> ResolvedConfig:
    """Defaults, then a YAML file (a path or a bundled name) or the settings a checkpoint
    recorded (a mapping, named ``source`` in errors), then ``overrides``; validated.
    ``check_given`` sees the settings given (file and overrides, as ``section.field`` keys)
    before validation, which may build the model (torch: seconds).

    The task is the file's ``task:`` (or its bundled folder's name), else ``task``, else
    :data:`DEFAULT_TASK`. With no file named, the task's ``default_config(overrides)`` may
    name one (unless ``use_default`` is false: inference verbs take what the checkpoint says).
    """
    overrides = dict(overrides or {})
    # the config's module (no torch) until the config is valid: a mistake in it is said at once
    module = config_module(task or DEFAULT_TASK)
    if config is None and use_default and hasattr(module, "default_config"):
        config = module.default_config(flatten_settings(module.CONFIG, overrides, "overrides"))
    path, values = None, {}
    if config is not None:
        if isinstance(config, Mapping):
            values, origin, folder = dict(config), source or "recorded settings", None
            named = values.get("task")
        else:
            path = find_config(config)
            layers, origin, folder = load_yaml_layers(path), str(path), path.parent.name
            named = next((layer["task"] for layer, _ in reversed(layers) if "task" in layer), None)  # the child's
        named = named or (folder if folder in TASKS else None) or task or DEFAULT_TASK
        if task is not None and named != task:
            raise UserInputError(f"{origin} is a {named} config, not {task}")
        module = config_module(named)
        source = origin
        if path is not None:
            try:
                values = file_settings(module.CONFIG, layers)
            except UserInputError as err:
                chosen = task is not None or any("task" in layer for layer, _ in layers) or folder in TASKS
                raise UserInputError(str(err) if chosen else f"{err}{_task_hint(layers, named)}") from None
    config_cls = module.CONFIG
    unit_layers = layers if path is not None else [(values, str(source))]
    given_over = flatten_settings(config_cls, overrides, "overrides")
    # each layer's settings, lowest first (the file's base chain, or the recorded ones), then the overrides
    flat_layers = [*((flatten_settings(config_cls, layer, name), name) for layer, name in unit_layers),
                   (given_over, "overrides")]
    check_run_unit_kept(config_cls, flat_layers)
    given = {**flatten_settings(config_cls, values, str(source)), **given_over}
    if check_given is not None:
        check_given(given)
    resolved = build_config(config_cls, (values, str(source)), (overrides, "overrides"))
    refuse_unread_settings(resolved, flat_layers, first_checked=len(unit_layers) if isinstance(config, Mapping) else 0)
    return ResolvedConfig(resolved, task_module(resolved.task), given, path)
