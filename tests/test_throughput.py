"""benchmarks/throughput.py runs end to end on the CPU at toy sizes and writes every row to its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_throughput_benchmark_writes_all_rows(tmp_path):
    out = tmp_path / "throughput.json"
    args = [
        "--device",
        "cpu",
        "--resolution",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--packs",
        "2",
        "--teacher",
        "resnet18",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == [
        "plain teacher (resnet18)",
        "plain student (mobilenet_v2)",
        "plain online KD",
        "kdbench cache (1 student)",
        "kdbench pack K=2",
    ]
    assert all(row["images_per_s"] > 0 and row["step_ms"] > 0 for row in result["rows"])
    assert result["rows"][-1]["students"] == 2 and result["device"] == "cpu"
    assert "x plain student" in proc.stdout
