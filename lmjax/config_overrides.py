"""`--set section.field=value` and `--sweep KEY=V1,V2` text into config values: each value
parsed to its field's declared type, an unknown section or field named with the nearest
valid one. Validation is `lmjax.config_checks`."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from lmjax.config import Config, ConfigError, field_types


def _parse_value(text: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, inner[0], key)
    if origin is tuple:
        items = [s.strip() for s in text.split(",") if s.strip()] if text.strip() else []
        return tuple(_parse_value(s, args[0], key) for s in items)
    if typ is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
        if value != int(value):
            raise ConfigError(f"{key}={text!r}: expected an integer")
        return int(value)
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    return text


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def parse_sweep(text: str) -> tuple[str, tuple[str, ...]]:
    """`--sweep` "model.remat=full,none" -> ("model.remat", ("full", "none"))."""
    key, sep, values = text.partition("=")
    choices = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not key.strip() or not choices:
        raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2, e.g. model.remat=full,none")
    return key.strip(), choices


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Returns `config` with each `section.field=value` applied, parsed to the field type."""
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. run.steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise ConfigError(
                f"--set {key}: expected section.field; sections are {', '.join(sections)}."
            )
        section, field = key.split(".", 1)
        if section not in sections:
            raise ConfigError(
                f"--set {key}: unknown section {section!r}; valid sections: "
                f"{', '.join(sections)}.{_nearest(section, list(sections))}"
            )
        types_ = field_types(type(sections[section]))
        if field not in types_:
            valid = sorted(types_)
            raise ConfigError(
                f"--set {key}: unknown field {field!r} of {section}.{_nearest(field, valid)} "
                f"Valid keys: {', '.join(section + '.' + v for v in valid)}"
            )
        value = _parse_value(text, types_[field], key)
        sections[section] = dataclasses.replace(sections[section], **{field: value})
    return Config(**sections)
