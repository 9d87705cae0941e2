"""The report with the methods of ablations/methods.toml, and a store of a kdbench without method-owned hyperparameters."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import test_report
from test_report import store_and_report

from kdbench.methods import METHODS, get_method
from kdbench.report import build_report
from kdbench.sweep.ablation import apply_overrides, load_raw, resolve_path
from kdbench.sweep.store import STORE_FILE

SHRINK = ['grid.datasets=["eurosat"]', "grid.seeds=[0,1]", "data.resolution=32", "data.images_per_class=20"]


@pytest.fixture(autouse=True)
def _accuracies(monkeypatch):
    for i, name in enumerate(("dkd", "dist", "lskd", "fitnet", "at", "rkd", "crd", "reviewkd")):
        monkeypatch.setitem(test_report.METHOD_ACCURACY, name, 0.83 + 0.01 * i)


def test_table_1_and_findings_list_every_method_at_its_default_point(tmp_path):
    raw = apply_overrides(load_raw(resolve_path("methods")), [*SHRINK, "grid.dkd.beta=[2.0,6.0]"])
    table = store_and_report(tmp_path, raw)
    assert table["method"].tolist() == ["teacher", *METHODS]  # the teacher, then all twelve students in registry order
    assert table["n"].eq(2).all() and table["planned"].eq(2).all()  # dkd's beta = 2 trials are not its default (6, methods.toml)
    md = (tmp_path / "report.md").read_text()
    students = [get_method(m).label for m in METHODS if m != "baseline"]
    findings = md[md.index("Findings") :].split("\n\n")[1]
    assert all(label in findings for label in students)
    assert "DKD: alpha 1, beta 6, temperature 4; DIST: beta 2, gamma 2, temperature 4" in md
    assert "DKD grid: beta ∈ {2, 6}." in md
    trials = pd.read_csv(tmp_path / "tables" / "trials.csv")
    dkd = trials[trials["method"] == "dkd"]
    assert sorted(dkd["settings"]) == ["alpha 1, beta 2, temperature 4"] * 2 + ["alpha 1, beta 6, temperature 4"] * 2
    assert dkd["default"].tolist().count(True) == 2


def test_a_store_without_the_params_column_still_loads(tmp_path):
    raw = apply_overrides(load_raw(resolve_path("paper")), SHRINK)
    before = store_and_report(tmp_path, raw)
    db = sqlite3.connect(tmp_path / STORE_FILE)
    db.execute("ALTER TABLE trials DROP COLUMN params")  # as a store of an older kdbench
    db.commit()
    db.close()
    (tmp_path / "report.md").unlink()
    build_report(tmp_path)
    assert (tmp_path / "report.md").exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "tables" / "accuracy.csv"), before)
