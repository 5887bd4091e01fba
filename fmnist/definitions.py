"""Experiment definitions: YAML files in ``experiments/`` loaded into frozen dataclasses, every key
validated on load (a ``ConfigError`` names the file and the key).
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
    """``FMNIST_EXPERIMENTS_DIR``, else the ``experiments/`` next to the package or in the cwd."""
    env = os.environ.get("FMNIST_EXPERIMENTS_DIR")
    here = Path(__file__).resolve().parent.parent
    candidates = [*([Path(env)] if env else []), here / "experiments", Path.cwd() / "experiments"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"Could not find the experiments/ folder (looked in {looked}); "
        "set FMNIST_EXPERIMENTS_DIR to it."
    )


def definition_path(name_or_path: str, subdir: str = "") -> Path:
    """A definition by file path, or by name inside ``experiments/<subdir>``."""
    given = Path(name_or_path)
    if given.suffix in {".yaml", ".yml"} and given.is_file():
        return given
    folder = experiments_dir() / subdir
    path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise ConfigError(f"Unknown definition {name_or_path!r} in {folder} (known: {known}).")
    return path


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
    """A definition file's top-level mapping; refuses one too large, too deep or with aliases."""
    if (size := path.stat().st_size) > MAX_DEFINITION_BYTES:
        raise ConfigError(
            f"{path}: {size} bytes; a definition holds at most {MAX_DEFINITION_BYTES}."
        )
    try:
        content = yaml.load(path.read_bytes().decode("utf-8"), Loader=DefinitionLoader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError) as exc:
        # a scalar's own constructor may fail (a date like 2024-99-99) with ValueError
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        raise ConfigError(f"{path}: not valid YAML ({reason}).") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level.")
    return content


def load_definition(name_or_path: str, schema: type[T], subdir: str = "") -> T:
    """Load a YAML definition into ``schema`` (a dataclass), validating every key."""
    path = definition_path(name_or_path, subdir)
    return build_dataclass(schema, read_yaml(path), str(path))


def build_dataclass(schema: type[T], values: dict[str, Any], source: str) -> T:
    """Check ``values`` against the dataclass fields and build it; errors name source and key."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in values:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key {key!r} (allowed: {allowed}).")
    missing = dataclasses.MISSING
    for name, field in fields.items():
        if field.default is missing and field.default_factory is missing and name not in values:
            raise ConfigError(f"{source}: missing required key {name!r}.")
    return schema(**{k: coerce(v, hints[k], f"{source}: key {k!r}") for k, v in values.items()})


# scalar annotation -> (accepted types, what the error says was expected); a bool is no number
SCALARS = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: (int | float, "a number"),
    str: (str, "a string"),
}


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation, converting lists to tuples for frozen configs."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
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
    if annotation not in SCALARS:
        return value
    kinds, expected = SCALARS[annotation]
    if not isinstance(value, kinds) or (isinstance(value, bool) and annotation is not bool):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}.")
    if annotation is not float:
        return value
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ConfigError(f"{where}: {str(value)[:20]}... is too large.") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}.")
    return number
