"""Loading a config from YAML with ``--set`` overrides, and one-line error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from segprop_ray.config.schema import Config


class ConfigError(ValueError):
    """A bad configuration; ``str()`` is one line naming the problem."""


class RunConflict(ConfigError):
    """The config does not match the run already in its run directory."""


def parse_override(text: str, flag: str = "--set", example: str = "training.learning_rate=1e-4",
                   secret: bool = False) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (``["a", "b"]``, ``c`` parsed as a YAML scalar or list). Errors name ``flag`` and,
    unless the value is ``secret``, quote the whole item."""
    key, sep, raw = text.partition("=")
    shown = key.strip() if secret else repr(text)
    if not sep or not key.strip() or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"{flag} {shown}: expected KEY=VALUE, e.g. {example}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        detail = "quote it" if secret else _first_line(err)  # a parser message may quote the value
        raise ConfigError(f"{flag} {shown}: value is not valid YAML ({detail})") from None
    return [part.strip() for part in key.strip().split(".")], value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], flag: str = "--set",
                    example: str = "training.learning_rate=1e-4", secret: bool = False) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=c`` override set (sections created as needed); ``flag``,
    ``example`` and ``secret`` shape the one-line errors (see :func:`parse_override`)."""
    result = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text, flag, example, secret)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                shown = ".".join(path) if secret else repr(text)
                raise ConfigError(f"{flag} {shown}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def validate_config(raw: dict[str, Any]) -> Config:
    """Validate a raw mapping into a :class:`Config`, raising :class:`ConfigError` with one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file (or start from an empty mapping), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({_first_line(err)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
    return validate_config(apply_overrides(raw, overrides))


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML, with ``storage_options`` values redacted (never saved or shown)."""
    data = config.model_dump(mode="json", by_alias=True)
    data["storage_options"] = {key: "<redacted>" for key in data.get("storage_options", {})}
    return yaml.safe_dump(data, sort_keys=False)


def format_validation_error(err: ValidationError) -> str:
    """Pydantic's multi-line report as one line: ``config: a.b: problem; c: problem``."""
    parts = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{where}'")
        elif item["type"] == "missing":
            parts.append(f"missing required key '{where}'")
        else:
            message = _first_line(item["msg"]).removeprefix("Value error, ")
            parts.append(f"{where}: {message} (got {_short(item.get('input'))})")
    return "config: " + "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_line(value: Any) -> str:
    return str(value).strip().splitlines()[0] if str(value).strip() else ""


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}
