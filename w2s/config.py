"""Typed configs: YAML validated into pydantic models; an unknown field or bad value names the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and field."""


class StrictModel(BaseModel):
    """Base of every config: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def unset(value) -> bool:
    """`exclude_if` of an optional field added to a config: left out of its dump while None, so that the cache
    keys and run folders of configs written before it existed stay valid (w2s.runs.RunDir.claim)."""
    return value is None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (or start from defaults), apply `key.sub=value` overrides, validate.

    Errors name the file and the dotted field, e.g. `configs/x.yaml: train.lr: Input should be > 0`.
    """
    data = read_yaml(path) if path is not None else {}
    return validated(cls, apply_overrides(data, overrides), str(path) if path else "<defaults>")


def read_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """`key.sub=value` overrides (values read as YAML) set in `data`, which is returned."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def validated(cls: type[T], data: dict, source: str) -> T:
    """`data` validated into `cls`, or a ConfigError naming `source` and every wrong field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid config\n  " + "\n  ".join(lines)) from None


def offset_seeds(config: T, offset: int) -> T:
    """A copy of `config` with every `seed` field, at any depth, shifted by `offset`.

    Run seed s of a multi-seed job is its config with offset s: the world, every pretraining and every
    training stage get other seeds together, and offset 0 is the config as written.
    """
    def shift(value: Any) -> Any:
        if isinstance(value, BaseModel):
            update = {name: shift(getattr(value, name)) for name in type(value).model_fields}
            if isinstance(update.get("seed"), int):
                update["seed"] += offset
            return value.model_copy(update=update)
        if isinstance(value, list):
            return [shift(v) for v in value]
        if isinstance(value, dict):
            return {k: shift(v) for k, v in value.items()}
        return value

    return shift(config)
