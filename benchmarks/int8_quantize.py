"""Time of the INT8 deployment step per model: ONNX export, then ONNX Runtime's quant_pre_process, calibration and
quantize_static (kdbench.engine.int8, QDQ, per-channel weights, MinMax), and the sizes of the fp32 and INT8 files.

Random weights and random calibration images (the time does not depend on their values), 10 classes:

    python benchmarks/int8_quantize.py --models mobilenet_v2,resnet18 --resolutions 64,224 --images 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from kdbench.engine.int8 import export_onnx, quantize
from kdbench.models import build_model
from kdbench.records import Int8Settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenet_v2,resnet18")
    p.add_argument("--resolutions", default="64")
    p.add_argument("--images", type=int, default=256, help="calibration images")
    args = p.parse_args()
    settings = Int8Settings(calibration_images=args.images)
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} calibration images")
    print(f"{'model':<14} {'px':>4} {'export s':>9} {'quantize s':>11} {'fp32 MB':>8} {'INT8 MB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        for name in args.models.split(","):
            model = build_model(name, 10).eval()
            for resolution in map(int, args.resolutions.split(",")):
                t0 = time.perf_counter()
                export_onnx(model, resolution, fp32)
                t1 = time.perf_counter()
                images = torch.randint(0, 256, (args.images, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
                quantize(fp32, int8, images, settings)
                t2 = time.perf_counter()
                print(
                    f"{name:<14} {resolution:>4} {t1 - t0:>9.1f} {t2 - t1:>11.1f} "
                    f"{fp32.stat().st_size / 1e6:>8.2f} {int8.stat().st_size / 1e6:>8.2f}"
                )


if __name__ == "__main__":
    main()
