"""The INT8 deployment step: quantize a trained student, agree with fp32, store, resume, skip without ONNX Runtime."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import call_main, make_image_folder

from kdbench.engine import int8 as int8_module
from kdbench.engine.int8 import INT8_FILE, INT8_ONNX, ONNXRUNTIME_MISSING, quantize_trial
from kdbench.errors import UserError
from kdbench.records import Int8Result, Int8Settings, from_json
from kdbench.sweep.__main__ import main as sweep_main
from kdbench.sweep.ablation import apply_overrides, load_raw, parse_ablation
from kdbench.sweep.plan import plan_trials
from kdbench.sweep.store import Store

pytest.importorskip("onnxruntime", reason="optional extra: pip install 'kdbench[onnx]'")

# Colour-coded classes at 32 px: MobileNetV2 from scratch learns them in a few epochs, so fp32 predictions are
# confident and the INT8 model, within its rounding, predicts the same class on nearly every test image.
ABLATION = """
name = "int8"
[grid]
datasets = ["imagefolder:{folder}"]
methods = ["baseline"]
teacher = false
seeds = [0]
[data]
resolution = 32
[student]
# ResNet-18 at lr 0.02 learns the easy task steadily (checked under ATEN_CPU_CAPABILITY default, avx2 and avx512,
# 1 and 2 threads); MobileNetV2 from scratch at 32 px in a few dozen steps is chaotic (62-67 % or a constant class,
# by kernel set and memory format), and so was ResNet-18 at lr 0.05: neither is what this test is about
model = "resnet18"
epochs = 8
batch_size = 16
lr = 0.02
[run]
device = "cpu"
[deploy]
int8 = true
calibration_images = 32
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path]:
    """(ablation file, output folder) of one finished sweep with ``[deploy] int8 = true`` (the tests copy the folder)."""
    root = tmp_path_factory.mktemp("int8")
    folder = make_image_folder(root / "data", classes=3, per_class=40, size=32)
    ablation = root / "int8.toml"
    ablation.write_text(ABLATION.format(folder=folder))
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDBENCH_CACHE", str(root / "cache"))
        mp.setenv("KDBENCH_NO_DOWNLOAD", "1")
        assert sweep_main(["--config", str(ablation), "--out", str(out), "--no-report", "--threads", "1"]) == 0
    return ablation, out


def sweep(ablation: Path, out: Path, capsys, *sets: str):
    return call_main(sweep_main, ["--config", str(ablation), "--out", str(out), "--no-report", "--threads", "1", *sets], capsys)


def the_row(out: Path) -> dict:
    (row,) = Store(out / "store.sqlite").rows()
    return row


def raw_row(out: Path) -> dict:
    db = sqlite3.connect(out / "store.sqlite")
    db.row_factory = sqlite3.Row
    (row,) = [dict(r) for r in db.execute("SELECT * FROM trials")]
    db.close()
    return row


def set_columns(out: Path, **values) -> None:
    db = sqlite3.connect(out / "store.sqlite")
    db.execute(f"UPDATE trials SET {', '.join(f'{k} = ?' for k in values)}", tuple(values.values()))
    db.commit()
    db.close()


def copy_of(swept, tmp_path) -> tuple[Path, Path]:
    import shutil

    ablation, out = swept
    shutil.copytree(out, tmp_path / "out")
    return ablation, tmp_path / "out"


def test_int8_predictions_agree_with_fp32_and_the_stored_accuracy_is_its_predictions(swept):
    _, out = swept
    row = the_row(out)
    result, int8 = row["result"], row["int8"]
    assert row["status"] == "done" and row["int8_error"] is None and isinstance(int8, Int8Result)
    fp32 = np.asarray(result.best.test.predictions)
    quantized = np.asarray(int8.test.predictions)
    targets = np.asarray(result.test_targets)
    assert len(quantized) == len(targets) == int8.test.n > 0
    assert result.best.test.accuracy >= 0.9  # the task is easy: the check below is about a model that learnt it
    assert (quantized == fp32).mean() >= 0.9  # INT8 agrees with fp32 on most test images
    assert int8.fp32_onnx_agreement >= 0.9  # the fp32 export predicts what torch predicted
    assert int8.test.accuracy == pytest.approx((quantized == targets).mean())  # stored accuracy = its predictions
    assert sum(map(sum, int8.test.confusion_matrix)) == len(targets)
    assert int8.settings == Int8Settings(calibration_images=32)
    assert int8.calibration_count == 32 and int8.key == row["key"]
    assert 0 < int8.bytes_int8 < int8.bytes_fp32 / 2  # int8 weights: about a quarter of fp32
    assert int8.quantize_s > 0 and int8.evaluate_s > 0
    folder = out / "trials" / row["key"]
    assert (folder / INT8_ONNX).stat().st_size == int8.bytes_int8
    assert from_json(Int8Result, (folder / INT8_FILE).read_text(), "int8.json") == int8


def test_deploy_does_not_change_trial_keys_and_bad_keys_are_one_line(swept):
    ablation, _ = swept
    raw = load_raw(ablation)

    def keys(raw: dict) -> list[str]:
        return [t.key for t in plan_trials(parse_ablation(raw, "x"), fingerprint=lambda d: "f")]

    assert keys(raw) == keys({k: v for k, v in raw.items() if k != "deploy"})
    for override, needle in (
        ("deploy.calibration=bogus", "deploy.calibration must be one of MinMax, Percentile, Entropy"),
        ("deploy.calibration_images=0", "deploy.calibration_images must be in [1, 10000]"),
        ("deploy.per_channel=false", "unknown key ablation.deploy.per_channel"),
    ):
        with pytest.raises(UserError, match="^" + needle.replace("[", r"\[").replace("]", r"\]")):
            parse_ablation(apply_overrides(raw, [override]), "x")


def test_killed_after_training_before_quantizing_redoes_only_the_quantization(swept, tmp_path, capsys):
    ablation, out = copy_of(swept, tmp_path)
    before = the_row(out)
    folder = out / "trials" / before["key"]
    metrics = (folder / "metrics.json").stat().st_mtime_ns
    log_lines = len((folder / "train.log").read_text().splitlines())
    # the worker wrote metrics.json, the sweep died before recording it and before the INT8 step finished
    set_columns(out, status="running", result=None, int8=None)
    for name in (INT8_FILE, INT8_ONNX):
        (folder / name).unlink()
    (folder / (INT8_ONNX + ".partial")).write_bytes(b"half a model")
    proc = sweep(ablation, out, capsys)
    assert proc.returncode == 0, proc.stderr
    assert "recovered from its metrics.json" in proc.stdout
    after = the_row(out)
    assert (folder / "metrics.json").stat().st_mtime_ns == metrics  # not trained again
    assert not any("epoch" in line for line in (folder / "train.log").read_text().splitlines()[log_lines:])
    assert after["int8"].test.predictions == before["int8"].test.predictions  # same checkpoint, same sample, same model
    assert after["int8"].settings == before["int8"].settings


def test_a_done_trial_without_int8_is_only_quantized_and_settings_changes_requantize(swept, tmp_path, capsys):
    ablation, out = copy_of(swept, tmp_path)
    key = the_row(out)["key"]
    set_columns(out, int8=None)
    proc = sweep(ablation, out, capsys)
    assert proc.stdout.strip().splitlines()[-1] == "trials: 1 total, 0 done, 0 failed, 1 already done"
    row = raw_row(out)
    assert row["completions"] == 1 and row["int8"] is not None  # int8.json reused: nothing trained, nothing quantized
    proc = sweep(ablation, out, capsys, "--set", "deploy.calibration_images=8")
    assert proc.returncode == 0, proc.stderr
    assert the_row(out)["int8"].calibration_count == 8 and the_row(out)["key"] == key
    proc = sweep(ablation, out, capsys, "--set", "deploy.calibration_images=8")
    assert "recovered" not in proc.stdout  # settled: nothing to do
    assert proc.stdout.strip().splitlines()[-1] == "trials: 1 total, 0 done, 0 failed, 1 already done"


def test_without_onnxruntime_the_step_is_skipped_in_one_line_and_the_report_says_so(swept, tmp_path, capsys, monkeypatch):
    ablation, out = copy_of(swept, tmp_path)
    set_columns(out, int8=None)
    monkeypatch.setattr(int8_module, "int8_unavailable", lambda: ONNXRUNTIME_MISSING)
    monkeypatch.setattr("kdbench.sweep.runner.int8_unavailable", lambda: ONNXRUNTIME_MISSING)
    proc = sweep(ablation, out, capsys)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if "INT8" in line] == [f"kdbench: note: {ONNXRUNTIME_MISSING}"]
    assert raw_row(out)["int8"] is None
    db = sqlite3.connect(out / "store.sqlite")
    (summary,) = db.execute("SELECT summary FROM sweeps ORDER BY id DESC LIMIT 1").fetchone()
    db.close()
    assert json.loads(summary)["int8_skipped"] == ONNXRUNTIME_MISSING
    with pytest.raises(UserError, match="^onnxruntime is not installed"):
        quantize_trial(None, None, out, Int8Settings())
    from kdbench.report.content import build_tables, report_blocks
    from kdbench.report.load import load_report_data

    data = load_report_data(out)
    tables = build_tables(data)
    said = [b.text for b in report_blocks(data, tables, {}) if getattr(b, "text", None) and "INT8" in b.text]
    assert said == [f"INT8 deployment was asked for ([deploy] int8 = true) but skipped: {ONNXRUNTIME_MISSING}."]


def test_the_report_has_the_int8_table(swept, tmp_path):
    from kdbench.report.content import build_tables
    from kdbench.report.load import load_report_data

    _, out = copy_of(swept, tmp_path)
    data = load_report_data(out)
    table = build_tables(data)["int8"]
    row = table.data.iloc[0]
    int8 = the_row(out)["int8"]
    assert row["method"] == "baseline" and row["int8_n"] == 1
    assert row["int8_mean"] == pytest.approx(100 * int8.test.accuracy, abs=0.01)
    assert row["bytes_int8"] == int8.bytes_int8
    assert row["diff_mean"] == pytest.approx(100 * (int8.test.accuracy - the_row(out)["result"].best.test.accuracy), abs=0.01)


def test_vgg_exports_below_224_px_with_its_adaptive_pool_as_matrices(tmp_path):
    import torch

    from kdbench.engine.int8 import export_onnx, onnx_session
    from kdbench.models import build_model

    model = build_model("vgg11", 10).eval()  # its 7 x 7 adaptive pool of a 2 x 2 map: refused by the exporter as it is
    export_onnx(model, 64, tmp_path / "vgg.onnx")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_session(tmp_path / "vgg.onnx").run(None, {"images": x.numpy()})[0]
    assert np.allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
