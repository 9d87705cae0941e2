"""Training throughput on one device: plain PyTorch loops against kdbench's engine.

    python benchmarks/throughput.py                     # CUDA if visible: 64 px, batch 128, packs of 4 and 8
    python benchmarks/throughput.py --device cpu --resolution 32 --steps 5 --json throughput.json

Rows (images/s = batch / step time; a pack's is the AGGREGATE student rate K * batch / step time):

* plain teacher / plain student: one cross-entropy SGD step of the teacher (VGG16) / the student (MobileNetV2);
* plain online KD: teacher forward under ``no_grad`` + one student KD step;
* kdbench cache: ``train_one_epoch`` for one student, teacher logits looked up in a ``CachedTeacher``;
* kdbench pack K: ``train_pack_epoch`` for K students sharing each batch and its one cache lookup.

Every row draws its batches like kdbench: synthetic uint8 images on the device, D4 views and
normalisation on the device (``kdbench.data.presets``); bf16 autocast + channels_last on CUDA,
fp32 on CPU.  KD rows use the ``kd_kl_cos`` loss, the cache holds random logits.  Compare rows
as ratios to the plain student of the same run.  Peak memory is ``torch.cuda.max_memory_allocated``
during the row, the synthetic images held on the device (``(steps or warmup) * batch`` of them)
included.  kdbench's D4 views (``apply_views``) wait for the GPU once per batch in every row.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kdbench.config import LossConfig
from kdbench.data.presets import AUGMENTATIONS, normalize
from kdbench.engine.loop import train_one_epoch
from kdbench.engine.packed import MemberLoss, train_pack_epoch
from kdbench.engine.runtime import autocast, memory_format, resolve_device
from kdbench.engine.teacher import CachedTeacher
from kdbench.methods import Outputs, get_method
from kdbench.models import build_model
from kdbench.packing import PackedMobileNetV2

AUG = AUGMENTATIONS["d4"]
KD = get_method("kd_kl_cos")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    p.add_argument("--packs", default="4,8", help="pack sizes K, comma separated")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--teacher", default="vgg16", help="teacher model (VGG16 needs >= 32 px)")
    p.add_argument("--compile", action="store_true", help="torch.compile the packed model")
    p.add_argument("--json", type=Path, help="also write the rows here")
    return p.parse_args(argv)


class Bench:
    """Synthetic data on the device and the timing of one row."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.device, self.batch, self.args = device, args.batch_size, args
        n = max(args.steps, args.warmup, 1) * self.batch
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, args.resolution, args.resolution), generator=g, dtype=torch.uint8).to(device)
        self.labels = torch.randint(0, args.classes, (n,), generator=g).to(device)
        self.generator = g

    def batch_xy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch, augmented and normalised on the device as in kdbench."""
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.generator).to(self.device)
        views = AUG.sample_views(self.batch, self.generator)
        x = normalize(AUG(self.images[idx], views, self.generator)).contiguous(memory_format=memory_format(self.device))
        return x, self.labels[idx]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def seconds_per_step(self, run: Callable[[int], None]) -> float:
        """``run(steps)`` trains ``steps`` steps; warm up, then time ``--steps`` of them."""
        if self.args.warmup:
            run(self.args.warmup)
        self.sync()
        start = time.perf_counter()
        run(self.args.steps)
        self.sync()
        return (time.perf_counter() - start) / self.args.steps

    def model(self, name: str) -> torch.nn.Module:
        return build_model(name, self.args.classes).to(self.device, memory_format=memory_format(self.device)).train()

    def sgd(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def plain_step(bench: Bench, model, optimizer, teacher=None) -> None:
    """One CE step of ``model``, or with ``teacher`` one online KD step."""
    x, y = bench.batch_xy()
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad(), autocast(bench.device):
            teacher_logits = teacher(x).float()
    with autocast(bench.device):
        logits = model(x).float()
    loss = (
        F.cross_entropy(logits, y) if teacher is None else KD.loss(Outputs(logits), Outputs(teacher_logits), y, LossConfig())[0]
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def repeated(step: Callable[[], None]) -> Callable[[int], None]:
    def run(steps: int) -> None:
        for _ in range(steps):
            step()

    return run


def plain_rows(bench: Bench) -> dict[str, Callable[[], float]]:
    """``name -> timer``; each timer builds its models, so only one row's models live at a time."""

    def ce(name: str) -> float:
        model = bench.model(name)
        opt = bench.sgd(model)
        return bench.seconds_per_step(repeated(lambda: plain_step(bench, model, opt)))

    def online_kd() -> float:
        teacher, student = bench.model(bench.args.teacher).eval(), bench.model("mobilenet_v2")
        opt = bench.sgd(student)
        return bench.seconds_per_step(repeated(lambda: plain_step(bench, student, opt, teacher)))

    return {
        f"plain teacher ({bench.args.teacher})": lambda: ce(bench.args.teacher),
        "plain student (mobilenet_v2)": lambda: ce("mobilenet_v2"),
        "plain online KD": online_kd,
    }


def engine_epoch(bench: Bench, model, step_fn, losses) -> Callable[[int], None]:
    """``run(steps)`` for kdbench's epoch functions: one epoch over ``steps * batch`` images."""
    cache = CachedTeacher(torch.randn(len(bench.images), len(AUG.views), bench.args.classes, device=bench.device), AUG.views)
    optimizer = bench.sgd(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def run(steps: int) -> None:
        n = steps * bench.batch
        step_fn(
            model,
            losses,
            optimizer,
            scheduler,
            bench.images[:n],
            bench.labels[:n],
            AUG,
            cache,
            batch_size=bench.batch,
            seed=0,
            epoch=0,
            device=bench.device,
            desc="",
            progress=False,
        )

    return run


def kdbench_rows(bench: Bench, packs: list[int]) -> dict[str, tuple[int, Callable[[], float]]]:
    """``name -> (students per step, timer)``."""

    def single() -> float:
        def kd_epoch(model, loss_cfg, *rest, **kw):  # train_one_epoch with the method in front of the loss
            train_one_epoch(model, KD, loss_cfg, *rest, **kw)

        return bench.seconds_per_step(engine_epoch(bench, bench.model("mobilenet_v2"), kd_epoch, LossConfig()))

    def pack(k: int) -> float:
        model = PackedMobileNetV2(k, bench.args.classes).to(bench.device, memory_format=memory_format(bench.device))
        members = [
            MemberLoss(f"T={1 + i}", KD, KD.effective_loss(LossConfig(params=(("temperature", 1.0 + i),)))) for i in range(k)
        ]
        model = torch.compile(model) if bench.args.compile else model  # shares the parameters of the module it wraps
        return bench.seconds_per_step(engine_epoch(bench, model, train_pack_epoch, members))

    rows = {"kdbench cache (1 student)": (1, single)}
    for k in packs:
        rows[f"kdbench pack K={k}{' compiled' if bench.args.compile else ''}"] = (k, lambda k=k: pack(k))
    return rows


def measure(bench: Bench, name: str, k: int, timer: Callable[[], float]) -> dict:
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = timer()
    row = {"name": name, "students": k, "step_ms": 1000 * seconds, "images_per_s": k * bench.batch / seconds}
    if bench.device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.batch_size = args.batch_size or (128 if device.type == "cuda" else 32)
    bench = Bench(args, device)
    packs = [int(k) for k in args.packs.split(",") if k.strip()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = "bf16 autocast + channels_last" if device.type == "cuda" else "fp32"
    print(
        f"{device.type} ({name}); torch {torch.__version__}; {args.resolution} px, batch {args.batch_size}, "
        f"{args.classes} classes, {precision}; {args.warmup} warm-up + {args.steps} timed steps per row"
    )
    timers = {n: (1, t) for n, t in plain_rows(bench).items()} | kdbench_rows(bench, packs)
    rows = [measure(bench, row_name, k, timer) for row_name, (k, timer) in timers.items()]
    base = next(r for r in rows if r["name"].startswith("plain student"))["images_per_s"]
    print(f"{'row':<32} {'images/s':>10} {'step ms':>9} {'x plain student':>16} {'peak MiB':>9}")
    for r in rows:
        r["ratio_to_plain_student"] = r["images_per_s"] / base
        peak = f"{r['peak_mib']:9.0f}" if "peak_mib" in r else f"{'-':>9}"
        print(f"{r['name']:<32} {r['images_per_s']:10.0f} {r['step_ms']:9.2f} {r['ratio_to_plain_student']:16.2f} {peak}")
    if args.json:
        meta = {"device": device.type, "device_name": name, "torch": torch.__version__}
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "device")}
        args.json.write_text(json.dumps({**meta, **settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
