"""Training-step speed on CPU by memory format and precision, per model and resolution.

    python benchmarks/cpu_formats.py --models mobilenet_v2,resnet18 --resolutions 64,128 --json formats.json

One row per (model, px, format): the median time of ``--steps`` SGD cross-entropy steps at
``--batch-size`` on random fp32 images, after ``--warmup`` untimed steps; formats are
``contiguous`` (fp32), ``channels_last`` (fp32) and ``bf16`` (channels_last + ``torch.autocast("cpu",
bfloat16)``). The formats of one model and size alternate ``--rounds`` times so drift in the VM's
speed hits each alike; the speed-up column is contiguous / format, from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdbench import machine
from kdbench.models import build_model

FORMATS = ("contiguous", "channels_last", "bf16")


def step_times(model_name: str, px: int, fmt: str, batch: int, steps: int, warmup: int, classes: int) -> list[float]:
    torch.manual_seed(0)
    mf = torch.contiguous_format if fmt == "contiguous" else torch.channels_last
    model = build_model(model_name, classes).to(memory_format=mf).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, px, px).contiguous(memory_format=mf)
    y = torch.randint(0, classes, (batch,))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if fmt == "bf16" else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with cast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenet_v2,resnet18")
    p.add_argument("--resolutions", default="64,128")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    rows = []
    print(f"# {machine.environment('cpu', torch.get_num_threads())}")
    print("| model | px | format | median step (s) | images/s | speed-up vs contiguous |")
    print("|---|---:|---|---:|---:|---:|")
    for model_name in a.models.split(","):
        for px in map(int, a.resolutions.split(",")):
            samples = {f: [] for f in FORMATS}
            for _ in range(a.rounds):
                for fmt in FORMATS:
                    samples[fmt] += step_times(model_name, px, fmt, a.batch_size, a.steps, a.warmup, a.classes)
            base = statistics.median(samples["contiguous"])
            for fmt in FORMATS:
                med = statistics.median(samples[fmt])
                row = dict(model=model_name, px=px, format=fmt, median_s=med, images_per_s=a.batch_size / med, speedup=base / med)
                rows.append(row)
                print(f"| {model_name} | {px} | {fmt} | {med:.3f} | {a.batch_size / med:.0f} | {base / med:.2f}x |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
