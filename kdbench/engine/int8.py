"""INT8 deployment of a trained model: export to ONNX, quantize with ONNX Runtime, evaluate on the test split.

:func:`quantize_trial` turns a trial's best-on-validation checkpoint into an INT8 model by ONNX Runtime's static
quantization (``quantize_static``: QDQ format, per-channel weights, activation ranges calibrated on a fixed, seeded
sample of the trial's own training images, preprocessed like evaluation inputs), scores it on the trial's test split,
and writes the :class:`~kdbench.records.Int8Result` to ``int8.json`` beside the checkpoint.  It is a step derived from
the trained checkpoint, keyed by the trial key, the checkpoint's content digest and the settings: a finished
``int8.json`` that matches is returned as it is, so a sweep killed while quantizing redoes only that.

Files written in the trial's folder: ``model.fp32.onnx`` (the export), ``model.int8.onnx`` (the quantized model) and
``int8.json``.  torch and onnxruntime are imported inside the functions: the sweep driver asks :func:`int8_unavailable`
without loading either.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kdbench.digest import checkpoint_digest
from kdbench.durable import atomic_write_json
from kdbench.errors import UserError
from kdbench.records import Int8Result, Int8Settings, SplitMetrics, from_json

if TYPE_CHECKING:
    import numpy as np
    import torch

INT8_FILE = "int8.json"
FP32_ONNX = "model.fp32.onnx"
INT8_ONNX = "model.int8.onnx"
CALIBRATION_METHODS = ("MinMax", "Percentile", "Entropy")
CALIBRATION_BATCH = 32
EVAL_BATCH = 64
ONNXRUNTIME_MISSING = "onnxruntime is not installed: the INT8 deployment step is skipped (pip install 'kdbench[onnx]')"


def int8_unavailable() -> str | None:
    """Why the INT8 step cannot run here (one line), or None where ONNX Runtime and onnx are installed."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return ONNXRUNTIME_MISSING
    return None


def check_settings(settings: Int8Settings, where: str) -> None:
    """Raises:
    UserError: a setting this module cannot apply (one line naming ``where``)."""
    if settings.format != "QDQ":
        raise UserError(f"{where}.format must be QDQ, got {settings.format!r}")
    if settings.calibration not in CALIBRATION_METHODS:
        raise UserError(f"{where}.calibration must be one of {', '.join(CALIBRATION_METHODS)}, got {settings.calibration!r}")
    for name in ("activation_type", "weight_type"):
        if getattr(settings, name) not in ("QInt8", "QUInt8"):
            raise UserError(f"{where}.{name} must be QInt8 or QUInt8, got {getattr(settings, name)!r}")
    if not 1 <= settings.calibration_images <= 10_000:
        raise UserError(f"{where}.calibration_images must be in [1, 10000], got {settings.calibration_images}")


def export_onnx(model: torch.nn.Module, resolution: int, path: str | Path) -> None:
    """Export ``model`` (eval mode, fp32, on the CPU) to ONNX at ``path``: input ``images`` ``[batch, 3, R, R]``
    (dynamic batch, ``R`` = ``resolution`` fixed: VGG's adaptive pooling exports only for a known size), output
    ``logits``; written atomically."""
    import io
    import warnings

    import torch

    from kdbench.durable import atomic_write_bytes

    buffer = io.BytesIO()
    model = _exportable(model.cpu().float().eval(), resolution)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; the dynamo one needs onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, resolution, resolution, dtype=torch.float32),),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    atomic_write_bytes(path, buffer.getvalue())


def _exportable(model: torch.nn.Module, resolution: int) -> torch.nn.Module:
    """``model``, or a copy whose adaptive average pools that the TorchScript exporter refuses (an output size that does
    not divide the input size, e.g. VGG's 7 x 7 pool of a 2 x 2 map at 64 px) are the same linear map as two matrix
    products, which it exports."""
    import copy

    import torch

    sizes = {}
    pools = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.AdaptiveAvgPool2d)]
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: sizes.__setitem__(n, args[0].shape[-2:])) for n, m in pools]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution, dtype=torch.float32))
    for hook in hooks:
        hook.remove()
    odd = [(n, m) for n, m in pools if any(i % o for i, o in zip(sizes[n], _pair(m.output_size, sizes[n])))]
    if not odd:
        return model
    model = copy.deepcopy(model)
    for name, pool in odd:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, _MatrixPool(sizes[name], _pair(pool.output_size, sizes[name])))
    return model


def _pair(size, inputs) -> tuple[int, int]:
    """An adaptive pool's ``output_size`` as two ints (None: that input size)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(i if o is None else o for o, i in zip(size, inputs))


def _MatrixPool(inputs, outputs):  # noqa: N802 (it stands in for a module class)
    """``AdaptiveAvgPool2d(outputs)`` of ``inputs``-sized maps as ``P_h @ x @ P_w^T`` (the same windows and weights)."""
    import torch

    def matrix(n_in: int, n_out: int) -> torch.Tensor:
        m = torch.zeros(n_out, n_in)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    class MatrixPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rows", matrix(inputs[0], outputs[0]))
            self.register_buffer("cols", matrix(inputs[1], outputs[1]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rows @ x @ self.cols.T

    return MatrixPool()


def calibration_sample(n_train: int, settings: Int8Settings) -> torch.Tensor:
    """Positions in the training split of the calibration images: ``calibration_images`` of them (all on a smaller
    split), drawn without replacement by a generator seeded with ``calibration_seed``, in ascending order."""
    import torch

    generator = torch.Generator().manual_seed(settings.calibration_seed)
    return torch.randperm(n_train, generator=generator)[: settings.calibration_images].sort().values


def quantize(fp32_path: str | Path, int8_path: str | Path, calibration: torch.Tensor, settings: Int8Settings) -> None:
    """Quantize the ONNX model at ``fp32_path`` into ``int8_path``: ONNX Runtime's ``quant_pre_process`` (shape inference,
    graph optimisation), then its ``quantize_static`` with ``settings``.

    ``calibration`` are uint8 images ``[N, 3, R, R]``, normalised here exactly as evaluation inputs are.

    Raises:
        UserError: onnxruntime is missing (:data:`ONNXRUNTIME_MISSING`).
    """
    _onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(_batches(calibration, CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    int8_path = Path(int8_path)
    partial = int8_path.with_name(int8_path.name + ".partial")
    prepared = int8_path.with_name(int8_path.name + ".prep")
    quant_pre_process(str(fp32_path), str(prepared))  # shape inference and graph optimisation, as ONNX Runtime advises
    quantize_static(
        str(prepared),
        str(partial),
        Reader(),
        quant_format=QuantFormat[settings.format],
        per_channel=settings.per_channel,
        activation_type=QuantType[settings.activation_type],
        weight_type=QuantType[settings.weight_type],
        calibrate_method=CalibrationMethod[settings.calibration],
    )
    partial.replace(int8_path)  # a model killed half-written is never taken for a finished one
    prepared.unlink()


def onnx_logits(path: str | Path, images: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """``[N, C]`` logits of the ONNX model at ``path`` on uint8 ``images`` (normalised like evaluation inputs), on the CPU.

    Raises:
        UserError: onnxruntime is missing.
    """
    import torch

    session = onnx_session(path, threads)
    chunks = [torch.from_numpy(session.run(None, {"images": batch})[0]) for batch in _batches(images, EVAL_BATCH)]
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def onnx_session(model: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of ``model`` (a path or the serialised model) with ``threads`` intra-op threads.

    Raises:
        UserError: onnxruntime is missing.
    """
    ort = _onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def quantize_trial(
    config,
    result,
    folder: str | Path,
    settings: Int8Settings,
    *,
    data_root: str | None = None,
    download: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> Int8Result:
    """The INT8 deployment of the trial ``config`` (:class:`~kdbench.config.TrialConfig`) whose finished ``result``
    (:class:`~kdbench.records.TrialResult`) and ``best.pt`` are in ``folder``; see the module docstring.

    Raises:
        UserError: onnxruntime is missing, the checkpoint cannot be read, or the data changed since training.
    """
    import torch

    from kdbench.data.prepare import prepare_data
    from kdbench.engine.loop import logit_metrics
    from kdbench.engine.trial import with_fingerprint
    from kdbench.models import load_model_checkpoint

    _onnxruntime()
    folder = Path(folder)
    checkpoint = folder / "best.pt"
    digest = checkpoint_digest(checkpoint)
    previous = finished_int8(folder / INT8_FILE, result.key, digest, settings)
    if previous is not None:
        return previous
    t0 = time.perf_counter()
    data = prepare_data(config.data, data_root, download=download)
    with_fingerprint(config, data)  # the images it was trained on, or a one-line refusal
    train, test = data.indices("train"), data.indices("test")
    if data.labels[test].tolist() != list(result.test_targets):
        raise UserError(f"the test split of {config.data.dataset} is not the one trial {result.key} was scored on: rerun it")
    picked = train[calibration_sample(len(train), settings)]
    model, _ = load_model_checkpoint(checkpoint)
    export_onnx(model, config.data.resolution, folder / FP32_ONNX)
    quantize(folder / FP32_ONNX, folder / INT8_ONNX, data.images[picked], settings)
    quantize_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    int8_logits = onnx_logits(folder / INT8_ONNX, data.images[test], threads)
    fp32_predictions = onnx_logits(folder / FP32_ONNX, data.images[test], threads).argmax(1)
    evaluate_s = time.perf_counter() - t1
    metrics = logit_metrics(int8_logits, data.labels[test], data.classes) | {"predictions": int8_logits.argmax(1).tolist()}
    import onnxruntime

    agreement = (fp32_predictions == torch.tensor(result.best.test.predictions)).float().mean()
    record = Int8Result(
        key=result.key,
        checkpoint_digest=digest,
        settings=settings,
        calibration_count=len(picked),
        test=from_json(SplitMetrics, metrics, f"the INT8 metrics of trial {result.key}"),
        fp32_onnx_agreement=float(agreement) if len(test) else float("nan"),
        bytes_fp32=(folder / FP32_ONNX).stat().st_size,
        bytes_int8=(folder / INT8_ONNX).stat().st_size,
        quantize_s=quantize_s,
        evaluate_s=evaluate_s,
        onnxruntime=onnxruntime.__version__,
    )
    atomic_write_json(folder / INT8_FILE, dataclasses.asdict(record))
    log(
        f"INT8 ({settings.format}, {settings.calibration} calibration on {len(picked)} training images): test accuracy "
        f"{record.test.accuracy:.4f} (fp32 {result.best.test.accuracy:.4f}), {record.bytes_int8 / 1e6:.1f} MB "
        f"(fp32 {record.bytes_fp32 / 1e6:.1f} MB), quantized in {quantize_s:.1f} s"
    )
    return record


def finished_int8(path: Path, key: str, digest: str, settings: Int8Settings) -> Int8Result | None:
    """The INT8 result at ``path`` if it is of trial ``key``, checkpoint ``digest`` and ``settings``; else None."""
    try:
        record = from_json(Int8Result, path.read_text(), str(path))
    except (OSError, json.JSONDecodeError, UserError):  # absent, unreadable or another kdbench's: quantized again
        return None
    if (record.key, record.checkpoint_digest, record.settings) != (key, digest, settings):
        return None
    return record


def _batches(images: torch.Tensor, size: int) -> Iterator[np.ndarray]:
    """uint8 ``images`` as normalised fp32 numpy batches of ``size``, the inputs :func:`kdbench.engine.loop.predict` feeds."""
    from kdbench.data.presets import normalize

    for lo in range(0, len(images), size):
        yield normalize(images[lo : lo + size]).float().numpy()


def _onnxruntime():
    """The onnxruntime module.

    Raises:
        UserError: it is not installed (:data:`ONNXRUNTIME_MISSING`).
    """
    if int8_unavailable():
        raise UserError(ONNXRUNTIME_MISSING)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: no warning per unused initializer of an export
    return onnxruntime
