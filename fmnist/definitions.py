"""Experiment definitions: YAML files in ``experiments/`` loaded into frozen dataclasses.

A definition is validated on load against the dataclass it fills: an unknown key, a missing
required key or a value of the wrong type (nested ones included) raises ``ConfigError`` naming
the file and the key. Before that, ``read_yaml`` refuses a file too large
(``MAX_DEFINITION_BYTES``), nested too deep (``MAX_DEPTH``) or using YAML aliases (a few lines of
them can expand to billions of values), so no definition can exhaust memory or the stack.
The folder is found next to the package (editable install or source checkout), through
``FMNIST_EXPERIMENTS_DIR``, or under the working directory, so commands work from anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fmnist.errors import ConfigError

T = TypeVar("T")


def experiments_dir() -> Path:
    """The folder holding the experiment definitions."""
    candidates = []
    if os.environ.get("FMNIST_EXPERIMENTS_DIR"):
        candidates.append(Path(os.environ["FMNIST_EXPERIMENTS_DIR"]))
    candidates.append(Path(__file__).resolve().parent.parent / "experiments")
    candidates.append(Path.cwd() / "experiments")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        "Could not find the experiments/ folder (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); set FMNIST_EXPERIMENTS_DIR to it."
    )


def definition_path(name_or_path: str, subdir: str = "") -> Path:
    """A definition by file path, or by name inside ``experiments/<subdir>``."""
    given = Path(name_or_path)
    if given.suffix in {".yaml", ".yml"} and given.is_file():
        return given
    folder = experiments_dir() / subdir if subdir else experiments_dir()
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available(subdir)) or "none"
        raise ConfigError(f"Unknown definition {name_or_path!r} in {folder} (known: {known}).")
    return path


def available(subdir: str = "") -> list[str]:
    folder = experiments_dir() / subdir if subdir else experiments_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


MAX_DEFINITION_BYTES = 1024 * 1024  # the largest definition shipped is under 2 kB
MAX_DEPTH = 20  # nesting levels of mappings and lists; definitions use 3


class DefinitionLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases and with a nesting limit."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in a definition ({mark})")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_yaml(path: Path) -> dict[str, Any]:
    """A definition file's top-level mapping, read safely (see the module's docstring)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_DEFINITION_BYTES:
        raise ConfigError(
            f"{path}: {size} bytes; a definition holds at most {MAX_DEFINITION_BYTES}."
        )
    try:
        text = path.read_bytes().decode("utf-8")
        loader = DefinitionLoader(text)
        try:
            content = loader.get_single_data()
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as exc:
        # a scalar's own constructor may fail (a date like 2024-99-99) with ValueError
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"{path}: not valid YAML ({type(exc).__name__}: {first_line})."
        ) from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level.")
    return content


def load_definition(name_or_path: str, schema: type[T], subdir: str = "", **overrides) -> T:
    """Load a YAML definition into ``schema`` (a dataclass), validating every key."""
    path = definition_path(name_or_path, subdir)
    values = read_yaml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_dataclass(schema, values, str(path))


def build_dataclass(schema: type[T], values: dict[str, Any], source: str) -> T:
    """Check ``values`` against the dataclass fields and build it; errors name source and key."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in values:
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {key!r} (allowed: {', '.join(sorted(fields))})."
            )
    for name, field in fields.items():
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if required and name not in values:
            raise ConfigError(f"{source}: missing required key {name!r}.")
    converted = {}
    for key, value in values.items():
        converted[key] = coerce(value, hints[key], f"{source}: key {key!r}")
    return schema(**converted)


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation, converting lists to tuples for frozen configs."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}.")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        inner = args[0] if args else Any
        items = [coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        key_t, val_t = args or (Any, Any)
        return {coerce(k, key_t, where): coerce(v, val_t, where) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ConfigError(f"{where}: {str(value)[:20]}... is too large.") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}.")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return value
    return value
