"""What a distillation method costs per training epoch, with the teacher's cache and with the teacher online.

    python benchmarks/feature_cost.py                       # CPU, 64 px, ResNet-18 teacher, MobileNetV2 student
    python benchmarks/feature_cost.py --teacher vgg16 --images 256 --json cost.json

For each method, one epoch of kdbench's engine (``train_one_epoch`` with the method's learnable parts, as a
trial trains) over ``--images`` synthetic training images (uint8, D4 views, batch ``--batch-size``), timed
after one untimed warm-up epoch:

* **cache**: the teacher's logits and the features the method needs looked up in its caches
  (:mod:`kdbench.engine.teacher`, :mod:`kdbench.engine.feature_cache`; built before the timing);
* **online**: the teacher run on every batch (:class:`kdbench.engine.teacher.OnlineTeacher`).

Ratios are to the baseline student's epoch of the same run.  The cache build (one teacher pass over every image in
every view, once per teacher for every student) is timed apart.  The table of cache sizes gives the bytes per 1,000
training images of each method's features (fp16, 8 views) for the teacher at 64 and 224 px, from the shapes alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kdbench import machine
from kdbench.config import Recipe
from kdbench.data.presets import AUGMENTATIONS
from kdbench.engine.feature_cache import cache_bytes, feature_arrays, storage_dtype
from kdbench.engine.features import FeatureTap, feature_shapes
from kdbench.engine.loop import make_optimizer, train_one_epoch
from kdbench.engine.runtime import memory_format
from kdbench.engine.teacher import OnlineTeacher, cached_teacher
from kdbench.losses import LossConfig
from kdbench.methods import INDEX, METHODS, get_method, teacher_features
from kdbench.models import build_model

AUG = AUGMENTATIONS["d4"]
CPU = torch.device("cpu")
DEFAULT_METHODS = "baseline,kd_kl_cos,dkd,fitnet,at,rkd,crd,reviewkd"


def epoch_seconds(method_name: str, teacher, images, labels, args) -> float:
    """Seconds of one timed epoch of a fresh MobileNetV2 student by ``method_name`` (after one warm-up epoch)."""
    method = get_method(method_name)
    cfg = method.effective_loss(LossConfig())
    torch.manual_seed(0)
    student = build_model("mobilenet_v2", args.classes).to(memory_format=memory_format(CPU))
    with FeatureTap(student, method.needs_from_teacher, "mobilenet_v2") as tap:
        if method.needs_from_teacher - {"logits", INDEX}:
            shapes = feature_shapes(tap, args.resolution, CPU), teacher.feature_shapes(args.resolution, CPU)
            extra = {"train_labels": labels} if INDEX in method.needs_from_teacher else {}
            parts = method.make_parts(*shapes, cfg, **extra)
            method.parts = parts.to(memory_format=memory_format(CPU)) if parts is not None else None
        params = [*student.parameters(), *(method.parts.parameters() if method.parts is not None else [])]
        optimizer = make_optimizer(params, Recipe(lr=0.01))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        times = []
        for epoch in range(2):
            start = time.perf_counter()
            train_one_epoch(
                student,
                method,
                cfg,
                optimizer,
                scheduler,
                images,
                labels,
                AUG,
                teacher if method.needs_teacher else None,
                batch_size=args.batch_size,
                seed=0,
                epoch=epoch,
                device=CPU,
                desc="",
                progress=False,
                tap=tap,
            )
            times.append(time.perf_counter() - start)
    return times[-1]


def sizes(teacher_name: str, classes: int, methods: list[str]) -> list[dict]:
    """Cache bytes per 1,000 training images (8 views, the storage dtype) of each method's teacher features."""
    rows = []
    for px in (64, 224):
        model = build_model(teacher_name, classes).eval()
        for name in methods:
            wanted = teacher_features(get_method(name).needs_from_teacher)
            if not wanted:
                continue
            with FeatureTap(model, wanted, teacher_name) as tap:
                shapes = feature_shapes(tap, px, CPU)
            size = cache_bytes(1000, len(AUG.views), shapes, storage_dtype())
            rows.append({"method": name, "px": px, "features": sorted(shapes), "mb_per_1000_images": size / 1e6})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma separated, of {', '.join(METHODS)}")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    print(f"# {machine.environment('cpu', torch.get_num_threads())}")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.resolution, args.resolution), generator=g, dtype=torch.uint8)
    labels = torch.arange(args.images) % args.classes
    torch.manual_seed(0)
    teacher = build_model(args.teacher, args.classes).to(memory_format=memory_format(CPU)).eval()
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    needs = frozenset().union(*(get_method(m).needs_from_teacher for m in methods))
    with tempfile.TemporaryDirectory() as folder:
        logits = Path(folder) / "logits-bench.pt"
        start = time.perf_counter()
        cache = cached_teacher(teacher, logits, images, AUG, batch_size=256, device=CPU, source="bench")
        logit_build = time.perf_counter() - start
        start = time.perf_counter()
        arrays = feature_arrays(
            teacher, args.teacher, logits, teacher_features(needs), images, AUG, batch_size=256, device=CPU, source="bench"
        )
        feature_build = time.perf_counter() - start
        rows = []
        for name in methods:
            wanted = teacher_features(get_method(name).needs_from_teacher)
            cached = type(cache)(cache.logits, AUG.views, {k: arrays[k] for k in wanted})
            online = OnlineTeacher(teacher, "bench", get_method(name).needs_from_teacher, args.teacher)
            # a student that needs no teacher (the baseline) has one epoch time: no teacher, cached or online
            cache_s = epoch_seconds(name, cached, images, labels, args)
            online_s = epoch_seconds(name, online, images, labels, args) if get_method(name).needs_teacher else cache_s
            rows.append({"method": name, "cache_s": cache_s, "online_s": online_s})
            print(f"{name}: cache {cache_s:.2f} s, online {online_s:.2f} s", flush=True)
    base = next(r["cache_s"] for r in rows if r["method"] == "baseline")
    print(
        f"\n{args.images} images at {args.resolution} px, batch {args.batch_size}, teacher {args.teacher}; "
        f"cache builds: logits {logit_build:.1f} s, every feature {feature_build:.1f} s (once per teacher)\n"
    )
    print("| method | epoch with cache (s) | x baseline | epoch online (s) | x baseline |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        cache, online = f"{r['cache_s']:.2f} | {r['cache_s'] / base:.2f}x", f"{r['online_s']:.2f} | {r['online_s'] / base:.2f}x"
        print(f"| {r['method']} | {cache} | {online} |")
    size_rows = sizes(args.teacher, args.classes, methods)
    print("\n| method | teacher features | MB per 1,000 images, 64 px | MB per 1,000 images, 224 px |")
    print("|---|---|---:|---:|")
    for name in dict.fromkeys(r["method"] for r in size_rows):
        at = {r["px"]: r for r in size_rows if r["method"] == name}
        mb = " | ".join(f"{at[px]['mb_per_1000_images']:,.1f}" for px in (64, 224))
        print(f"| {name} | {', '.join(at[64]['features'])} | {mb} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "epochs": rows,
                    "sizes": size_rows,
                    "logit_build_s": logit_build,
                    "feature_build_s": feature_build,
                    "args": vars(args) | {"json": str(args.json)},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
