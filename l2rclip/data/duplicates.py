"""Identical files under different names: found by the sha256 of their bytes, decided by policy.

Validation hashes each file's bytes while it reads them for decoding, so finding duplicates costs
no second read. The same path listed twice with two labels reaches this index too (its bytes are
the same), so `data.duplicates` decides it as it decides two names of one picture. The same
picture twice with the same label would be trained (or tested) twice; with two labels it teaches
a contradiction, and which label is right is unknown. Every row is kept
or reported, never silently merged.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

Policy = Literal["drop_conflicts", "keep_first", "fail"]
Row = dict[str, Any]


class Duplicate(NamedTuple):
    """Why a row is a duplicate; `fatal` stops validation even when bad rows are skipped."""

    reason: str
    detail: str
    fatal: bool = False


class ContentIndex:
    """The rows seen so far by content key, deciding `duplicate_content` and `conflicting_labels`.

    Args:
        policy: for the same content with another label: `drop_conflicts` keeps none of the rows,
            `keep_first` the first one, `fail` makes the later row fatal. The same content with
            the same label always keeps the first row.
    """

    def __init__(self, policy: Policy):
        self.policy = policy
        self.first: dict[tuple[str, Any], tuple[int, Row, int]] = {}
        self.conflicted: dict[int, list[int]] = {}  # first row -> later rows with other labels

    def check(self, row: int, record: Row, rank: int, key: tuple[str, Any]) -> Duplicate | None:
        """None when the content `key` (sha256, fold or None) is new (it is remembered), else why not."""
        if key not in self.first:
            self.first[key] = (row, record, rank)
            return None
        first, first_record, first_rank = self.first[key]
        same = (
            f"same path as row {first}"
            if record["path"] == first_record["path"]
            else f"same content (sha256 {key[0][:12]}) as row {first} ({first_record['path']})"
        )
        if first_rank == rank:
            return Duplicate("duplicate_content", f"{same}, same label; the first is kept")
        there = f"{same}, labelled {first_record['label']!r} there, {record['label']!r} here"
        if self.policy == "fail":
            return Duplicate(
                "conflicting_labels",
                f"{there} (data.duplicates: fail; drop_conflicts or keep_first go on)",
                fatal=True,
            )
        self.conflicted.setdefault(first, []).append(row)
        kept = "none is kept" if self.policy == "drop_conflicts" else "the first is kept"
        return Duplicate("conflicting_labels", f"{there}; {kept} (data.duplicates: {self.policy})")

    def drop_conflicts(self, good_rows: list[Row], bad_rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """With `drop_conflicts`, move the first row of each conflict from good to bad (row order kept)."""
        if self.policy != "drop_conflicts" or not self.conflicted:
            return good_rows, bad_rows
        moved = [
            {
                "row": r["row"],
                "path": r["path"],
                "label": r["label"],
                "reason": "conflicting_labels",
                "detail": f"same content as row(s) {', '.join(map(str, self.conflicted[r['row']]))} with "
                "other labels; none is kept (data.duplicates: drop_conflicts)",
            }
            for r in good_rows
            if r["row"] in self.conflicted
        ]
        kept = [r for r in good_rows if r["row"] not in self.conflicted]
        return kept, sorted(bad_rows + moved, key=lambda r: r["row"])
