"""Run configurations: dataclasses filled from YAML files and ``KEY=VALUE`` overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from ..errors import UserInputError

__all__ = ["load_yaml", "parse_overrides", "apply_overrides", "config_to_dict"]

C = TypeVar("C")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file; a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserInputError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{path} must hold a mapping of settings, found {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["epochs=5", "model_kwargs.embed_dim=32"]`` -> ``{"epochs": 5, "model_kwargs.embed_dim": 32}``.

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
        except yaml.YAMLError:
            value = raw
        result[key.strip()] = _number_or_text(value) if isinstance(value, str) else value
    return result


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads ``5e-4`` (no dot) as text; people mean the number."""
    try:
        return float(text)
    except ValueError:
        return text


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the kind of the field's default (None defaults take anything)."""
    if isinstance(value, str) and isinstance(default, float):
        value = _number_or_text(value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserInputError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{name} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{name} must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise UserInputError(f"{name} must be a string, got {value!r}")
    elif isinstance(default, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise UserInputError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    elif isinstance(default, dict) and not isinstance(value, dict):
        raise UserInputError(f"{name} must be a mapping, got {value!r}")
    return value


def apply_overrides(config: C, values: Mapping[str, Any], source: str = "config") -> C:
    """A copy of the dataclass ``config`` with ``values`` set; ``a.b`` sets key ``b`` of dict field ``a``.

    Unknown keys are an error naming the valid ones (a typo must not be ignored silently).
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name, _, subkey = key.partition(".")
        if name not in fields:
            raise UserInputError(f"{source}: unknown setting {name!r}; valid settings: {', '.join(fields)}")
        current = changes.get(name, getattr(config, name))
        if subkey:
            if not isinstance(current, dict):
                raise UserInputError(f"{source}: {name} is not a mapping, so {key!r} cannot be set")
            changes[name] = {**current, subkey: value}
        else:
            changes[name] = _coerce(f"{source}: {name}", value, getattr(config, name))
    return dataclasses.replace(config, **changes)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON/weights-only-safe values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
