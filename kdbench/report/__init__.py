"""The report of a sweep: ``report.md``, ``report.pdf``, tables as CSV and figures as PNG/SVG.

``build_report(out_dir)`` reads the latest sweep of ``out_dir/store.sqlite`` (and
``out_dir/bench.json`` when present) and writes, under ``out_dir``:

- ``report.md`` and ``report.pdf`` (A4, typeset with WeasyPrint from the same content);
- ``tables/<name>.csv`` for every table;
- ``figures/<name>.png`` and ``.svg`` for every figure.

Tables and figures an earlier report wrote but this one does not are removed.  The
output depends only on the store and ``bench.json``: no generation time is written,
and rebuilding gives byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

from kdbench.report.content import build_tables, draw_figures, report_blocks
from kdbench.report.document import to_html, to_markdown, write_pdf
from kdbench.report.load import load_report_data

__all__ = ["build_report"]


def build_report(out_dir: str | Path) -> list[Path]:
    """Write the report of ``out_dir``'s latest sweep; returns the paths of ``report.md`` and ``report.pdf``."""
    out_dir = Path(out_dir)
    data = load_report_data(out_dir)
    tables = build_tables(data)
    (out_dir / "tables").mkdir(exist_ok=True)
    for table in tables.values():
        table.data.to_csv(out_dir / "tables" / f"{table.name}.csv", index=False)
    figures = draw_figures(data, tables, out_dir / "figures")
    _remove_stale(out_dir / "tables", {f"{name}.csv" for name in tables})
    _remove_stale(out_dir / "figures", {f"{stem}.{ext}" for stem in figures for ext in ("png", "svg")})
    blocks = report_blocks(data, tables, figures)
    md, pdf = out_dir / "report.md", out_dir / "report.pdf"
    md.write_text(to_markdown(blocks))
    write_pdf(to_html(blocks, f"kdbench report: {data.sweep['name']}", out_dir), pdf, data.sweep["started_at"])
    return [md, pdf]


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete the CSV, PNG and SVG files in ``folder`` that are not in ``keep`` (left by an earlier report)."""
    for path in folder.glob("*"):
        if path.suffix in (".csv", ".png", ".svg") and path.name not in keep:
            path.unlink()
