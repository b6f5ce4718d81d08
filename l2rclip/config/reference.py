"""The key-by-key reference of params.yaml in markdown, rendered from its JSON Schema.

docs/configuration.md holds this between `<!-- params-reference:start/end -->` markers
(`l2rclip config reference --write docs/configuration.md`), and a test keeps it equal to what the
schema says, so the page, the editor's hover text and the loader never disagree.
"""

from __future__ import annotations

import json
from typing import Any

from l2rclip.config.loading import json_schema

MARKER = "params-reference"


def markdown_reference() -> str:
    """One table per section (nested sections after their parent): key, value, default, meaning."""
    schema = json_schema()
    definitions = schema["$defs"]
    parts: list[str] = []

    def section(name: str, node: dict[str, Any]) -> None:
        rows, nested = [], []
        for key, prop in node["properties"].items():
            target = _section_ref(prop)
            if target:
                nested.append((f"{name}.{key}" if name else key, definitions[target]))
                meaning = _cell(prop.get("description", ""))
                rows.append(f"| `{key}` | section, see `{nested[-1][0]}` | | {meaning} |")
                continue
            default = json.dumps(prop["default"]) if "default" in prop else ""
            rows.append(f"| `{key}` | {_value(prop)} | `{default}` | {_cell(prop.get('description', ''))} |")
        title = f"`{name}`" if name else "top level"
        intro = " ".join(node.get("description", "").split("\n\n")[0].split())  # the first paragraph
        parts.append(
            f"### {title}\n\n{intro}\n\n| key | value | default | what it sets |\n|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
        for child, definition in nested:
            section(child, definition)

    section("", schema)
    return "\n".join(parts)


def _section_ref(prop: dict[str, Any]) -> str | None:
    ref = prop.get("$ref") or next((a["$ref"] for a in prop.get("allOf", []) if "$ref" in a), None)
    return ref.rsplit("/", 1)[1] if ref else None


def _value(prop: dict[str, Any]) -> str:
    """What a key admits, in words: `integer >= 1`, `list of number > 0 and < 1`, `a` or `b` (as a table cell)."""
    if "anyOf" in prop:
        return " or ".join(_value(option) for option in prop["anyOf"])
    if "enum" in prop or "const" in prop:
        return " \\| ".join(f"`{choice}`" for choice in prop.get("enum", [prop.get("const")]))
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_value(prop.get('items', {}))}"
    bounds = [
        f"{symbol} {prop[key]}"
        for key, symbol in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if key in prop
    ]
    return f"{kind} {' and '.join(bounds)}".strip() if kind != "null" else "`null`"


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")
