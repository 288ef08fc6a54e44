"""Frozen per-stage configs: defaults < `--config FILE` < flags.

Every stage config is a frozen dataclass whose fields carry a one-line help text in
``metadata["help"]``. ``resolve`` merges the three sources and validates once,
collecting every problem before raising.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from tipcli.errors import ConfigError, TipError

C = TypeVar("C")


def option(default: Any, help: str) -> Any:
    """A config field with its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    """The help text of a config field, followed by its default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"{f.metadata.get('help', '')} [default: {default}]"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML file of settings (keys are field names, `-` or `_`)."""
    path = Path(path)
    if not path.is_file():
        raise TipError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise TipError(f"config file {path}: use a .json, .toml or .yaml file")
    except TipError:
        raise
    except Exception as exc:  # parse errors of three libraries
        raise TipError(f"config file {path} could not be parsed: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise TipError(f"config file {path} must hold a mapping of setting names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(cls: type[C], config_file: str | Path | None = None, **flags: Any) -> C:
    """Build ``cls`` from its defaults, then the config file, then flags that are not None."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        from_file = load_config_file(config_file)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise ConfigError([f"unknown setting '{k}' in {config_file} "
                               f"(valid: {', '.join(sorted(names))})" for k in unknown])
        values.update(from_file)
    values.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError([f"unknown setting '{k}'" for k in unknown])
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        problems = validate()
        if problems:
            raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths as strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else v
    return out
