"""Every committed report is recomputable from its committed results store: rebuilt into a temporary folder from
``store.sqlite`` (and ``bench.json``) alone, with no checkpoint, its tables and its markdown equal the committed ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kdbench.report import build_report
from kdbench.sweep.__main__ import main as sweep_main

REPORTS = Path(__file__).resolve().parents[1] / "reports"
COMMITTED = sorted(p.parent for p in REPORTS.glob("*/report.md"))


def test_every_committed_report_has_its_store():
    assert COMMITTED, "no committed report under reports/"
    missing = [p.name for p in COMMITTED if not (p / "store.sqlite").is_file()]
    assert not missing, f"committed reports without their store.sqlite: {missing}"
    leftovers = [p.name for p in REPORTS.glob("*/store.sqlite-*")]
    assert not leftovers, f"an uncheckpointed store was committed (its -wal/-shm files): {leftovers}"


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_a_committed_report_rebuilds_from_its_store_alone(folder: Path, tmp_path: Path):
    for name in ("store.sqlite", "bench.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, tmp_path / name)
    build_report(tmp_path)
    committed = sorted(p.name for p in (folder / "tables").glob("*.csv"))
    assert sorted(p.name for p in (tmp_path / "tables").glob("*.csv")) == committed
    for name in committed:
        assert (tmp_path / "tables" / name).read_text() == (folder / "tables" / name).read_text(), name
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()


@pytest.mark.integration
def test_the_report_and_the_dry_run_leave_a_committed_store_byte_for_byte_as_it_was(tmp_path: Path, shared_data: Path):
    committed = (REPORTS / "quick" / "store.sqlite").read_bytes()
    shutil.copy2(REPORTS / "quick" / "store.sqlite", tmp_path / "store.sqlite")
    build_report(tmp_path)
    assert sweep_main(["--config", "quick", "--dry-run", "--out", str(tmp_path), "--data-root", str(shared_data)]) == 0
    assert (tmp_path / "store.sqlite").read_bytes() == committed
    assert not (tmp_path / "store.sqlite.lock").exists(), "a reader took the writers' lock"
