"""Integration: the CLIs end to end on the real land-use datasets ($KDBENCH_DATA, ../shared/datasets in CI).

Sized for a 2-core CPU: a few images per class at 32 px and one or two epochs. They check
the pipeline on real files (JPEG decoding, class folders, splits, VGG16 teacher, logit cache,
KD student, store, report), not accuracy.
"""

import json
import sqlite3

import pytest
from conftest import run_cli

from kdbench.records import TrialResult, from_json

pytestmark = pytest.mark.integration


def test_teacher_and_kd_student_train_on_eurosat(shared_data, tmp_path):
    common = [
        "--dataset",
        "eurosat",
        "--data-root",
        str(shared_data),
        "--resolution",
        "32",
        "--images-per-class",
        "8",
        "--batch-size",
        "16",
    ]
    teacher = run_cli(
        "kdbench.train",
        *common,
        "--model",
        "vgg16",
        "--epochs",
        "1",
        "--lr",
        "0.005",
        "--allow-chance-teacher",  # one epoch of VGG16 learns little: this checks the pipeline, not accuracy
        "--out",
        str(tmp_path / "teacher"),
    )
    assert teacher.returncode == 0, teacher.stderr
    student = run_cli(
        "kdbench.train",
        *common,
        "--teacher",
        str(tmp_path / "teacher" / "best.pt"),
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "kd"),
    )
    assert student.returncode == 0, student.stderr
    result = from_json(TrialResult, (tmp_path / "kd" / "metrics.json").read_text(), "metrics.json")
    assert result.classes[:2] == ("AnnualCrop", "Forest") and len(result.classes) == 10
    assert result.data["train"] + result.data["val"] + result.data["test"] == 80
    assert result.teacher["mode"] == "cache" and result.teacher["model"] == "vgg16"
    manifest = (tmp_path / "kd" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,class,split" and len(manifest) == 81
    path, cls, split = manifest[1].split(",")
    assert path.startswith("AnnualCrop/") and path.endswith(".jpg") and cls == "AnnualCrop" and split in ("train", "val", "test")


def test_sweep_over_the_three_datasets_with_report(shared_data, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli(
        "kdbench.sweep",
        "--data-root",
        str(shared_data),
        "--out",
        str(out),
        "--set",
        "data.images_per_class=6",
        "--set",
        "teacher.epochs=1",
        "--set",
        "student.epochs=1",
        "--set",
        "teacher.model='vgg16'",
        "--set",
        "teacher.lr=0.005",
        "--set",
        "run.allow_chance_teacher=true",  # one epoch of VGG16 learns little: this checks the pipeline, not accuracy
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "trials: 15 total, 15 done, 0 failed, 0 already done"
    db = sqlite3.connect(out / "store.sqlite")
    rows = db.execute("SELECT dataset, role || ':' || method, status, completions, complexity FROM trials").fetchall()
    methods = ("teacher:baseline", "student:baseline", "student:kd_kl", "student:kd_cos", "student:kd_kl_cos")
    assert {(r[0], r[1]) for r in rows} == {(d, m) for d in ("eurosat", "ucmerced", "rsscn7") for m in methods}
    assert all(r[2] == "done" and r[3] == 1 for r in rows)
    complexity = {r[1]: json.loads(r[4]) for r in rows if r[0] == "ucmerced"}
    assert (
        complexity["teacher:baseline"]["params_total"] == 134_346_581
        and complexity["student:baseline"]["params_total"] == 2_250_773
    )
    assert (out / "report.md").exists() and (out / "report.pdf").read_bytes()[:4] == b"%PDF"
