"""How a setting is declared, layered and checked; the stage configs are in ``configs``.

A stage config is a frozen dataclass. Each field is a *setting* (type, default, range,
choices and one line of help, written once) or a *group*: a smaller config shared by
several stages (``Sampling``, ``Selection``, ...). Seen from outside, a config is flat:
every setting has one name (its field name, or the name its group gives it in that stage),
which is its flag (``--max-new-tokens``), its key in a settings file and in a stage's
manifest. ``resolve`` layers defaults < settings file < given values, checks every value
and raises one ``ConfigError`` listing all problems. Torch-free: the CLI imports this.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tipcli.errors import ConfigError, TipError, first_line

C = TypeVar("C")
STAGES: dict[str, type] = {}  # each stage's config by stage name (``tipcli.configs`` fills it)


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, required: bool = False, short: str | None = None,
            argument: str | None = None, many: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field. ``ge``/``gt``/``le``/``lt`` bound numbers (floats must also be
    finite), ``choices`` lists the valid strings, ``check`` returns a problem or None,
    ``required`` refuses an empty string. ``short`` is a one-letter flag; ``argument``
    makes it the command's positional argument (its metavar), which accepts ``-`` for a
    path read from stdin. The field's name is the setting's one name: its flag, its key in
    settings files and manifests, and its attribute (so a name shared by two groups, such as
    a top-k, carries its group's prefix: ``sample_top_k``, ``teacher_top_k``). A string
    setting with ``many`` may also be a list of strings (its flag repeated; a list in a
    settings file): one given is the string, several the list; ``check`` sees each."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, required=required,
                short=short, argument=argument, check=check, many=many)
    return dataclasses.field(default=default, metadata=meta)


def group(cls: type, **defaults: Any) -> Any:
    """A field holding a shared group of settings, with this stage's own defaults."""
    return dataclasses.field(default_factory=functools.partial(cls, **defaults),
                             metadata={"group": cls, "defaults": defaults})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting as the outside sees it: its flat name and where it lives."""

    name: str                 # flat name: flag without dashes, settings-file key
    path: tuple[str, ...]     # attribute path inside the config
    type: Any                 # int, float, str, bool, or Optional of one
    default: Any
    meta: dict[str, Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        """How messages name it: the flag, or the positional argument."""
        arg = self.meta.get("argument")
        return arg if arg else self.flag

    @property
    def help(self) -> str:
        return self.meta["help"]


@functools.cache
def leaves(cls: type) -> tuple[Leaf, ...]:
    """Every setting of ``cls``, groups flattened, in declaration order."""
    out: list[Leaf] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            sub_cls, defaults = f.metadata["group"], f.metadata["defaults"]
            for leaf in leaves(sub_cls):
                out.append(Leaf(leaf.name, (f.name, *leaf.path), leaf.type,
                                defaults.get(leaf.path[0], leaf.default), leaf.meta))
        else:
            out.append(Leaf(f.name, (f.name,), hints[f.name],
                            f.default, dict(f.metadata)))
    names = [leaf.name for leaf in out]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise TypeError(f"{cls.__name__}: settings {clash} are declared twice; rename them")
    return tuple(out)


def leaf_map(cls: type) -> dict[str, Leaf]:
    return {leaf.name: leaf for leaf in leaves(cls)}


# ----------------------------------------------------------------------------- values


def base_type(tp: Any) -> tuple[Any, bool]:
    """(the type inside Optional, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def coerce(leaf: Leaf, value: Any) -> tuple[Any, str | None]:
    """(the value as the setting's type, or a problem). Booleans are not numbers, numbers
    are not strings: a settings file is read as strictly as a flag."""
    base, optional = base_type(leaf.type)
    if leaf.meta.get("many") and isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) for v in value):
            return value, f"{leaf.label} must be a string or a list of strings (got " \
                          f"{json.dumps(list(value))})"
        return (value[0] if len(value) == 1 else list(value)), None
    if value is None:
        return (None, None) if optional else (value, f"{leaf.label} must be "
                                                     f"{TYPE_NAMES[base]} (got null)")
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[base]
    if not ok:
        return value, f"{leaf.label} must be {TYPE_NAMES[base]} (got {json.dumps(value)})"
    return (float(value) if base is float else value), None


def check_leaf(leaf: Leaf, value: Any) -> str | None:
    """The first problem with ``value`` for ``leaf``, or None."""
    value, problem = coerce(leaf, value)
    if problem or value is None:
        return problem
    if isinstance(value, list):  # a setting with ``many``: each of its strings
        return next((p for p in (check_leaf(leaf, v) for v in value) if p), None)
    m = leaf.meta
    if m["required"] and value == "":
        return f"{leaf.label} is required"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{leaf.label} must be a finite number (got {value})"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _in_range(m, value):
        return f"{leaf.label} must be {range_text(m)} (got {value:g})"
    if m["choices"] and value not in m["choices"]:
        return f"{leaf.label} must be one of {', '.join(m['choices'])} (got '{value}')"
    if m["check"] and value != "":
        return m["check"](value)
    return None


def _in_range(m: dict[str, Any], v: float) -> bool:
    return not ((m["ge"] is not None and v < m["ge"]) or (m["gt"] is not None and v <= m["gt"])
                or (m["le"] is not None and v > m["le"]) or (m["lt"] is not None and v >= m["lt"]))


def range_text(m: dict[str, Any]) -> str:
    lo, hi = (m["ge"], "[") if m["ge"] is not None else (m["gt"], "(")
    up, close = (m["le"], "]") if m["le"] is not None else (m["lt"], ")")
    if lo is not None and up is not None:
        return f"in {hi}{lo:g}, {up:g}{close}"
    if lo is not None:
        return f"at least {lo:g}" if hi == "[" else f"> {lo:g}"
    return f"at most {up:g}" if close == "]" else f"< {up:g}"


# ----------------------------------------------------------------------------- building


def from_flat(cls: type[C], values: dict[str, Any]) -> C:
    """``cls`` from flat names; missing settings take this stage's defaults. Unchecked."""
    kwargs: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for leaf in leaves(cls):
        if leaf.name not in values:
            continue
        if len(leaf.path) == 1:
            kwargs[leaf.path[0]] = values[leaf.name]
        else:
            groups.setdefault(leaf.path[0], {})[leaf.path[1]] = values[leaf.name]
    for f in dataclasses.fields(cls):
        if f.name in groups:
            kwargs[f.name] = f.metadata["group"](**{**f.metadata["defaults"], **groups[f.name]})
    return cls(**kwargs)


def to_flat(cfg: Any) -> dict[str, Any]:
    """Every setting of ``cfg`` by flat name, JSON-ready: the form stored in manifests,
    which is also a valid settings file."""
    out = {}
    for leaf in leaves(type(cfg)):
        v = cfg
        for attr in leaf.path:
            v = getattr(v, attr)
        out[leaf.name] = str(v) if isinstance(v, Path) else v
    return out


def problems(cfg: Any) -> list[str]:
    """Every problem with ``cfg``: each setting's own checks, then each class's ``rules()``
    for rules between settings (groups first; a rule that cannot be checked because a
    setting it reads is invalid is skipped: that setting's own problem is reported)."""
    out = [p for leaf, v in zip(leaves(type(cfg)), to_flat(cfg).values())
           if (p := check_leaf(leaf, v))]
    holders = [getattr(cfg, f.name) for f in dataclasses.fields(cfg) if "group" in f.metadata]
    for holder in (*holders, cfg):
        try:
            found = holder.rules() if hasattr(holder, "rules") else []
        except (TypeError, ValueError, ArithmeticError):
            found = []
        out += [p for p in found if p not in out]
    return out


def validate(cfg: C) -> C:
    """``cfg`` itself, or a ConfigError listing every problem."""
    found = problems(cfg)
    if found:
        raise ConfigError(found)
    return cfg


def resolve(cls: type[C], config_file: str | Path | None = None, **values: Any) -> C:
    """``cls`` from its defaults, then a settings file, then ``values`` that are not None
    (flat names), checked: the one way a stage config is made from outside."""
    known = leaf_map(cls)
    merged: dict[str, Any] = {}
    found: list[str] = []
    if config_file:
        from_file, found = current_names(cls, load_config_file(config_file, cls),
                                         f" in {config_file}")
        found += [f"unknown setting '{k}' in {config_file}; settings are the command's flag "
                  "names (see its --help)" for k in from_file if k not in known]
        merged.update(from_file)
    given, clashes = current_names(cls, {k: v for k, v in values.items() if v is not None})
    found += clashes
    found += [f"unknown setting '{k}'" for k in given if k not in known]
    merged.update(given)
    merged = {k: v for k, v in merged.items() if k in known}
    for name, v in merged.items():
        v, problem = coerce(known[name], v)
        merged[name] = v
        if problem:
            found.append(problem)
    if found:
        raise ConfigError(found)
    return validate(from_flat(cls, merged))


def old_names(cls: type) -> dict[str, str]:
    """A stage's old setting names (tip 0.1's spellings) and the names they are now; they
    are read, with a notice, for one more release."""
    return getattr(cls, "OLD_NAMES", {})


def current_names(cls: type, values: dict[str, Any], where: str = "",
                  notice: bool = True) -> tuple[dict[str, Any], list[str]]:
    """``values`` with old setting names replaced by the current ones (a one-line notice on
    stderr for each), and the problems: an old name given beside its new one."""
    old = old_names(cls)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        new = old.get(key)
        if new is None:
            out[key] = value
        elif new in values:
            problems.append(f"{_flag(key)} and {_flag(new)}{where} are one setting ("
                            f"{_flag(key)} is its old name); give {_flag(new)} only")
        else:
            if notice:
                print(f"warning: {_flag(key)}{where} is deprecated: it is now {_flag(new)} (the "
                      "old name works until the next release)", file=sys.stderr)
            out[new] = value
    return out, problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_config_file(path: str | Path, cls: type | None = None) -> dict[str, Any]:
    """Settings from a .json, .toml or .yaml file: flat names (``-`` or ``_``), or a group
    of ``cls`` as a nested table (``[selection]`` holding ``keep = 0.5``); or a stage's
    ``manifest.json`` or its ``config`` object, of which the settings of ``cls`` are taken
    (the rest left out with a notice). Values must be JSON's kinds, each setting given once."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise TipError(f"config file {path} does not exist")
    parse = {".json": json.loads, ".toml": tomllib.loads}.get(path.suffix)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        parse = yaml.safe_load
    if parse is None:
        raise TipError(f"config file {path}: use a .json, .toml or .yaml file")
    try:
        data = parse(path.read_text(encoding="utf-8-sig"))  # with or without a byte-order mark
    except Exception as exc:  # parse errors of three libraries, and bad bytes
        raise TipError(f"config file {path} could not be parsed: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise TipError(f"config file {path} must hold a mapping of setting names to values")
    found = _non_json(data, path)
    if found:
        raise ConfigError(found)
    if _is_manifest(data):
        return _from_record(data["config"], cls, path, STAGES.get(data["stage"]))
    writer = _recorded_by(data, cls)
    if writer is not None:
        return _from_record(data, cls, path, writer)
    return _flatten_file(data, cls, path)


JSON_TYPES = (dict, list, str, int, float, bool, type(None))


def _non_json(data: dict[str, Any], path: Path, where: str = "") -> list[str]:
    """Values of kinds JSON lacks: TOML and YAML also hold dates, times, bytes and sets,
    which no setting takes."""
    found = []
    for key, value in data.items():
        name = f"{where}{key}"
        if isinstance(value, dict):
            found += _non_json(value, path, f"{name}.")
        elif not isinstance(value, JSON_TYPES) or isinstance(value, list) and not all(
                isinstance(v, JSON_TYPES) for v in value):
            shown = str(value) if len(str(value)) <= 40 else str(value)[:37] + "..."
            found.append(f"config file {path}: '{name}' is a {type(value).__name__} ({shown}), "
                         "which no setting takes: write a number, true/false or a quoted string")
    return found


def _is_manifest(data: dict[str, Any]) -> bool:
    """Whether a settings file is a stage's ``manifest.json`` (its settings: ``config``)."""
    return "schema_version" in data and isinstance(data.get("stage"), str) and \
        isinstance(data.get("config"), dict)


def _recorded_by(data: dict[str, Any], cls: type | None) -> type | None:
    """The command whose config object a settings file is (a manifest's ``config`` saved
    alone: every setting of that command, as tip records them), or None."""
    for c in (*([cls] if cls else []), *STAGES.values()):
        if set(leaf_map(c)) <= set(current_names(c, data, notice=False)[0]):
            return c
    return None


def _from_record(config: dict[str, Any], cls: type | None, path: Path,
                 writer: type | None) -> dict[str, Any]:
    """The settings of ``cls`` in what the command ``writer`` recorded, under today's
    names; the others (another command's, or recorded beside the settings, like train's
    ``selection``) are left out with a notice."""
    if writer is not None:
        config = current_names(writer, config, notice=False)[0]
    if cls is None:
        return dict(config)
    known = leaf_map(cls)
    left_out = [k for k in config if k not in known]
    if left_out:
        print(f"notice: {path}: left out what this command does not take: "
              f"{', '.join(_flag(k) for k in left_out)}", file=sys.stderr)
    return {k: v for k, v in config.items() if k in known}


def _flatten_file(data: dict[str, Any], cls: type | None, path: Path | str = "") -> dict[str, Any]:
    """Flat names from a file's keys (``-`` or ``_``) and group tables; a setting spelled
    twice is refused."""
    groups = {}
    if cls is not None:
        for f in dataclasses.fields(cls):
            if "group" in f.metadata:
                groups[f.name] = {leaf.path[0]: leaf.name for leaf in leaves(f.metadata["group"])}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    twice: list[str] = []
    for spelling, name, value in _file_entries(data, groups):
        if name in spelled:
            twice.append(f"config file {path} sets {_flag(name)} twice, as '{spelled[name]}' "
                         f"and as '{spelling}': keep one")
        spelled.setdefault(name, spelling)
        out[name] = value
    if twice:
        raise ConfigError(twice)
    return out


def _file_entries(data: dict[str, Any], groups: dict[str, dict[str, str]]):
    """(the key as written, its flat name, its value) for each entry of a settings file,
    a group table's entries one by one."""
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm in groups and isinstance(value, dict):
            for sub, v in value.items():
                sub_norm = str(sub).replace("-", "_")
                yield f"{key}.{sub}", groups[norm].get(sub_norm, f"{norm}.{sub_norm}"), v
        else:
            yield str(key), norm, value


def help_text(leaf: Leaf) -> str:
    """Help for ``--help``: the line, the valid range and the default."""
    m, text = leaf.meta, leaf.help
    if m["choices"] and not all(c in text for c in m["choices"]):
        text += f" One of: {', '.join(m['choices'])}."
    if any(m[k] is not None for k in ("ge", "gt", "le", "lt")):
        text += f" ({range_text(m)})"
    if leaf.default not in ("", None) and not m["argument"]:
        shown = str(leaf.default).lower() if isinstance(leaf.default, bool) else leaf.default
        text += f" [default: {shown}]"
    return text
