"""The frozen teacher's features for every training image in every view, computed once and memory-mapped.

The logit cache (:mod:`kdbench.engine.teacher`) extended to what a method declares it needs
(:data:`kdbench.methods.NEEDS`: ``embedding``, ``pooled``, ``stage:i``).  With a finite augmentation
(the D4 group by default) a training batch is a set of (training image, view) pairs, and the frozen
teacher in eval mode maps each pair to fixed features; :func:`feature_arrays` runs the teacher once
over every training image in every view and keeps each feature in a file of its own,
``<logit cache name>-<feature>.npy`` (``[N_train, V, *shape]``), next to the logit cache.  One file per
feature, so every student needing a feature shares its one file, and only features some trial asked
for are ever computed.  Files are read as read-only memory maps: a lookup reads the batch's rows.

Storage precision: fp16 when training runs in fp32 (``tests/test_feature_cache.py`` shows that it
changes every feature method's loss by less than 1e-3 relative), falling back to fp32 for a feature
fp16 cannot hold to that precision (:func:`needs_fp32`): one with a value beyond fp16's range (65,504),
or one with more than :data:`MAX_UNDERFLOW_SHARE` of its nonzero values below fp16's smallest normal
number (6.1e-5), where fp16's rounding error is no longer relative (up to 100 %, or 0 for a value
under 3e-8).  The default dtype when that is float64 (the engine's exactness tests).  The dtype of
every feature is in the trial's record (``teacher.features.<name>.dtype``).

Whether a cache is made: :func:`fits` compares its size (``N_train x V x`` the features' elements
``x`` bytes per element) with a limit, ``KDBENCH_FEATURE_CACHE_GB`` (default 8 GB), and with half the
free space of the disk it goes to.  Where it does not fit, the teacher runs online and the trial's
record says why.  The file names carry everything the features depend on: the logit cache's digest
(teacher checkpoint, training images, decoding rule, resolution, views, device type) and the teacher's
stage table entry (:func:`kdbench.stages.stage_nodes`), so a changed stage mapping never reads an old file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdbench.data.presets import Augmentation, apply_view, normalize
from kdbench.digest import json_digest
from kdbench.durable import atomic_file, file_lock
from kdbench.engine.features import FeatureTap, feature_shapes
from kdbench.engine.runtime import autocast, full_precision, memory_format
from kdbench.errors import UserError
from kdbench.finite import check_finite_logits
from kdbench.stages import stage_nodes

LIMIT_ENV = "KDBENCH_FEATURE_CACHE_GB"
DEFAULT_LIMIT_GB = 8.0
FP16_MAX = float(torch.finfo(torch.float16).max)
FP16_SMALLEST_NORMAL = float(torch.finfo(torch.float16).smallest_normal)
# of a feature's nonzero values below FP16_SMALLEST_NORMAL: more, and it is stored in fp32.  Normal values round
# within 2^-11 relative, each tiny one within 2^-25 absolute: with at most 1 % tiny, a row's relative error stays
# under 2^-11 * (1 + sqrt(0.01 / 0.99)), about 5.4e-4; untrained VGG stages hold about 4e-4 tiny values
MAX_UNDERFLOW_SHARE = 1e-2
FORMAT = "kdbench-feature-cache-v2"  # v2: features below fp16's normals kept in fp32 (files of v1 are never read)
LAYOUT = "contiguous"  # a lookup's features: rows of a C-ordered .npy array (NCHW), where the online teacher's are channels_last


def storage_dtype() -> torch.dtype:
    """fp16 when training runs in fp32; the default dtype otherwise (float64 in the exactness tests)."""
    return torch.float16 if torch.get_default_dtype() == torch.float32 else torch.get_default_dtype()


def limit_bytes() -> float:
    """The largest feature cache kdbench makes, from ``KDBENCH_FEATURE_CACHE_GB`` (default 8 GB).

    Raises:
        UserError: the variable is not a number >= 0.
    """
    raw = os.environ.get(LIMIT_ENV, str(DEFAULT_LIMIT_GB))
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise UserError(f"{LIMIT_ENV} must be a size in GB >= 0 (0: never cache features), got {raw!r}")
    return gb * 1e9


def cache_bytes(n_images: int, n_views: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of a cache of ``shapes`` (per image and view) for ``n_images`` images in ``n_views`` views."""
    per_view = sum(int(np.prod(s)) for s in shapes.values())
    return n_images * n_views * per_view * torch.empty((), dtype=dtype).element_size()


def fits(size: int, folder: Path) -> str | None:
    """None when a cache of ``size`` bytes may be made in ``folder``; otherwise why not (one phrase)."""
    limit = limit_bytes()
    if size > limit:
        return f"the feature cache would take {size / 1e9:.2f} GB, over the {limit / 1e9:g} GB limit ({LIMIT_ENV})"
    free = shutil.disk_usage(folder).free
    if size > free / 2:
        return f"the feature cache would take {size / 1e9:.2f} GB, over half the free disk space ({free / 1e9:.1f} GB)"
    return None


def feature_path(logit_cache: Path, model_name: str, name: str) -> Path:
    """The file of feature ``name`` beside the logit cache ``logit_cache`` (``logits-<digest>.pt``)."""
    digest = json_digest([FORMAT, logit_cache.name, model_name, stage_nodes(model_name), name])[:16]
    return logit_cache.with_name(f"{logit_cache.stem}-{name.replace(':', '')}-{digest}.npy")


def needs_fp32(chunk: torch.Tensor) -> bool:
    """Whether fp16 cannot hold ``chunk`` to a relative precision: a value beyond its range, or too many below its normals.

    ReLU's exact zeros are not counted: fp16 holds them exactly.
    """
    magnitudes = chunk.abs()
    if float(magnitudes.max()) > FP16_MAX:
        return True
    nonzero = int((magnitudes > 0).sum())
    tiny = int(((magnitudes > 0) & (magnitudes < FP16_SMALLEST_NORMAL)).sum())
    return nonzero > 0 and tiny > MAX_UNDERFLOW_SHARE * nonzero


class _Overflow(Exception):
    """A feature fp16 cannot hold (:func:`needs_fp32`): it is stored in fp32."""

    def __init__(self, name: str):
        self.name = name


def feature_arrays(
    teacher: nn.Module,
    model_name: str,
    logit_cache: Path,
    names: Iterable[str],
    train_images: torch.Tensor,
    aug: Augmentation,
    *,
    batch_size: int,
    device: torch.device,
    source: str,
) -> dict[str, np.ndarray]:
    """Read-only memory maps ``[N, V, *shape]`` of the teacher's features ``names``, made where missing.

    Files are made under a lock (concurrent trials make each one once) in one teacher pass for all the
    missing ones; a damaged or foreign file (wrong shape, unreadable) is made again.

    Raises:
        NonFiniteError: a NaN or infinite feature (a broken teacher).
    """
    names = sorted(set(names))
    paths = {name: feature_path(logit_cache, model_name, name) for name in names}
    lock = logit_cache.with_name(logit_cache.name + ".features.lock")
    with file_lock(lock):
        arrays = {name: _open(path, len(train_images), len(aug.views)) for name, path in paths.items()}
        missing = [name for name, a in arrays.items() if a is None]
        if missing:
            wide: set[str] = set()
            while True:
                try:
                    _build(
                        teacher, model_name, {n: paths[n] for n in missing}, wide, train_images, aug, batch_size, device, source
                    )
                    break
                except _Overflow as err:
                    wide.add(err.name)
            arrays.update({name: _open(paths[name], len(train_images), len(aug.views)) for name in missing})
    return arrays


def _open(path: Path, n: int, v: int) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        array = np.load(path, mmap_mode="r")
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    return array if array.shape[:2] == (n, v) else None


@torch.no_grad()
def _build(
    teacher: nn.Module,
    model_name: str,
    paths: dict[str, Path],
    wide: set[str],
    train_images: torch.Tensor,
    aug: Augmentation,
    batch_size: int,
    device: torch.device,
    source: str,
) -> None:
    """One pass of the teacher over every training image in every view, streaming each feature into its file."""
    teacher.eval()
    narrow = storage_dtype()
    with FeatureTap(teacher, paths, model_name) as tap, contextlib.ExitStack() as files:
        shapes = feature_shapes(tap, int(train_images.shape[-1]), device)
        dtypes = {name: torch.float32 if name in wide and narrow == torch.float16 else narrow for name in paths}
        out = {}
        for name, path in paths.items():
            out[name] = files.enter_context(atomic_file(path))
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(str(dtypes[name]).removeprefix("torch."))),
                "fortran_order": False,
                "shape": (len(train_images), len(aug.views), *shapes[name]),
            }
            np.lib.format.write_array_header_2_0(out[name], header)
        for start in range(0, len(train_images), batch_size):
            x = train_images[start : start + batch_size].to(device)
            per_view: dict[str, list[torch.Tensor]] = {name: [] for name in paths}
            for v in aug.views:
                inputs = normalize(apply_view(x, v)).contiguous(memory_format=memory_format(device))
                with autocast(device):
                    tap(inputs)
                for name, value in tap.take().items():
                    per_view[name].append(full_precision(value))
            for name, values in per_view.items():
                chunk = torch.stack(values, dim=1)
                check_finite_logits(chunk, f"the {name} features of teacher {source}", "the teacher is broken; re-train it")
                if dtypes[name] == torch.float16 and needs_fp32(chunk):
                    raise _Overflow(name)
                out[name].write(chunk.to(dtypes[name]).contiguous().cpu().numpy().tobytes())
