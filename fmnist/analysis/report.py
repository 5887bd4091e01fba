"""Report rendering shared by every flow: markdown tables and a small markdown-to-HTML converter.

Pure functions over plain rows and strings; the flows log what they return. Every markdown table
of the package (the search table, the EDA summary, the comparison report) is drawn by
``markdown_table``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

HTML_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
)


def format_cell(value: Any, pattern: str | None = None) -> str:
    """A table cell: None prints empty, a string as it is, anything else through ``pattern``."""
    if value is None:
        return ""
    if pattern is None or isinstance(value, str):
        return str(value)
    return pattern.format(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], formats: Mapping[str, str] | None = None
) -> str:
    """A markdown table with one column per key of the first row (None prints empty).

    ``formats`` maps a column to a format pattern (``"{:.4f}"``) for its non-string values, so a
    caller can mix numbers with cells it wrote itself (``"0.90"``) in one column.
    """
    if not rows:
        return ""
    formats = formats or {}
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format_cell(row.get(c), formats.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_cells(line: str) -> list[str]:
    return [html.escape(cell.strip()) for cell in line.strip("|").split("|")]


def markdown_to_html(markdown: str, title: str = "fmnist report") -> str:
    """A small converter for headings, tables, bullet lists and paragraphs (one line each)."""
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{HTML_STYLE}</style></head><body>"
    ]
    in_table = in_list = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = table_cells(line)
            if set("".join(cells)) <= set("-"):
                continue  # the header's separator row
            tag = "td" if in_table else "th"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{html.escape(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    out.append("</table>" if in_table else "")
    out.append("</ul>" if in_list else "")
    out.append("</body></html>")
    return "\n".join(out)
