"""RankSpace: the one place that maps label <-> rank index <-> numeric value <-> name.

Datasets speak in labels (an age 23, a decade 1950, an Adience group "(25, 32)"); the model
speaks in rank indices 0..M-1; metrics speak in numeric values (MAE in years); prompts speak in
names ("twenty-three", "1950s"). Keeping every conversion here means offsets such as
"age - 16" never appear anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from num2words import num2words

from l2rclip.config import RanksConfig


class RankError(ValueError):
    """A label, index or definition that does not fit the rank space."""


def number_words(value: float) -> str:
    """English words for a number: 23 -> "twenty-three", 2.5 -> "two point five"."""
    return num2words(int(value)) if float(value).is_integer() else num2words(value)


@dataclass(frozen=True)
class RankSpace:
    """M ordered ranks, each with a label (as found in data), a numeric value and a name.

    Args:
        labels: the labels in rank order (ints or strings); must be unique.
        values: numeric value per rank, strictly increasing; default: the labels themselves.
        names: prompt text per rank; default: number words of the values.
    """

    labels: tuple[Any, ...]
    values: tuple[float, ...]
    names: tuple[str, ...]

    def __init__(
        self, labels: Sequence[Any], values: Sequence[float] | None = None, names: Sequence[str] | None = None
    ):
        labels = tuple(labels)
        if len(labels) < 2:
            raise RankError(f"a rank space needs at least 2 ranks, found {len(labels)}: {labels!r}")
        if len(set(labels)) != len(labels):
            dupes = sorted({str(x) for x in labels if labels.count(x) > 1})
            raise RankError(f"rank labels must be unique, found repeated: {', '.join(dupes)}")
        if values is None:
            try:
                values = [float(x) for x in labels]
            except (TypeError, ValueError):
                raise RankError(f"labels {labels!r} are not numeric: give `values` for them") from None
        values = tuple(float(v) for v in values)
        if len(values) != len(labels):
            raise RankError(f"expected {len(labels)} values (one per label), found {len(values)}")
        if any(b <= a for a, b in zip(values, values[1:], strict=False)):
            raise RankError(f"rank values must increase strictly, found {values!r}")
        names = tuple(number_words(v) for v in values) if names is None else tuple(map(str, names))
        if len(names) != len(labels):
            raise RankError(f"expected {len(labels)} names (one per label), found {len(names)}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_columns", self._probability_columns(labels))

    @classmethod
    def from_config(cls, config: RanksConfig) -> RankSpace:
        """Build from the `ranks` section of params.yaml."""
        if config.labels is not None:
            labels: tuple[Any, ...] = config.labels
        elif config.start is not None and config.stop is not None:
            if config.stop <= config.start:
                raise RankError(f"ranks.stop ({config.stop}) must be above ranks.start ({config.start})")
            labels = tuple(range(config.start, config.stop + 1))
        else:
            raise RankError("ranks: expected either `labels` or both `start` and `stop`")
        space = cls(labels, config.values)
        if isinstance(config.names, str):
            base = {"words": space.names, "labels": tuple(str(x) for x in labels)}.get(config.names)
            if base is None:
                raise RankError(f"ranks.names: expected 'words', 'labels' or a list, found {config.names!r}")
        else:
            base = config.names
        return cls(labels, space.values, [config.name_format.format(n) for n in base])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankSpace:
        """Inverse of `to_dict` (for checkpoints and model files)."""
        return cls(data["labels"], data["values"], data["names"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"labels": list(self.labels), "values": list(self.values), "names": list(self.names)}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def value_array(self) -> np.ndarray:
        """Values as a float array, shape (M,)."""
        return np.asarray(self.values, dtype=np.float64)

    def _lookup(self) -> dict[Any, int]:
        # Labels read from CSV files arrive as strings or numpy scalars; normalise both sides.
        # Built once per space (validation asks once per row: 55,134 rows for MORPH).
        lookup = self.__dict__.get("_by_key")
        if lookup is None:
            lookup = {self._key(label): i for i, label in enumerate(self.labels)}
            object.__setattr__(self, "_by_key", lookup)
        return lookup

    @staticmethod
    def _key(label: Any) -> Any:
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            return int(label)
        if isinstance(label, (float, np.floating)) and float(label).is_integer():
            return int(label)
        if isinstance(label, str):
            text = label.strip()
            try:
                number = float(text)
            except ValueError:
                return text
            return int(number) if number.is_integer() else number
        return label

    def index_of(self, label: Any) -> int:
        """Rank index of one label; a label outside the space is an error that lists the range."""
        index = self._lookup().get(self._key(label))
        if index is None:
            raise RankError(f"label {label!r} is not a rank: expected one of {self.describe()}")
        return index

    def indices(self, labels: Iterable[Any]) -> np.ndarray:
        """Rank indices of many labels, shape (N,)."""
        lookup = self._lookup()
        out = []
        for row, label in enumerate(labels):
            index = lookup.get(self._key(label))
            if index is None:
                raise RankError(f"row {row}: label {label!r} is not a rank: expected one of {self.describe()}")
            out.append(index)
        return np.asarray(out, dtype=np.int64)

    def contains(self, label: Any) -> bool:
        """Whether `label` is one of the ranks."""
        return self._key(label) in self._lookup()

    def value_of(self, index: int | np.ndarray) -> float | np.ndarray:
        """Numeric value of rank index (or array of indices)."""
        return self.value_array[index]

    def label_of(self, index: int) -> Any:
        """Label of rank index."""
        return self.labels[index]

    def probability_columns(self) -> tuple[str, ...]:
        """Column name of each rank's probability in prediction tables: `p_<label>`, in rank order.

        Named by label, not position, so a column keeps its meaning when the rank space changes
        (age 20 is `p_20` for ranks 0..69 and 16..77 alike). In a label, every run of characters
        other than letters, digits, `.`, `+` and `-` becomes one `_`, trimmed at the ends (Adience
        "(0, 2)" -> `p_0_2`); the constructor refuses labels whose names would be empty or clash.
        """
        return self.__dict__["_columns"]

    @staticmethod
    def _probability_columns(labels: tuple[Any, ...]) -> tuple[str, ...]:
        cleaned = [re.sub(r"[^0-9A-Za-z.+-]+", "_", str(RankSpace._key(label))).strip("_") for label in labels]
        empty = [label for label, name in zip(labels, cleaned, strict=True) if not name]
        if empty:
            raise RankError(
                f"labels {empty!r} have no letter or digit: expected labels that can name "
                "a probability column p_<label>"
            )
        first: dict[str, Any] = {}
        for label, name in zip(labels, cleaned, strict=True):
            if first.setdefault(name, label) != label:
                raise RankError(
                    f"labels {first[name]!r} and {label!r} both name the probability column "
                    f"p_{name}: rename one of them"
                )
        return tuple(f"p_{name}" for name in cleaned)

    def describe(self) -> str:
        """Short human description of the labels, for error messages."""
        if len(self) > 6:
            return f"{self.labels[0]!r} .. {self.labels[-1]!r} ({len(self)} ranks)"
        return ", ".join(repr(x) for x in self.labels)
