"""The value types of params.yaml keys: strict scalars and the ranges numbers must lie in.

A params file is checked by pydantic against these annotations (l2rclip.config.loading). The
scalars are strict, as YAML is typed: `epochs: "10"` or `amp: 1` is a mistake to report, not to
convert (an integer is still a valid float: `lr: 1` is 1.0). A range is an `Interval` in the
annotation, so that the check, the error message and the JSON Schema all read the same bound.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Interval
from pydantic import ConfigDict, Strict


class ConfigError(ValueError):
    """A params file or mapping does not match the expected schema."""


# Every section: an unknown key is an error; attribute docstrings become the JSON Schema's
# descriptions (what an editor shows on hover).
SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True)

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict still takes an int (1 -> 1.0), never a text or a bool
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]

Count = Annotated[int, Strict(), Interval(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Interval(ge=0)]
NonNegative = Annotated[float, Strict(), Interval(ge=0)]
Positive = Annotated[float, Strict(), Interval(gt=0)]
Probability = Annotated[float, Strict(), Interval(gt=0, lt=1)]  # open at both ends (conformal alpha)


def describe_interval(interval: Interval) -> str:
    """'>= 1', '> 0', 'in [0, 0.5]', 'in (0, 1)': the range as error messages state it."""
    low, low_open = (interval.ge, False) if interval.ge is not None else (interval.gt, True)
    high, high_open = (interval.le, False) if interval.le is not None else (interval.lt, True)
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
