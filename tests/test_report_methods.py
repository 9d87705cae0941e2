"""The report with the methods of ablations/methods.toml, and a store of a kdbench without method-owned hyperparameters."""

from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import test_report
from test_report import ENVIRONMENT, complexity, result

from kdbench.methods import METHODS, get_method
from kdbench.report import build_report
from kdbench.sweep.ablation import apply_overrides, load_raw, parse_ablation, resolve_path
from kdbench.sweep.plan import plan_trials
from kdbench.sweep.store import STORE_FILE, Store

SHRINK = ['grid.datasets=["eurosat"]', "grid.seeds=[0,1]", "data.resolution=32", "data.images_per_class=20"]


@pytest.fixture(autouse=True)
def _accuracies(monkeypatch):
    for i, name in enumerate(("dkd", "dist", "lskd")):
        monkeypatch.setitem(test_report.METHOD_ACCURACY, name, 0.83 + 0.01 * i)


def store_and_report(out, raw) -> pd.DataFrame:
    trials = plan_trials(parse_ablation(raw, "methods"))
    store = Store(out / STORE_FILE)
    sweep_id = store.begin_sweep(raw["name"], "ablations/methods.toml", raw, trials, ENVIRONMENT)
    for trial in trials:
        store.record_done(trial.key, result(trial), complexity(trial))
    store.finish_sweep(sweep_id, {"total": len(trials), "done": len(trials), "failed": 0, "already": 0, "wall_s": 1.0})
    store.close()
    build_report(out)
    return pd.read_csv(out / "tables" / "accuracy.csv")


def test_table_1_and_findings_list_every_method_at_its_default_point(tmp_path):
    raw = apply_overrides(load_raw(resolve_path("methods")), [*SHRINK, "grid.dkd.beta=[2.0,8.0]"])
    table = store_and_report(tmp_path, raw)
    assert table["method"].tolist() == list(METHODS)  # all seven students and the teacher, in registry order
    assert table["n"].eq(2).all() and table["planned"].eq(2).all()  # dkd's beta = 2 trials are not its default
    md = (tmp_path / "report.md").read_text()
    students = [get_method(m).label for m in METHODS if m not in ("teacher", "baseline")]
    findings = md[md.index("Findings") :].split("\n\n")[1]
    assert all(label in findings for label in students)
    assert "DKD: alpha 1, beta 8, temperature 4; DIST: beta 2, gamma 2, temperature 4" in md
    assert "DKD grid: beta ∈ {2, 8}." in md
    trials = pd.read_csv(tmp_path / "tables" / "trials.csv")
    dkd = trials[trials["method"] == "dkd"]
    assert sorted(dkd["settings"]) == ["alpha 1, beta 2, temperature 4"] * 2 + ["alpha 1, beta 8, temperature 4"] * 2
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
