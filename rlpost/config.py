"""Typed recipe configs: dataclass fields with help, loaded from YAML plus `key=value` overrides.

A recipe is a YAML mapping whose keys are exactly the fields of a (possibly nested) dataclass;
nested dataclass fields are nested mappings. Overrides such as `rl.learning_rate=1e-4` are
applied on top (the value is parsed with `yaml.safe_load`; a mapping value replaces the whole
entry). Everything is validated before any work starts, and every problem is a one-line
`UserError` naming the file or override, the key, and what to do.

Type rules: `bool` is strict (only YAML booleans); `int` rejects bools and floats; `float`
accepts ints and scientific-notation strings such as `1e-4`, which YAML 1.1 leaves as strings
(`int` accepts such strings when they are whole numbers); `str` rejects numbers; `Path`
accepts strings (`~` expanded). Relative paths in `path_must_exist` fields are checked
against the current working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from rlpost.errors import UserError

__all__ = ["setting", "load_config", "build_config", "read_yaml", "to_dict", "config_help"]

_NUMBER = re.compile(r"^[-+]?(\d[\d_]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_MAX_REPR = 60


class _Mismatch(UserError):
    """A value that does not fit its declared type at `key` (lets unions try the next member)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def setting(default: Any, help: str, *, path_must_exist: bool = False,
            choices: tuple | None = None) -> Any:
    """A dataclass field with help text; mutable defaults and dataclass classes become factories."""
    if choices is not None and default is not None and default not in choices:
        raise ValueError(f"default {default!r} is not one of the choices {choices!r}")
    metadata = {"help": help, "path_must_exist": path_must_exist, "choices": choices}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def load_config(cls: type, yaml_path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Any:
    """Read the recipe at `yaml_path` (None: defaults only), apply `overrides`, validate, build `cls`."""
    source = str(yaml_path) if yaml_path is not None else f"{cls.__name__} defaults"
    data = read_yaml(yaml_path) if yaml_path is not None else {}
    return build_config(cls, data, source, overrides)


def build_config(cls: type, data: dict, source: str, overrides: typing.Iterable[str] = ()) -> Any:
    """`load_config` for a mapping already read (`source` names it in messages)."""
    data = copy.deepcopy(data)
    origins: dict[str, str] = {}
    for override in overrides:
        _apply_override(cls, data, override, origins)
    try:
        return _build(cls, data, "", _Context(source, origins))
    except _Mismatch as exc:
        raise UserError(str(exc)) from None


def to_dict(cfg: Any) -> Any:
    """The config as plain YAML/JSON data (Paths as strings); `load_config` reads it back."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_help(cls: type) -> str:
    """Every key (dotted for nested sections) with its type, default and help, one per line."""
    return "\n".join(_help_lines(cls, ""))


# ----------------------------------------------------------------------------- reading input

class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys in a mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """The recipe's top-level mapping; missing file, bad YAML or a non-mapping are UserErrors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read recipe file ({exc}); check the path") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserError(f"{where}: YAML syntax error: {problem}; fix the recipe file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values at top level, "
                        f"got {type(data).__name__}; write 'key: value' lines")
    return data


def _apply_override(cls: type, data: dict, override: str, origins: dict[str, str]) -> None:
    """Set `section.key=value` in `data` after checking the key against the dataclass schema."""
    source = f"override '{override}'"
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise UserError(f"{source}: malformed override; write KEY=VALUE, e.g. rl.learning_rate=1e-4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise UserError(f"{source}: value is not valid YAML ({problem}); quote it, "
                        f"e.g. {key}='...'") from None
    _check_override_key(cls, parts, source)
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            section = ".".join(parts[: i + 1])
            raise UserError(f"{source}: '{section}' is {_show(node[part])} in the recipe, "
                            f"not a mapping; fix the recipe or override '{section}' as a whole")
        node = node[part]
    node[parts[-1]] = value
    for known in [k for k in origins if k.startswith(key + ".")]:
        del origins[known]
    origins[key] = source


def _check_override_key(cls: type, parts: list[str], source: str) -> None:
    """Walk the schema along `parts`: every part must be a field (or a key inside a dict field)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        tp = _strip_optional(tp)
        prefix = "".join(p + "." for p in parts[:i])
        if dataclasses.is_dataclass(tp):
            known = {f.name: f for f in dataclasses.fields(tp) if f.init}
            if part not in known:
                raise _unknown_key(source, prefix, part, list(known))
            tp = typing.get_type_hints(tp)[part]
        elif typing.get_origin(tp) is dict or tp is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
        else:
            raise UserError(f"{source}: '{prefix[:-1]}' is not a section, so '{'.'.join(parts)}' "
                            f"cannot be set; write {prefix[:-1]}=VALUE")


# ----------------------------------------------------------------------------- validation

@dataclasses.dataclass
class _Context:
    """Where values came from: the recipe file by default, an override where one set them."""

    source: str
    origins: dict[str, str]

    def source_of(self, key: str) -> str:
        """The override that set `key` (or an enclosing section), else the recipe file."""
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for n in range(len(parts), 0, -1):
            found = self.origins.get(".".join(parts[:n]))
            if found:
                return found
        return self.source


def _build(cls: type, data: Any, prefix: str, ctx: _Context) -> Any:
    """Construct dataclass `cls` from mapping `data` (keys under `prefix`), validating each field."""
    section = prefix[:-1]
    if not isinstance(data, dict):
        raise _Mismatch(f"{ctx.source_of(section)}: key '{section}' is a section and expects a "
                        f"mapping of its keys, got {_show(data)}; write '{section}:' with indented keys",
                        section)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise _unknown_key(ctx.source_of(prefix + str(name)), prefix, str(name), list(fields))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], prefix + name, ctx)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{ctx.source}: required key '{prefix + name}' is missing; "
                            f"add it to the recipe or pass {prefix + name}=VALUE")
    obj = cls(**kwargs)
    for name, f in fields.items():
        _check_constraints(f, getattr(obj, name), prefix + name, ctx)
    return obj


def _convert(tp: Any, value: Any, key: str, ctx: _Context) -> Any:
    """`value` checked against (and coerced to) type `tp`; raises `_Mismatch` naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, key, ctx)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _mismatch(tp, value, key, ctx)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", ctx)
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(tp, origin or tp, args, value, key, ctx)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _mismatch(tp, value, key, ctx)
        if not args:
            return value
        return {_convert(args[0], k, f"{key}.{k}", ctx): _convert(args[1], v, f"{key}.{k}", ctx)
                for k, v in value.items()}
    converted = _convert_scalar(tp, value)
    if converted is _INVALID:
        raise _mismatch(tp, value, key, ctx)
    return converted


def _convert_union(tp: Any, args: tuple, value: Any, key: str, ctx: _Context) -> Any:
    """Optional[X] delegates to X; a wider union takes the first member that fits."""
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1:
        try:
            return _convert(members[0], value, key, ctx)
        except _Mismatch as exc:
            if exc.key != key:
                raise
            raise _mismatch(tp, value, key, ctx) from None
    for member in members:
        try:
            return _convert(member, value, key, ctx)
        except _Mismatch:
            continue
    raise _mismatch(tp, value, key, ctx)


def _convert_sequence(tp: Any, kind: type, args: tuple, value: Any, key: str, ctx: _Context) -> Any:
    """list[X], tuple[X, ...] or tuple[X, Y]: every element converted, named `key[i]`."""
    if not isinstance(value, (list, tuple)):
        raise _mismatch(tp, value, key, ctx)
    if kind is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _mismatch(tp, value, key, ctx)
        element_types = list(args)
    else:
        element_types = [args[0] if args else Any] * len(value)
    items = [_convert(t, v, f"{key}[{i}]", ctx) for i, (t, v) in enumerate(zip(element_types, value))]
    return tuple(items) if kind is tuple else items


_INVALID = object()


def _convert_scalar(tp: Any, value: Any) -> Any:
    """bool/int/float/str/Path coercion under the module's type rules; `_INVALID` if it fails."""
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            number = _decimal(value)
            whole = number is not None and number == number.to_integral_value()
            return int(number) if whole else _INVALID
        return _INVALID
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value.strip().replace("_", ""))
        return _INVALID
    if tp is str:
        return value if isinstance(value, str) else _INVALID
    if tp is Path:
        return Path(value).expanduser() if isinstance(value, (str, Path)) else _INVALID
    return value if isinstance(tp, type) and isinstance(value, tp) else _INVALID


def _decimal(text: str) -> Decimal | None:
    """`text` as an exact Decimal, or None if it is not a finite number."""
    try:
        number = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _check_constraints(f: dataclasses.Field, value: Any, key: str, ctx: _Context) -> None:
    """Apply a field's `choices` and `path_must_exist` to its value (each element for lists)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    choices = f.metadata.get("choices")
    if choices is not None:
        for v in values:
            if v is not None and v not in choices:
                close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UserError(f"{ctx.source_of(key)}: key '{key}' must be one of "
                                f"{', '.join(repr(c) for c in choices)}, got {_show(v)}{hint}")
    if f.metadata.get("path_must_exist"):
        for v in values:
            if v is not None and not Path(v).expanduser().exists():
                raise UserError(f"{ctx.source_of(key)}: key '{key}' points to '{v}', which does not "
                                f"exist; create it or fix the path")


# ----------------------------------------------------------------------------- messages and help

def _unknown_key(source: str, prefix: str, name: str, valid: list[str]) -> UserError:
    """The one-line unknown-key error, with the closest valid key if there is one."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    where = f"in '{prefix[:-1]}'" if prefix else "at top level"
    return UserError(f"{source}: unknown key '{prefix}{name}'{hint}; "
                     f"valid keys {where}: {', '.join(valid)}")


def _mismatch(tp: Any, value: Any, key: str, ctx: _Context) -> _Mismatch:
    """The one-line wrong-type error naming the key, the expected type and the value given."""
    return _Mismatch(f"{ctx.source_of(key)}: key '{key}' expects {_type_name(tp)}, "
                     f"got {_show(value)}; fix the value", key)


def _show(value: Any) -> str:
    """A short one-line rendering of a value and its YAML type."""
    text = repr(value)
    if len(text) > _MAX_REPR:
        text = text[: _MAX_REPR - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """A readable name for a type annotation: 'float', 'list[str]', 'int | None', "one of 'a', 'b'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a section ({tp.__name__})"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return "path" if tp is Path else getattr(tp, "__name__", str(tp))


def _strip_optional(tp: Any) -> Any:
    """X for Optional[X]; anything else unchanged."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _help_lines(cls: type, prefix: str) -> list[str]:
    """Help lines for `cls`'s fields; nested sections get a header line and their keys below."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp, help_text = prefix + f.name, hints[f.name], f.metadata.get("help", "")
        section = _strip_optional(tp)
        if dataclasses.is_dataclass(section):
            lines.append(f"{key}: section {section.__name__}  {help_text}".rstrip())
            lines.extend(_help_lines(section, key + "."))
            continue
        notes = []
        if f.metadata.get("choices") is not None:
            notes.append("choices: " + ", ".join(repr(c) for c in f.metadata["choices"]))
        if f.metadata.get("path_must_exist"):
            notes.append("path must exist")
        extra = f" [{'; '.join(notes)}]" if notes else ""
        lines.append(f"{key} ({_type_name(tp)}, default {_default_text(f)}): {help_text}{extra}")
    return lines


def _default_text(f: dataclasses.Field) -> str:
    """The field's default as YAML-ish text, or 'required'."""
    if f.default is not dataclasses.MISSING:
        return repr(to_dict(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return repr(to_dict(f.default_factory()))
    return "required"
