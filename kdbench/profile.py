"""Model complexity: parameters, FLOPs (fvcore) and checkpoint size, and teacher/student ratios.

``python -m kdbench.profile --dataset eurosat --resolution 224`` prints a table for
the teacher and the student and how much smaller and cheaper the student is.
Numbers depend only on the architecture, class count and input resolution (weights
are never loaded), so :func:`complexity` caches them per ``(model, classes, resolution)``.
torch, torchvision and fvcore are imported where a model is measured: the report reads
:data:`FLOP_CONVENTION` and :func:`compression` without them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import warnings
from typing import TYPE_CHECKING

from kdbench.advice import command, spelled
from kdbench.data.specs import BUILTIN_DATASETS, get_spec
from kdbench.errors import UserError, cli_main

if TYPE_CHECKING:
    import torch

FLOP_CONVENTION = (
    "FLOPs follow fvcore: one fused multiply-add counts as one FLOP (i.e. MACs); batch norm is counted, "
    "operators fvcore has no handle for (ReLU6, residual add, max pooling) are not"
)

# fvcore operator name -> layer type in ``flops_by_type``; anything else is "other"
_OPERATOR_TYPES = {
    "conv": "conv",
    "linear": "linear",
    "addmm": "linear",
    "matmul": "linear",
    "bmm": "linear",
    "batch_norm": "batchnorm",
}
LAYER_TYPES = ("conv", "linear", "batchnorm", "other")


class _ByteCounter:
    """A write-only file object that counts bytes instead of storing them."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())`` (measured without writing the file)."""
    import torch

    counter = _ByteCounter()
    torch.save(model.state_dict(), counter)
    return counter.size


def flops_by_type(by_operator: dict[str, int]) -> dict[str, int]:
    """Group fvcore's per-operator FLOP counts into conv / linear / batchnorm / other."""
    totals = dict.fromkeys(LAYER_TYPES, 0)
    for operator, flops in by_operator.items():
        totals[_OPERATOR_TYPES.get(operator, "other")] += int(flops)
    return totals


def complexity(model_name: str, num_classes: int, resolution: int) -> dict:
    """Parameter count, FLOPs and checkpoint size of ``model_name`` on one ``resolution``-pixel RGB image.

    Keys: ``model``, ``num_classes``, ``resolution``, ``params_total``, ``params_trainable``,
    ``flops`` (see :data:`FLOP_CONVENTION`), ``flops_by_type`` (conv / linear / batchnorm / other),
    ``checkpoint_bytes`` and ``unsupported_ops`` (operator -> call count that fvcore skipped).
    Results are cached; each call returns a fresh copy.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes}: pass --num-classes 1 or more")
    if resolution < 1:
        raise UserError(f"resolution must be a positive number of pixels, got {resolution}: pass e.g. --resolution 224")
    from kdbench.models import check_model_name

    check_model_name(model_name)
    return copy.deepcopy(_measure(model_name, num_classes, resolution))


@functools.cache
def _measure(model_name: str, num_classes: int, resolution: int) -> dict:
    import torch

    from kdbench.models import build_model

    with warnings.catch_warnings():  # fvcore.nn imports losses decorated with the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    model = build_model(model_name, num_classes).eval()
    analysis = (
        FlopCountAnalysis(model, torch.zeros(1, 3, resolution, resolution))
        .unsupported_ops_warnings(False)
        .uncalled_modules_warnings(False)
    )
    try:
        with warnings.catch_warnings():  # tracer warnings from the jit trace fvcore runs
            warnings.simplefilter("ignore")
            flops = analysis.total()
    except RuntimeError as err:
        raise UserError(
            f"{model_name} cannot run on {resolution}x{resolution} images ({str(err).splitlines()[0]}): use a larger --resolution"
        ) from err
    return {
        "model": model_name,
        "num_classes": num_classes,
        "resolution": resolution,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops": int(flops),
        "flops_by_type": flops_by_type(analysis.by_operator()),
        "checkpoint_bytes": checkpoint_bytes(model),
        "unsupported_ops": dict(analysis.unsupported_ops()),
    }


def compression(teacher: dict, student: dict) -> dict:
    """Teacher/student ratios of parameters, FLOPs and checkpoint bytes (how many times smaller the student is)."""
    return {
        "params": teacher["params_total"] / student["params_total"],
        "flops": teacher["flops"] / student["flops"],
        "bytes": teacher["checkpoint_bytes"] / student["checkpoint_bytes"],
    }


def _align(rows: list[list[str]], text_columns: int = 2) -> list[str]:
    """Pad cells into columns: the first ``text_columns`` left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    return [
        "  ".join(cell.ljust(w) if i < text_columns else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def format_table(teacher: dict, student: dict) -> str:
    """A plain-text table of both models, the compression ratios and the FLOP convention."""
    rows = [["role", "model", "params", "GFLOPs", "MB on disk", *(f"{t} GF" for t in LAYER_TYPES)]]
    for role, info in (("teacher", teacher), ("student", student)):
        rows.append(
            [
                role,
                info["model"],
                f"{info['params_total']:,}",
                f"{info['flops'] / 1e9:.4f}",
                f"{info['checkpoint_bytes'] / 1e6:.1f}",
                *(f"{info['flops_by_type'][t] / 1e9:.4f}" for t in LAYER_TYPES),
            ]
        )
    ratios = compression(teacher, student)
    rows.append(["ratio", "teacher/student", *(f"{ratios[k]:.1f}x" for k in ("params", "flops", "bytes"))])
    lines = [
        f"Complexity at {teacher['resolution']}x{teacher['resolution']} px, {teacher['num_classes']} classes",
        *_align(rows),
        "",
        f"Note: {FLOP_CONVENTION}. MB = 10^6 bytes of the saved state dict.",
    ]
    for info in (teacher, student):
        if info["unsupported_ops"]:
            skipped = ", ".join(f"{op} x{count}" for op, count in sorted(info["unsupported_ops"].items()))
            lines.append(f"Not counted in {info['model']}: {skipped}.")
    return "\n".join(lines)


def num_classes_for(dataset: str) -> int:
    """Class count of a built-in dataset name."""
    spec = get_spec(dataset)
    if spec.num_classes is None:
        raise UserError(f"{dataset} has no fixed class count: pass --num-classes N")
    return spec.num_classes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command("profile"), description=spelled(__doc__).splitlines()[0])
    parser.add_argument(
        "--dataset",
        default="eurosat",
        help=f"sets the class count: {', '.join(f'{k} {v.num_classes}' for k, v in BUILTIN_DATASETS.items())}",
    )
    parser.add_argument("--num-classes", type=int, help="class count; overrides --dataset")
    parser.add_argument("--resolution", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--teacher", default="vgg16", help="torchvision model name (default vgg16)")
    parser.add_argument("--student", default="mobilenet_v2", help="torchvision model name (default mobilenet_v2)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    num_classes = args.num_classes if args.num_classes is not None else num_classes_for(args.dataset)
    from kdbench.models import check_model_name

    for name in (args.teacher, args.student):  # fail on a typo before the slow teacher analysis
        check_model_name(name)
    teacher = complexity(args.teacher, num_classes, args.resolution)
    student = complexity(args.student, num_classes, args.resolution)
    if args.json:
        report = {
            "teacher": teacher,
            "student": student,
            "compression": compression(teacher, student),
            "flop_convention": FLOP_CONVENTION,
        }
        print(json.dumps(report, indent=2))
    else:
        print(format_table(teacher, student))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
