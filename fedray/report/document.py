"""The report's document model (paragraphs, tables, figures, sections) and its two
renderings: one self-contained HTML file (figures embedded as base64 PNGs) and Markdown
(figures linked beside it)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np



@dataclass
class Text:
    """A paragraph; `alert` renders it in red (HTML) or bold with a warning sign (Markdown)."""

    text: str
    alert: bool = False


@dataclass
class Table:
    """A plain table; `alert_cells` (row, column) are shown in red, for values that must be 0."""

    headers: list[str]
    rows: list[list[str]]
    alert_cells: set[tuple[int, int]] = field(default_factory=set)


@dataclass
class Figure:
    """A PNG already written to disk; HTML embeds its bytes, Markdown links its file name."""

    path: Path
    caption: str


Block = Text | Table | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block]


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;
text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}
.alert{color:#b00000;font-weight:bold}td.alert{background:#ffe0e0}
figure{margin:1em 0}figcaption{color:#555;font-size:90%}img{max-width:100%}
"""


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        cls = ' class="alert"' if block.alert else ""
        return f"<p{cls}>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
        alert = ' class="alert"'
        body = "".join(
            "<tr>" + "".join(
                f"<td{alert if (i, j) in block.alert_cells else ''}>{html.escape(cell)}</td>"
                for j, cell in enumerate(row)) + "</tr>"
            for i, row in enumerate(block.rows))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    caption = html.escape(block.caption)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"**⚠ {block.text}**" if block.alert else block.text
    if isinstance(block, Table):
        def cell(i: int, j: int, text: str) -> str:
            return f"**{_md_cell(text)}**" if (i, j) in block.alert_cells else _md_cell(text)
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---" for _ in block.headers) + "|"]
        lines += ["| " + " | ".join(cell(i, j, c) for j, c in enumerate(row)) + " |"
                  for i, row in enumerate(block.rows)]
        return "\n".join(lines)
    return f"![{block.caption}]({block.path.name})"


def render_html(title: str, sections: Iterable[Section]) -> str:
    body = "".join(f"<section><h2>{html.escape(s.title)}</h2>"
                   + "".join(_html_block(b) for b in s.blocks) + "</section>" for s in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def render_markdown(title: str, sections: Iterable[Section]) -> str:
    parts = [f"# {title}"]
    for s in sections:
        parts.append(f"## {s.title}")
        parts.extend(_md_block(b) for b in s.blocks)
    return "\n\n".join(parts) + "\n"


def _write(out_dir: Path, stem: str, title: str, sections: list[Section]) -> tuple[Path, Path]:
    html_path, md_path = out_dir / f"{stem}.html", out_dir / f"{stem}.md"
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections), encoding="utf-8")
    return html_path, md_path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
