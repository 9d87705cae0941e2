"""Model complexity (kdbench.profile) and the inference-benchmark summary (kdbench.bench_summary)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from kdbench.bench_summary import load_benchmark_json, speedups
from kdbench.errors import UserError
from kdbench.profile import FLOP_CONVENTION, complexity, compression, flops_by_type, main

REPO = Path(__file__).resolve().parents[1]

# fvcore at 224x224, no pretrained weights (torchvision's 0.301 GFLOPs for MobileNetV2 leaves batch norm out)
REFERENCE_224 = {
    ("vgg16", 10): (134_301_514, 15.466e9),
    ("mobilenet_v2", 10): (2_236_682, 0.3129e9),
}
PARAMS_21_CLASSES = {"vgg16": 134_346_581, "mobilenet_v2": 2_250_773}


@pytest.mark.parametrize(("model", "classes"), list(REFERENCE_224))
def test_reference_complexity_at_224(model, classes):
    params, flops = REFERENCE_224[model, classes]
    info = complexity(model, classes, 224)
    assert info["params_total"] == info["params_trainable"] == params
    assert info["flops"] == pytest.approx(flops, rel=2e-4)
    assert sum(info["flops_by_type"].values()) == info["flops"]
    assert info["flops_by_type"]["conv"] > 0.95 * info["flops"]
    assert 4 * params < info["checkpoint_bytes"] < 1.05 * 4 * params  # fp32 weights plus BN buffers and zip overhead
    assert (info["resolution"], info["num_classes"]) == (224, classes)


def test_batch_norm_counted_for_student_only():
    assert complexity("vgg16", 10, 224)["flops_by_type"]["batchnorm"] == 0
    assert complexity("mobilenet_v2", 10, 224)["flops_by_type"]["batchnorm"] > 0.3129e9 - 0.301e9


def test_cached_results_are_copies():
    first = complexity("mobilenet_v2", 10, 224)
    first["flops_by_type"]["conv"] = -1
    assert complexity("mobilenet_v2", 10, 224)["flops_by_type"]["conv"] > 0


def test_fvcore_warnings_are_summarised_not_dumped(caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        info = complexity("mobilenet_v2", 3, 40)  # a key no other test uses: not cached
    assert info["unsupported_ops"]["aten::add"] == 10  # the residual connections
    assert not caplog.records and not caught


def test_flops_by_type_groups_operators():
    by_operator = {
        "conv": 5,
        "addmm": 2,
        "linear": 1,
        "batch_norm": 3,
        "adaptive_avg_pool2d": 4,
        "upsample_nearest2d": 1,
    }
    assert flops_by_type(by_operator) == {"conv": 5, "linear": 3, "batchnorm": 3, "other": 5}


def test_compression_ratios():
    teacher = complexity("vgg16", 10, 224)
    student = complexity("mobilenet_v2", 10, 224)
    ratios = compression(teacher, student)
    assert ratios["params"] == pytest.approx(134_301_514 / 2_236_682)
    assert ratios["flops"] == pytest.approx(15.466 / 0.3129, rel=1e-3)
    assert ratios["bytes"] == teacher["checkpoint_bytes"] / student["checkpoint_bytes"]


def test_too_small_resolution_is_a_user_error():
    with pytest.raises(UserError, match="use a larger --resolution"):
        complexity("vgg16", 10, 16)


def test_cli_table(capsys):
    assert main(["--dataset", "eurosat", "--resolution", "224"]) == 0
    out = capsys.readouterr().out
    for expected in ("134,301,514", "2,236,682", "15.4662", "0.3129", "537.2", "60.0x", "49.4x", "batchnorm GF"):
        assert expected in out
    assert FLOP_CONVENTION in out


def test_cli_json_uses_dataset_class_count(capsys):
    assert main(["--dataset", "ucmerced", "--resolution", "224", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["teacher"]["params_total"] == PARAMS_21_CLASSES["vgg16"]
    assert report["student"]["params_total"] == PARAMS_21_CLASSES["mobilenet_v2"]
    assert report["compression"]["params"] == pytest.approx(PARAMS_21_CLASSES["vgg16"] / PARAMS_21_CLASSES["mobilenet_v2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
        (["--num-classes", "0"], "num_classes must be a positive integer"),
        (["--student", "nosuchnet"], "unknown model 'nosuchnet'"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdbench: error: {message}") and err.count("\n") == 1


def test_cli_subprocess_unknown_model():
    result = subprocess.run(
        [sys.executable, "-m", "kdbench.profile", "--teacher", "nosuchnet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("kdbench: error: unknown model 'nosuchnet'") and result.stderr.count("\n") == 1


# --- kdbench.bench_summary -------------------------------------------------------------------------


def test_benchmark_json_reader_on_a_real_run(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/benchmarks/test_inference.py",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-enable",
            "--benchmark-only",
            f"--benchmark-json={out}",
            "-k",
            "batch1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "KDBENCH_BENCH_RESOLUTIONS": "32",
            "OMP_NUM_THREADS": "1",
        },  # one thread: quick even on a busy machine
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = load_benchmark_json(out)
    torch_rows = table[table["runtime"] == "torch"]
    assert sorted(torch_rows["model"]) == ["mobilenet_v2", "vgg16"]
    assert set(table["batch"]) == {1} and set(table["resolution"]) == {32} and set(table["threads"]) == {1}
    assert (table["latency_median_ms"] > 0).all() and (table["latency_iqr_ms"] >= 0).all()
    assert list(table["images_per_s"]) == pytest.approx(list(1e3 / table["latency_median_ms"]))
    ratio = speedups(table).set_index("runtime").loc["torch", "speedup"]
    assert ratio > 1, "the teacher should be slower than the student"


def test_benchmark_json_reader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_benchmark_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not a pytest-benchmark JSON"):
        load_benchmark_json(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"benchmarks": [{"name": "x", "extra_info": {}, "stats": {}}]}))
    with pytest.raises(UserError, match="no inference benchmarks"):
        load_benchmark_json(tmp_path / "other.json")
