"""Reading params.yaml: safe YAML, then the schema; every problem one line naming file and key.

The YAML is composed into nodes before anything is built from it, so that what YAML itself lets
through is refused with its line first: a duplicated key (YAML keeps the last silently), a tag
that names a Python object (the safe loader knows none; nothing is ever constructed or run) and
aliases that expand a small file into a huge document (a "billion laughs" YAML bomb). The values
are then checked by pydantic against the section dataclasses (types, ranges, choices, unknown
keys, the rules tying keys together) before any stage touches an output.
"""

from __future__ import annotations

import dataclasses
import re
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from pydantic import TypeAdapter, ValidationError

from l2rclip.config.errors import describe
from l2rclip.config.fields import ConfigError
from l2rclip.config.params import Params

MAX_VALUES = 10_000  # values in the document with every alias expanded; params.yaml has about 200
MERGE_TAG = "tag:yaml.org,2002:merge"


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads `1e-05` as a float (YAML 1.2, as DVC writes floats).

    PyYAML follows YAML 1.1, where a float needs a '.', so the `1e-05` that `dvc exp run -S
    key=1e-5` writes into params.yaml would otherwise come back as a string.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read a params file into `Params`; any problem is a one-line `ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: expected a YAML file at {path}")
    raw = read_yaml(path)
    try:
        return from_dict(Params, {} if raw is None else raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def read_yaml(path: Path) -> Any:
    """The single YAML document of `path` as plain values (None when empty), checked before it is built.

    Raises:
        ConfigError: `file:line:column: ...` for a syntax error, a duplicated key, a tag other than
            plain YAML's, aliases expanding past `MAX_VALUES` values, or text that is not UTF-8.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: expected UTF-8 text, found byte 0x{error.object[error.start]:02x} at offset {error.start}"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the params file: {error.strerror or error}") from None
    loader = ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, path)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        context = f" ({error.context} at line {error.context_mark.line + 1})" if error.context_mark else ""
        raise ConfigError(f"{_at(path, mark)}: YAML error: {error.problem}{context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: YAML error: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML error: lists or mappings nested too deeply") from None
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, path: Path) -> None:
    """Refuse duplicated keys, unknown tags and alias expansion past `MAX_VALUES`, by dotted key."""
    sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded (aliases share nodes)

    def walk(node: yaml.Node, key: str, open_nodes: set[int]) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        where = f"'{key}'" if key else "the document"
        if id(node) in open_nodes:
            raise ConfigError(f"{_at(path, node.start_mark)}: {where} contains itself through a YAML alias")
        if node.tag not in ParamsLoader.yaml_constructors:
            raise ConfigError(
                f"{_at(path, node.start_mark)}: {where} has the tag "
                f"{node.tag.replace('tag:yaml.org,2002:', '!!')}, which a params file cannot use: "
                "expected plain values (read safely: nothing was constructed or run)"
            )
        open_nodes.add(id(node))
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(walk(item, f"{key}[{i}]", open_nodes) for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}  # key -> its line
            for key_node, value_node in node.value:
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                if name is not None and key_node.tag != MERGE_TAG and name in first:
                    raise ConfigError(
                        f"{_at(path, key_node.start_mark)}: duplicate key '{_join(key, name)}' "
                        f"(first at line {first[name]}, again at line {line}); expected each key "
                        "once (YAML would keep only the last): remove one"
                    )
                if name is not None:
                    first.setdefault(name, line)
                inner = key if key_node.tag == MERGE_TAG else _join(key, name or "?")  # `<<: *x` merges
                size += walk(value_node, inner, open_nodes)
        open_nodes.discard(id(node))
        if size > MAX_VALUES:
            raise ConfigError(
                f"{_at(path, node.start_mark)}: {where} expands to {size} values through YAML "
                f"aliases (*name); expected at most {MAX_VALUES} (a YAML bomb?): write the values "
                "out"
            )
        sizes[id(node)] = size
        return size

    walk(root, "", set())


def _at(path: Path, mark: Any) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


@cache
def _adapter(cls: type) -> TypeAdapter[Any]:
    return TypeAdapter(cls)


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build config dataclass `cls` from a nested mapping, checked against the schema.

    Raises:
        ConfigError: one line naming each wrong dotted key (after `prefix`), what was expected and
            what was found.
    """
    try:
        return _adapter(cls).validate_python(_empty_sections_as_defaults(cls, raw))
    except ValidationError as error:
        raise ConfigError(describe(error, cls, prefix)) from None


def _empty_sections_as_defaults(cls: type, raw: Any) -> Any:
    """A section left empty (`tracking:` with every line under it commented out) is null: its defaults."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return raw
    hints = get_type_hints(cls)
    sections = {
        name: hint for name, hint in hints.items() if isinstance(hint, type) and dataclasses.is_dataclass(hint)
    }
    return {
        name: ({} if value is None else _empty_sections_as_defaults(sections[name], value))
        if name in sections
        else value
        for name, value in raw.items()
    }


def section_problems(section: Any, prefix: str = "") -> list[str]:
    """What is wrong with a config dataclass built in code (not loaded), as `from_dict` would say it."""
    cls: type = type(section)
    try:
        _adapter(cls).validate_python(to_dict(section))
    except ValidationError as error:
        return [describe(error, cls, prefix)]
    return []


def json_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml, for editors (`l2rclip config schema > params.schema.json`)."""
    schema = _adapter(Params).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "params.yaml of l2rclip"}


def to_flat_dict(params: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config dataclass into dotted keys (for MLflow params and DVC `-S` overrides)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(to_flat_dict(value, key + "."))
        else:
            flat[key] = value
    return flat


def to_dict(params: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config dataclass (tuples become lists), for JSON/YAML."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return to_dict(value)
        return [plain(v) for v in value] if isinstance(value, tuple) else value

    return {f.name: plain(getattr(params, f.name)) for f in dataclasses.fields(params)}
