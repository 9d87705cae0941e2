"""A report as a list of blocks, rendered to Markdown and to HTML, and typeset as an A4 PDF with WeasyPrint.

Both renderings come from the same blocks, so the Markdown and the PDF always show
the same tables, figures and notes.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kdbench.report.tables import Table


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class TableBlock:
    table: Table


@dataclass(frozen=True)
class FigureBlock:
    stem: str  # figures/<stem>.png
    caption: str
    width: int = 100  # percent of the text width in the PDF


Block = Heading | Paragraph | Bullets | TableBlock | FigureBlock

CSS = """
@page {
  size: A4;
  margin: 16mm 14mm 18mm 14mm;
  @top-right { content: string(title); font-size: 7.5pt; color: #666; }
  @bottom-center { content: counter(page) " / " counter(pages); font-size: 8pt; color: #444; }
}
body { font-size: 9pt; line-height: 1.35; color: #111; }
h1 { font-size: 16pt; margin: 0 0 6pt 0; string-set: title content(); }
h2 { font-size: 12pt; margin: 14pt 0 4pt 0; border-bottom: 0.6pt solid #999; break-after: avoid; }
h3 { font-size: 10pt; margin: 10pt 0 3pt 0; break-after: avoid; }
ul { margin: 2pt 0 6pt 0; padding-left: 14pt; }
li { margin: 1pt 0; }
table { border-collapse: collapse; width: 100%; font-size: 7.3pt; margin: 2pt 0 3pt 0; }
thead { display: table-header-group; }
th, td { padding: 1.6pt 3pt; border-bottom: 0.4pt solid #ccc; vertical-align: top; overflow-wrap: break-word; }
thead th { border-bottom: 0.9pt solid #333; text-align: left; }
tr.group th { text-align: left; background: #eee; }
td.num, th.num { text-align: right; }
tr { break-inside: avoid; }
p.note { font-size: 7.5pt; color: #333; margin: 1pt 0; }
figure { margin: 6pt 0 8pt 0; break-inside: avoid; text-align: center; }
figure img { display: block; margin: 0 auto; }
figcaption { font-size: 7.8pt; color: #333; margin-top: 3pt; text-align: left; }
"""


# --- Markdown -------------------------------------------------------------------------------------
def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown: pipe tables, images under ``figures/``."""
    parts = [_markdown(block) for block in blocks]
    return "\n\n".join(parts) + "\n"


def _md_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("*", "\\*")


def _markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {_md_text(block.text)}"
    if isinstance(block, Paragraph):
        return _md_text(block.text)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md_text(item)}" for item in block.items)
    if isinstance(block, FigureBlock):
        return f"![{_md_text(block.caption)}](figures/{block.stem}.png)\n\n*{_md_text(block.caption)}*"
    return _markdown_table(block.table)


def _markdown_table(table: Table) -> str:
    columns, rows = _table_rows(table)
    cell = lambda v: _md_text(str(v)).replace("|", "\\|")  # noqa: E731
    lines = [
        f"### {_md_text(table.title)}",
        "",
        "| " + " | ".join(map(cell, columns)) + " |",
        "|" + "---|" * len(columns),
    ]
    for group, values in rows:
        if group is not None:
            lines.append("| " + " | ".join([f"**{cell(group)}**"] + [""] * (len(columns) - 1)) + " |")
        else:
            lines.append("| " + " | ".join(map(cell, values)) + " |")
    lines += [""] + [f"*{_md_text(note)}*  " for note in table.notes]
    return "\n".join(lines).rstrip()


def _table_rows(table: Table) -> tuple[list[str], list[tuple[str | None, list[str]]]]:
    """Column names and rows, with a ``(group, [])`` row wherever the group column changes value."""
    frame = table.display
    if table.group is None:
        return list(frame.columns), [(None, list(row)) for row in frame.itertuples(index=False)]
    body, rows, current = frame.drop(columns=table.group), [], None
    for group, row in zip(frame[table.group], body.itertuples(index=False)):
        if group != current:
            rows.append((group, []))
            current = group
        rows.append((None, list(row)))
    return list(body.columns), rows


# --- HTML and PDF ---------------------------------------------------------------------------------
def to_html(blocks: list[Block], title: str, folder: Path) -> str:
    """A standalone HTML page, with the PNG figures of ``folder/figures`` embedded (so the PDF does not depend on paths)."""
    body = "\n".join(_html(block, folder) for block in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _html(block: Block, folder: Path) -> str:
    e = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{e(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, FigureBlock):
        png = base64.b64encode((folder / "figures" / f"{block.stem}.png").read_bytes()).decode()
        return (
            f'<figure><img src="data:image/png;base64,{png}" style="width: {block.width}%" alt="{e(block.caption)}">'
            f"<figcaption>{e(block.caption)}</figcaption></figure>"
        )
    return _html_table(block.table)


def _html_table(table: Table) -> str:
    e = html.escape
    columns, rows = _table_rows(table)
    numeric = [_is_numeric(table.display[c]) for c in columns]
    cls = lambda i: ' class="num"' if numeric[i] else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{e(c)}</th>" for i, c in enumerate(columns))
    body = []
    for group, values in rows:
        if group is not None:
            body.append(f'<tr class="group"><th colspan="{len(columns)}">{e(str(group))}</th></tr>')
        else:
            body.append(
                "<tr>"
                + "".join(f"<td{cls(i)}>{e(_keep_together(str(v)) if numeric[i] else str(v))}</td>" for i, v in enumerate(values))
                + "</tr>"
            )
    notes = "".join(f'<p class="note">{e(note)}</p>' for note in table.notes)
    return f"<h3>{e(table.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{notes}"


def _keep_together(cell: str) -> str:
    """Non-breaking spaces in a number cell, except before a bracketed interval or remark (``x ± s [lo, hi]``)."""
    return cell.replace(" ", "\u00a0").replace("\u00a0[", " [").replace("\u00a0(", " (")


def _is_numeric(column: pd.Series) -> bool:
    """Whether most filled cells of a display column read as numbers (or ``—``), so it is right-aligned."""
    cells = [str(v) for v in column if str(v)]
    return sum(c[:1] in "+-—0123456789" for c in cells) * 2 >= len(cells)


def write_pdf(page: str, path: Path, epoch: float) -> None:
    """Typeset the HTML ``page`` into ``path``.

    Font subsets carry a creation time (fontTools reads ``SOURCE_DATE_EPOCH``); setting it
    to ``epoch`` (the sweep's start) while typesetting makes a rebuild byte-identical.
    """
    from weasyprint import HTML

    previous = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(int(epoch))
    try:
        HTML(string=page).write_pdf(path)
    finally:
        if previous is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = previous
