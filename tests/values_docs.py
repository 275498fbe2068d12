"""The documentation of the chart's ``values.yaml``: every value has a helm-docs ``# --`` comment, and the
chart README's values table is generated from them. Used by tests/test_deploy_chart.py.

Run as a script to print the chart README's values table, or to rewrite it in the README:
    .venv/bin/python tests/values_docs.py values-table
    .venv/bin/python tests/values_docs.py update-readme
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "segprop"

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:'\"-][^:]*?|\"[^\"]+\"|'[^']+'):(?:\s|$)")
DOC_START = re.compile(r"^\s*# -- ?(?P<text>.*)$")
COMMENT = re.compile(r"^\s*#(?P<text>.*)$")
# helm-docs' type hint at the start of a description: `# -- (int) ...`.
TYPE_HINT = re.compile(r"^\((?P<type>[a-z]+)\)\s*")


def documented_keys(values_text: str) -> dict[tuple[str, ...], str]:
    """Key path -> description, for every key preceded by a ``# --`` comment (helm-docs style).

    Keys inside list items are not keys of the values (they belong to list entries) and are
    skipped; a ``# --`` comment runs until the key line, continuing over further ``#`` lines.
    """
    docs: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    list_indent: int | None = None
    for line in values_text.splitlines():
        if not line.strip():
            pending = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        if list_indent is not None and (indent > list_indent or line.lstrip().startswith("- ")):
            continue
        list_indent = None
        start, comment = DOC_START.match(line), COMMENT.match(line)
        if start:
            pending = [start["text"].strip()]
            continue
        if comment:
            if pending is not None:
                pending.append(comment["text"].strip())
            continue
        if line.lstrip().startswith("- "):
            list_indent = indent
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match["key"].strip("\"'")
        stack.append((indent, key))
        if pending is not None:
            docs[tuple(k for _, k in stack)] = " ".join(p for p in pending if p)
        pending = None
    return docs


def all_keys(values: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path of a values mapping (not descending into lists)."""
    if isinstance(values, dict):
        for key, value in values.items():
            path = prefix + (str(key),)
            yield path
            yield from all_keys(value, path)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema that declares ``path`` as a field (through ``properties``, or through
    ``additionalProperties`` of a structured type such as a worker group); None when the path is
    content of a free-form map (labels, nodeSelector, ...)."""
    node = schema
    for part in path:
        node = _resolve(schema, node)
        if part in node.get("properties", {}):
            node = node["properties"][part]
            continue
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and "properties" in _resolve(schema, extra):
            node = extra
            continue
        return None
    return _resolve(schema, node)


def values_doc_errors(values_text: str, schema: dict[str, Any]) -> list[str]:
    """Keys of values.yaml that the schema declares but that no ``# --`` comment covers, and
    schema fields missing from values.yaml.

    A key is covered by its own comment, by being a section whose keys have comments, or by lying
    inside a documented key that is a row of the table (no documented key below it: the row shows
    its whole default). The run config (``config``) is documented by segprop's own schema.
    """
    values, docs = yaml.safe_load(values_text), documented_keys(values_text)
    rows = {path for path in docs if not _has_docs_below(path, docs)}
    errors = []
    for path in all_keys(values):
        if path[0] == "config" or schema_node(schema, path) is None:
            continue
        covered = path in docs or _has_docs_below(path, docs) or any(path[:i] in rows for i in range(1, len(path)))
        if not covered:
            errors.append(f"{'.'.join(path)}: no '# --' comment")
    for path in [()] + list(all_keys(values)):
        node = schema_node(schema, path) if path else schema
        value = _get(values, path)
        if path[:1] == ("config",) or node is None or not isinstance(value, dict):
            continue
        missing = set(node.get("properties", {})) - set(value)
        errors += [f"{'.'.join(path + (key,))}: in values.schema.json, not in values.yaml" for key in sorted(missing)]
    return errors


def _has_docs_below(path: tuple[str, ...], docs: Iterable[tuple[str, ...]]) -> bool:
    return any(len(other) > len(path) and other[: len(path)] == path for other in docs)


def _get(values: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        values = values[part]
    return values


def values_table(values_text: str) -> str:
    """The README's values table (helm-docs layout) from values.yaml and its ``# --`` comments."""
    values, docs = yaml.safe_load(values_text), documented_keys(values_text)
    rows = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for path, text in docs.items():
        value = _get(values, path)
        default = "see below" if _has_docs_below(path, docs) else _default_cell(value)
        hint = TYPE_HINT.match(text)
        kind, text = (hint["type"], text[hint.end() :]) if hint else (_type_name(value), text)
        rows.append(f"| {'.'.join(path)} | {kind} | {default} | {text.replace('|', '&#124;')} |")
    return "\n".join(rows)


def _type_name(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _default_cell(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > 100:
        return "see values.yaml"
    return f"`{text}`".replace("|", "&#124;")


README_TABLE_START = "<!-- values-table:start -->"
README_TABLE_END = "<!-- values-table:end -->"


def readme_table(readme_text: str) -> str:
    """The table between the README's values-table markers."""
    start = readme_text.index(README_TABLE_START) + len(README_TABLE_START)
    return readme_text[start : readme_text.index(README_TABLE_END)].strip()


def main(argv: list[str]) -> int:
    table = values_table((CHART_DIR / "values.yaml").read_text())
    if argv[1:] == ["values-table"]:
        print(table)
        return 0
    if argv[1:] == ["update-readme"]:
        readme = CHART_DIR / "README.md"
        text = readme.read_text()
        start = text.index(README_TABLE_START) + len(README_TABLE_START)
        readme.write_text(f"{text[:start]}\n{table}\n{text[text.index(README_TABLE_END):]}")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
