"""Typed run configs: a dataclass of dataclass sections, loaded from YAML plus `--section.key=value` overrides.

    @dataclass
    class RunConfig:
        optim: OptimConfig = field(default_factory=OptimConfig)
        train: TrainConfig = field(default_factory=TrainConfig)

    cfg = from_cli(RunConfig, ["--config", "run.yaml", "--optim.lr=3e-4"])

Every value is checked against the field's annotation (int, float, bool, str, Literal, X | None, list/tuple/dict
of those, nested dataclasses); unknown sections or keys are rejected with the valid names listed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rnalm.files import atomic_write

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names where and why."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with decimal integers only: YAML 1.1 reads 010 as 8, 0x10 as 16 and 1:30 as 90, which
    here become 10 or an error (the file and override values of numeric fields are decimal)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9]*)$"), list("-+0123456789"))


def merge_dicts(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: base with extra merged in (nested dicts key by key); neither is changed."""
    out = copy.deepcopy(dict(base))
    for k, v in extra.items():
        both = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
        out[k] = merge_dicts(out[k], v) if both else copy.deepcopy(v)
    return out


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "config", base: T | None = None) -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; missing keys keep their defaults (those of `base`
    when given). A partial section keeps the defaults its parent gives it (a default_factory such as
    `lambda: TrainConfig(lr=1e-5)`), not only its class's."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown key(s) {', '.join(map(repr, unknown))}"
                          f"{_retired(cls, unknown)}; "
                          f"valid keys: {', '.join(fields)}")
    kwargs = {}
    for k, v in data.items():
        here = f"{where}.{k}" if where else k
        default = getattr(base, k) if base is not None else _field_default(fields[k])
        if dataclasses.is_dataclass(default) and (v is None or isinstance(v, Mapping)):  # None: a section left empty
            kwargs[k] = from_dict(type(default), v, here, base=default)
        else:
            kwargs[k] = _coerce(v, hints[k], here)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _retired(cls: type, keys: Sequence[str]) -> str:
    """What a section's RETIRED mapping (old key -> what replaced it) says of these unknown keys."""
    retired = getattr(cls, "RETIRED", {})
    return "".join(f"; {k!r} is retired: {retired[k]}" for k in keys if k in retired)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that YAML/JSON can write and `from_dict` reads back."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return str(v) if isinstance(v, Path) else v
    return plain(cfg)


def changed_settings(then: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple]:
    """{"section.key": (then, now)} for the settings of two `to_dict` configs that differ; a setting only one of
    them has (a version's new option) is not a change. A value is compared whole: a dict setting such as
    train.ds_overrides changes when a key is added or dropped."""
    changes: dict[str, tuple] = {}
    for section in then.keys() & now.keys():
        a, b = then[section], now[section]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes.update({f"{section}.{k}": (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]})
        elif a != b:
            changes[section] = (a, b)
    return dict(sorted(changes.items()))


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """YAML file (optional) first, then overrides `section.key=value` (or `--section.key=value`) in order."""
    data: dict[str, Any] = {}
    where = (str(path) if path is not None else "defaults") + (" + overrides" if overrides else "")
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(), Loader=_Loader)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        _apply_override(cls, data, item)
    try:
        return from_dict(cls, data, where="")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


def from_cli(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
             description: str | None = None) -> T:
    """Parse `--config FILE` plus any number of `--section.key=value` (or `--section.key value`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=_help_epilog(cls),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with the sections below")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or tok == "--":
            parser.error(f"unexpected argument {tok!r}; overrides look like {_override_forms(cls)}")
        if "=" in tok:
            overrides.append(tok[2:])
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            overrides.append(f"{tok[2:]}={rest[i + 1]}")
            i += 2
        else:
            parser.error(f"override {tok!r} has no value; write {tok}=VALUE")
    try:
        return load(cls, args.config, overrides)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _apply_override(cls: type, data: dict[str, Any], item: str) -> None:
    item = item[2:] if item.startswith("--") else item
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    parts = key.replace("-", "_").split(".")  # --data.token-budget as --data.token_budget, as argparse spells options
    node, owner = data, cls
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(owner)
        if part not in hints or part not in {f.name for f in dataclasses.fields(owner)}:
            valid = ", ".join(f.name for f in dataclasses.fields(owner))
            raise ConfigError(f"override --{key}: unknown key {part!r} in "
                              f"{'.'.join(parts[:depth]) or 'top level'}{_retired(owner, [part])}; valid keys: {valid}")
        hint = hints[part]
        if depth == len(parts) - 1:  # a mapping is merged into the file's, key by key
            value = _parse_scalar(raw, hint)
            both = isinstance(value, dict) and isinstance(node.get(part), dict)
            node[part] = merge_dicts(node[part], value) if both else value
            return
        sub = _dataclass_of(hint)
        if sub is None:
            raise ConfigError(f"override --{key}: {'.'.join(parts[:depth + 1])} is not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override --{key}: {'.'.join(parts[:depth + 1])} is not a mapping in the file")
        node, owner = child, sub


def _parse_scalar(raw: str, hint: Any) -> Any:
    """Strings stay strings for str fields (so '007' or 'yes' are not reinterpreted); others go through YAML."""
    if hint is str or (_is_optional(hint) and _strip_none(hint) is str and raw not in ("null", "~", "None")):
        return raw
    if raw == "None":
        return None
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw


def _is_optional(hint: Any) -> bool:
    return _origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def _strip_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else typing.Union[tuple(args)]


def _origin(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    return typing.Union if origin is types.UnionType else origin


def _dataclass_of(hint: Any) -> type | None:
    if _is_optional(hint):
        hint = _strip_none(hint)
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = _origin(hint)
    if hint is Any:
        return value
    if origin is typing.Union:
        return _coerce_union(value, hint, where)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where)
    if origin in (list, tuple, Sequence):
        return _coerce_items(value, hint, origin, where)
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(hint) or (Any, Any))
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        return _to_float(value, where)
    if hint is int:
        return _to_int(value, where)
    if hint in _PLAIN:
        what, accepted = _PLAIN[hint]
        if isinstance(value, accepted):
            return hint(value)
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {hint!r}")


_PLAIN = {bool: ("true or false", bool), str: ("a string", str), Path: ("a path", (str, Path))}


def _coerce_union(value: Any, hint: Any, where: str) -> Any:
    if value is None and type(None) in typing.get_args(hint):
        return None
    errors = []
    for arg in typing.get_args(hint):
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")


def _coerce_items(value: Any, hint: Any, origin: Any, where: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: fixed length and types
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _to_float(value: Any, where: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML reads "5e-5" (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):  # a NaN passes every `x < low` check
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return number


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):  # "1e6" (YAML reads it as a string)
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{where}: expected an integer, got {value!r}")


def _help_epilog(cls: type) -> str:
    lines = [f"overrides ({_override_forms(cls)}), with the built-in defaults (a --config file's values replace "
             "them):"]
    for section in dataclasses.fields(cls):
        sub = _dataclass_of(typing.get_type_hints(cls)[section.name])
        default = _field_default(section)
        if sub is None:
            lines.append(f"  --{section.name}={_yaml_scalar(default)}")
            continue
        for f in dataclasses.fields(sub):
            value = getattr(default, f.name, "") if default is not None else ""
            lines.append(f"  --{section.name}.{f.name}={_yaml_scalar(value)}")
    return "\n".join(lines)


def _override_forms(cls: type) -> str:
    """The override spellings that `cls` accepts: --section.key=value for sections, --key=value for top-level fields."""
    hints = typing.get_type_hints(cls)
    kinds = {_dataclass_of(hints[f.name]) is not None for f in dataclasses.fields(cls)}
    return " or ".join(form for form, is_section in (("--section.key=value", True), ("--key=value", False))
                       if is_section in kinds)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _yaml_scalar(value: Any) -> str:
    """How to write the value on the command line: null / true / [0.9, 0.999] / {} / plain text."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()
