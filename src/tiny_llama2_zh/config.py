"""Typed recipe configuration: YAML files and `section.key=value` overrides into nested dataclasses.

Every key must name a dataclass field: a misspelled key is an error with the file and the valid keys, never
silently ignored. Values are checked against the field's type annotation. A stage's `train:` section is checked
the same way against the library's own argument class (`TrainingArguments`, TRL's `SFTConfig`, ...): see
`check_library_options`.
"""

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tiny_llama2_zh.errors import UsageError

T = TypeVar("T")


class ConfigError(UsageError):
    """A configuration file or override that does not match the recipe's options."""


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; YAML 1.2, Python and every user read it as a
    number. This loader resolves such scalars as floats, in files and in `key=value` overrides alike."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9]*[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} is not of type {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_type(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_check_type(k, key_type, where): _check_type(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} options, got {value!r}")
        return from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _unknown_keys_message(where: str, unknown: list[str], valid: list[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=3)
        if close:
            hints.append(f"{key!r}: did you mean {', '.join(close)}?")
    listing = ", ".join(valid) if len(valid) <= 40 else f"{len(valid)} keys; the closest are named above"
    return f"{where}: unknown key(s) {unknown}. " + " ".join(hints) + f" Valid keys: {listing}"


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(_unknown_keys_message(where, unknown, sorted(fields)))
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: required key(s) {missing} are missing")
    checked = {name: _check_type(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**checked)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def parse_override(override: str) -> tuple[list[str], Any]:
    """'train.learning_rate=3e-4' -> (['train', 'learning_rate'], 0.0003). The value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    key, raw = override.split("=", 1)
    return key.strip().split("."), parse_yaml(raw) if raw.strip() else None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read a YAML recipe (optional), apply overrides, validate everything against `cls`."""
    values: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        where = str(path)
    for override in overrides or []:
        keys, value = parse_override(override)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {key} is not a section")
        node[keys[-1]] = value
    return from_dict(cls, values, where)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), allow_unicode=True, sort_keys=False), encoding="utf-8")


def check_library_options(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build a library's argument dataclass (transformers' TrainingArguments, TRL's SFTConfig, DPOConfig, ...) from
    a YAML section. Unknown keys are errors naming the closest valid ones; scalar values are checked against the
    field's annotation (an int where a float is expected is fine, a string is not); the class's own checks
    (`__post_init__`) run last and their complaints come back as ConfigError naming the section."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(_unknown_keys_message(f"{where} ({cls.__name__} options)", unknown, sorted(fields)))
    hints = typing.get_type_hints(cls)
    checked = {}
    for name, value in values.items():
        scalar = _scalar_annotation(hints.get(name))
        checked[name] = _check_type(value, scalar, f"{where}.{name}") if scalar is not None else value
    try:
        return cls(**checked)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from error


def _scalar_annotation(annotation: Any) -> Any:
    """int/float/bool/str (optionally | None) annotations, which are safe to check strictly; else None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    plain = [option for option in options if option is not type(None)] if options else [annotation]
    if len(plain) == 1 and plain[0] in (int, float, bool, str):
        return annotation
    return None
