"""CPU inference latency of the teacher (VGG16) and the student (MobileNetV2), with pytest-benchmark.

Run for real with ``python -m pytest tests/benchmarks --benchmark-enable --benchmark-only
--benchmark-json=reports/quick/bench.json``; ``kdbench.bench_summary`` reads the JSON.
Resolutions come from ``KDBENCH_BENCH_RESOLUTIONS`` (comma separated, default ``64``), models
from ``KDBENCH_BENCH_MODELS`` (default ``vgg16,mobilenet_v2``; add the teacher a sweep used).
Under the project's default ``--benchmark-disable`` each case runs one forward pass.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable

import pytest
import torch

from kdbench.models import build_model

NUM_CLASSES = 10
BATCHES = (1, 32)
ROUNDS = {1: 30, 32: 10}  # timed forward passes per case: about 10 s for VGG16 at batch 32, 64 px, 2 cores
WARMUP_ROUNDS = 2


def bench_resolutions() -> list[int]:
    """Input sides to time, from ``KDBENCH_BENCH_RESOLUTIONS`` (default ``"64"``)."""
    raw = os.environ.get("KDBENCH_BENCH_RESOLUTIONS", "64")
    try:
        return [int(part) for part in raw.split(",")]
    except ValueError:
        raise pytest.UsageError(f"KDBENCH_BENCH_RESOLUTIONS={raw!r}: use comma-separated pixel sizes such as 64,224") from None


resolutions = pytest.mark.parametrize("resolution", bench_resolutions(), ids=lambda r: f"res{r}")
batches = pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")


def bench_models() -> list[str]:
    """Models to time, from ``KDBENCH_BENCH_MODELS`` (default the paper's teacher and student)."""
    return [m.strip() for m in os.environ.get("KDBENCH_BENCH_MODELS", "vgg16,mobilenet_v2").split(",") if m.strip()]


@pytest.fixture(scope="module", params=bench_models())
def model(request) -> tuple[str, torch.nn.Module]:
    """``(name, model)`` in eval mode; module scope builds each model once and frees it afterwards."""
    return request.param, build_model(request.param, NUM_CLASSES).eval()


def time_forward(benchmark, forward: Callable, images, *, model: str, runtime: str, threads: int):
    """Time ``forward(images)`` after a warm-up and record the case in ``benchmark.extra_info``."""
    batch, resolution = images.shape[0], images.shape[-1]
    benchmark.group = f"{resolution}px batch {batch}"
    benchmark.extra_info.update(model=model, batch=batch, resolution=resolution, runtime=runtime, threads=threads)
    return benchmark.pedantic(forward, args=(images,), rounds=ROUNDS[batch], warmup_rounds=WARMUP_ROUNDS, iterations=1)


@resolutions
@batches
def test_torch_inference(benchmark, model, batch, resolution):
    name, net = model
    images = torch.randn(batch, 3, resolution, resolution)
    with torch.inference_mode():
        logits = time_forward(benchmark, net, images, model=name, runtime="torch", threads=torch.get_num_threads())
    assert logits.shape == (batch, NUM_CLASSES)


@pytest.fixture(scope="module")
def onnx_student():
    """An onnxruntime CPU session of the student, exported once with dynamic batch and image size."""
    ort = pytest.importorskip("onnxruntime", reason="optional extra: pip install 'kdbench[onnx]'")
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the dynamo one needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            build_model("mobilenet_v2", NUM_CLASSES).eval(),
            (torch.zeros(1, 3, 64, 64),),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


@resolutions
@batches
def test_onnx_student_inference(benchmark, onnx_student, batch, resolution):
    images = torch.randn(batch, 3, resolution, resolution).numpy()

    def forward(array):
        return onnx_student.run(None, {"images": array})[0]

    threads = onnx_student.get_session_options().intra_op_num_threads
    logits = time_forward(benchmark, forward, images, model="mobilenet_v2", runtime="onnxruntime", threads=threads)
    assert logits.shape == (batch, NUM_CLASSES)
