"""CPU inference latency of the teacher (VGG16) and the student (MobileNetV2), fp32 and INT8, with pytest-benchmark.

Run for real with ``python -m pytest tests/benchmarks --benchmark-enable --benchmark-only
--benchmark-json=reports/quick/bench.json``; ``kdbench.bench_summary`` reads the JSON.
Resolutions come from ``KDBENCH_BENCH_RESOLUTIONS`` (comma separated, default ``64``), models
from ``KDBENCH_BENCH_MODELS`` (default ``vgg16,mobilenet_v2``; add the teacher a sweep used).
Runtimes: ``torch`` (fp32), ``onnxruntime`` (the fp32 ONNX export) and ``onnxruntime-int8`` (its INT8 static
quantization, :mod:`kdbench.engine.int8`), the last two with ``pip install 'kdbench[onnx]'``.
Under the project's default ``--benchmark-disable`` each case runs one forward pass.
"""

from __future__ import annotations

import os
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
def onnx_models(model, tmp_path_factory) -> tuple[str, Callable]:
    """``(name, session(runtime, resolution))``: onnxruntime CPU sessions of the fp32 export (dynamic batch, one per input
    size) and of its INT8 quantization (kdbench.engine.int8: QDQ, per-channel, calibrated on a few random images; the
    weights are random too, so only the timing means anything), made on first use."""
    pytest.importorskip("onnxruntime", reason="optional extra: pip install 'kdbench[onnx]'")
    from kdbench.engine.int8 import export_onnx, onnx_session, quantize
    from kdbench.records import Int8Settings

    name, net = model
    folder = tmp_path_factory.mktemp(f"onnx-{name}")
    sessions = {}

    def session(runtime: str, resolution: int):
        if (runtime, resolution) not in sessions:
            fp32, int8 = folder / f"fp32-{resolution}.onnx", folder / f"int8-{resolution}.onnx"
            export_onnx(net, resolution, fp32)
            shape = (4, 3, resolution, resolution)
            calibration = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            quantize(fp32, int8, calibration, Int8Settings(calibration_images=4))
            for kind, path in (("onnxruntime", fp32), ("onnxruntime-int8", int8)):
                sessions[kind, resolution] = onnx_session(path, torch.get_num_threads())
        return sessions[runtime, resolution]

    return name, session


@resolutions
@batches
@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-int8"])  # the runtime column of bench.json
def test_onnx_inference(benchmark, onnx_models, runtime, batch, resolution):
    name, sessions = onnx_models
    session = sessions(runtime, resolution)
    images = torch.randn(batch, 3, resolution, resolution).numpy()

    def forward(array):
        return session.run(None, {"images": array})[0]

    threads = session.get_session_options().intra_op_num_threads
    logits = time_forward(benchmark, forward, images, model=name, runtime=runtime, threads=threads)
    assert logits.shape == (batch, NUM_CLASSES)
