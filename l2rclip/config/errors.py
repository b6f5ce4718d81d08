"""pydantic's validation errors -> one line per problem, naming the dotted key of params.yaml.

pydantic reports where a value failed as a location tuple (`('train', 'num_workers', 'int')`),
which for a union holds the tag of each member tried. Walking the annotations of the section
classes along that location turns it into the key a user writes (`train.num_workers`), the
choices of a `Literal`, the whole range of an `Interval` and, for an unknown key, the keys that
would have been accepted.
"""

from __future__ import annotations

import dataclasses
import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from annotated_types import Interval
from pydantic import ValidationError

from l2rclip.config.fields import describe_interval

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

TYPE_NAMES = {
    "int_type": "int",
    "int_parsing": "int",
    "int_from_float": "int",
    "float_type": "float",
    "float_parsing": "float",
    "string_type": "str",
    "bool_type": "bool",
    "bool_parsing": "bool",
    "tuple_type": "a list",
    "list_type": "a list",
}
RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
MAPPING_ERRORS = ("dataclass_type", "dataclass_exact_type", "dict_type", "model_type")
UNKNOWN_KEY_ERRORS = ("unexpected_keyword_argument", "extra_forbidden")
SHOWN = 5  # problems spelled out in one message; the rest are counted


@dataclasses.dataclass
class _Place:
    """Where a location tuple points: the dotted key and what the schema says about it."""

    key: str = ""
    annotation: Any = None  # the field's annotation (None for an unknown key)
    section: Any = None  # the dataclass holding the key
    union_key: str | None = None  # the key at which a union member was tried


def describe(error: ValidationError, cls: type, prefix: str = "") -> str:
    """Every problem of `error` (raised validating `cls`) in one line, keys prefixed by `prefix`."""
    problems: dict[str, list[str]] = {}  # key -> what each union member expected
    found: dict[str, str] = {}
    whole: list[str] = []  # problems that are a complete sentence already
    places = [(item, _locate(cls, item["loc"], prefix)) for item in error.errors(include_url=False)]
    deeper = {p.union_key for _, p in places if p.union_key is not None and p.key != p.union_key}
    for item, place in places:
        if place.union_key in deeper and place.key == place.union_key:
            continue  # the container matched a member; the problem is inside it, reported below
        expected = _expected(item, place)
        if expected is None:
            whole.append(_sentence(item, place))
            continue
        problems.setdefault(place.key, []).append(expected)
        found[place.key] = _show(_found(item["input"], place, item["type"]))
    lines = whole + [
        f"'{key}': expected {_either(options)}, found {found[key]}" for key, options in problems.items()
    ]
    more = f" (and {len(lines) - SHOWN} more problems)" if len(lines) > SHOWN else ""
    return "; ".join(lines[:SHOWN]) + more


def _locate(cls: type, loc: tuple[Any, ...], prefix: str) -> _Place:
    place = _Place(key=prefix, annotation=cls)
    for part in loc:
        base = _base(place.annotation)
        if isinstance(part, int) and get_origin(base) is tuple:
            place.key, place.annotation = f"{place.key}[{part}]", get_args(base)[0]
        elif dataclasses.is_dataclass(base) and part in {f.name for f in dataclasses.fields(base)}:
            place.section, place.key = base, _join(place.key, part)
            place.annotation = get_type_hints(base, include_extras=True)[part]
        elif get_origin(base) in (Union, types.UnionType):
            place.union_key, place.annotation = place.key, _member(base, str(part))
        else:  # a key the section does not have
            place.section = base if dataclasses.is_dataclass(base) else None
            place.key, place.annotation = _join(place.key, str(part)), None
    return place


def _expected(item: ErrorDetails, place: _Place) -> str | None:
    """What the schema expected at this place, or None when the problem is a sentence of its own."""
    kind = item["type"]
    if kind in TYPE_NAMES:
        return TYPE_NAMES[kind]
    if kind == "literal_error":
        choices = get_args(_base(place.annotation))
        if not choices:  # not found in the annotations: pydantic's own wording ("'a' or 'b'")
            return f"one of {item['ctx']['expected']}"
        return "one of " + ", ".join(repr(c) for c in choices) if len(choices) > 1 else repr(choices[0])
    if kind in RANGE_ERRORS:
        bound = _interval(place.annotation) or Interval(**{k[:2]: v for k, v in item["ctx"].items()})
        return f"a value {describe_interval(bound)}"
    return None


def _sentence(item: ErrorDetails, place: _Place) -> str:
    kind, where = item["type"], place.key or "<top level>"
    if kind in UNKNOWN_KEY_ERRORS:
        known = sorted(f.name for f in dataclasses.fields(place.section)) if place.section else []
        return f"unknown key '{place.key}'; expected one of: {', '.join(known)}"
    if kind in MAPPING_ERRORS:
        return f"{where}: expected a mapping, found {type(item['input']).__name__} {_show(item['input'])}"
    if kind == "value_error":  # a rule of the section (a model or field validator): its own words
        message = str(item["ctx"]["error"])
        return f"'{place.key}': {message}" if place.key else message
    return f"'{where}': {item['msg']}, found {_show(item['input'])}"


def _found(value: Any, place: _Place, kind: str) -> Any:
    """The value as the schema reads it: an int given for a float key is that float (0 -> 0.0)."""
    numeric = isinstance(value, int) and not isinstance(value, bool)
    return float(value) if kind in RANGE_ERRORS and numeric and _base(place.annotation) is float else value


def _base(annotation: Any) -> Any:
    """The annotation without `Annotated` metadata and without the `None` of an optional key."""
    if get_origin(annotation) is Annotated:
        return _base(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _base(members[0]) if len(members) == 1 else Union[tuple(members)]  # noqa: UP007
    return annotation


def _member(union: Any, tag: str) -> Any:
    """The union member pydantic tried under `tag` ('int', "literal['auto']", 'tuple[str, ...]')."""
    for member in get_args(union):
        base = _base(member)
        kind = "literal" if get_origin(base) is Literal else getattr(get_origin(base) or base, "__name__", "")
        if kind and tag.startswith(kind):
            return member
    return None


def _interval(annotation: Any) -> Interval | None:
    if get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Interval)), None)
    if get_origin(annotation) in (Union, types.UnionType):  # an optional key: the range of its value
        return next(filter(None, (_interval(a) for a in get_args(annotation))), None)
    return None


def _either(options: list[str]) -> str:
    options = list(dict.fromkeys(options))
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
