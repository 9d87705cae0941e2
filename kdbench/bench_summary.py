"""Summarise a pytest-benchmark JSON of inference latency (``tests/benchmarks/test_inference.py``).

The benchmark tests write ``model``, ``batch``, ``resolution``, ``runtime`` and
``threads`` into each entry's ``extra_info``; this module turns the file into one
row per case and the teacher/student speed-ups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from kdbench.errors import UserError

CASE_KEYS = ("model", "batch", "resolution", "runtime")
BENCH_COMMAND = "python -m pytest tests/benchmarks --benchmark-enable --benchmark-only --benchmark-json=reports/quick/bench.json"


def load_benchmark_json(path: str | os.PathLike) -> pd.DataFrame:
    """One row per (model, batch, resolution, runtime) case of a pytest-benchmark JSON file.

    Columns:

    - ``model``: torchvision model name; ``batch``: images per forward pass;
      ``resolution``: input side in pixels; ``runtime``: ``"torch"`` (fp32), ``"onnxruntime"`` (the fp32 ONNX
      export) or ``"onnxruntime-int8"`` (its INT8 static quantization, kdbench.engine.int8);
    - ``threads``: intra-op CPU threads used; ``rounds``: timed forward passes;
    - ``latency_median_ms``: median wall time of one forward pass of the whole batch, in ms;
    - ``latency_iqr_ms``: inter-quartile range of that time, in ms;
    - ``latency_min_ms``: fastest pass, in ms (the least disturbed by other processes on a shared machine);
    - ``images_per_s``: throughput, ``batch / median latency``.

    Benchmarks without these ``extra_info`` keys (other benchmark files) are ignored.
    Rows are sorted by resolution, batch, runtime and model.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())["benchmarks"]
    except FileNotFoundError as err:
        raise UserError(f"benchmark file {path} does not exist: run {BENCH_COMMAND}") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a pytest-benchmark JSON file: rerun {BENCH_COMMAND}") from err
    rows = [_row(entry) for entry in entries if all(key in entry.get("extra_info", {}) for key in CASE_KEYS)]
    if not rows:
        raise UserError(f"{path} holds no inference benchmarks: run {BENCH_COMMAND}")
    return pd.DataFrame(rows).sort_values(["resolution", "batch", "runtime", "model"], ignore_index=True)


def _row(entry: dict) -> dict:
    info, stats = entry["extra_info"], entry["stats"]
    return {
        **{key: info[key] for key in CASE_KEYS},
        "threads": info.get("threads"),
        "rounds": stats["rounds"],
        "latency_median_ms": stats["median"] * 1e3,
        "latency_iqr_ms": stats["iqr"] * 1e3,
        "latency_min_ms": stats["min"] * 1e3,
        "images_per_s": info["batch"] / stats["median"],
    }


def speedups(table: pd.DataFrame, teacher: str = "vgg16", student: str = "mobilenet_v2") -> pd.DataFrame:
    """Teacher/student latency ratio per (batch, resolution, runtime) where both were timed.

    Columns: ``batch``, ``resolution``, ``runtime``, ``teacher_ms``, ``student_ms``,
    ``teacher_images_per_s``, ``student_images_per_s`` and ``speedup`` (teacher latency
    over student latency: how many times faster the student is).
    """
    keys = ["batch", "resolution", "runtime"]
    columns = keys + ["latency_median_ms", "images_per_s"]
    pairs = pd.merge(
        table.loc[table["model"] == teacher, columns],
        table.loc[table["model"] == student, columns],
        on=keys,
        suffixes=("_teacher", "_student"),
    )
    if pairs.empty:
        raise UserError(f"the benchmark has no case that times both {teacher} and {student}: check the model names")
    return pd.DataFrame(
        {
            **{key: pairs[key] for key in keys},
            "teacher_ms": pairs["latency_median_ms_teacher"],
            "student_ms": pairs["latency_median_ms_student"],
            "teacher_images_per_s": pairs["images_per_s_teacher"],
            "student_images_per_s": pairs["images_per_s_student"],
            "speedup": pairs["latency_median_ms_teacher"] / pairs["latency_median_ms_student"],
        }
    )
