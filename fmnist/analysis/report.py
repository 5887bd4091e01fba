"""Markdown tables (every table of the package: the search table, the EDA summary, the comparison)
and a small markdown-to-HTML converter for the reports."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

HTML_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], formats: Mapping[str, str] | None = None
) -> str:
    """A markdown table with one column per key of the first row. ``formats`` maps a column to a
    pattern (``"{:.4f}"``) for its values, except strings (kept) and None (an empty cell)."""
    if not rows:
        return ""

    def cell(value: Any, pattern: str | None) -> str:
        plain = value is None or pattern is None or isinstance(value, str)
        return ("" if value is None else str(value)) if plain else pattern.format(value)

    columns, formats = list(rows[0]), formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown: str, title: str = "fmnist report") -> str:
    """A small converter for headings, tables, bullet lists and paragraphs (one line each)."""
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{HTML_STYLE}</style></head><body>"
    ]
    block, header = None, False  # the open "table" or "ul", and whether its next row heads it
    for line in markdown.splitlines():
        kind = "table" if line.startswith("|") else "ul" if line.startswith("- ") else None
        if block != kind:
            out += ([f"</{block}>"] if block else []) + ([f"<{kind}>"] if kind else [])
            block, header = kind, True
        if kind == "table":
            cells = [html.escape(cell.strip()) for cell in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue  # the header's separator row
            tag, header = ("th" if header else "td"), False
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
        elif kind == "ul":
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join([*out, f"</{block}>" if block else "", "</body></html>"])
