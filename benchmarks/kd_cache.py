"""Cost of a KD trial with the teacher-logit cache, against a baseline student trial and an online teacher.

Runs kdbench's own training loop (``kdbench.engine.loop.train_one_epoch``) on synthetic
uint8 images for one epoch per variant and prints images/s and ratios, measured in one run:

- baseline: the student alone (CE only);
- every distilling method of the registry (KD (KL), KD (Cos), KD (KL+Cos), DKD, DIST, logit-
  standardised KD, ...) with the teacher's logits looked up in the cache, at its default settings;
- KD (KL+Cos), online teacher: the combined loss with VGG16 run on every batch;
- cache pass: building the cache (teacher inference on every training image in 8 views).

    python benchmarks/kd_cache.py --images 512 --resolution 64 --batch-size 64
"""

from __future__ import annotations

import argparse
import time

import torch

from kdbench.config import LossConfig
from kdbench.data.presets import AUGMENTATIONS
from kdbench.engine.loop import train_one_epoch
from kdbench.engine.teacher import CachedTeacher, OnlineTeacher, build_logit_cache
from kdbench.methods import METHODS, get_method
from kdbench.models import build_model


def epoch_seconds(method_name: str, teacher, images, labels, args) -> float:
    torch.manual_seed(0)
    student = build_model(args.student, args.classes)
    method = get_method(method_name)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats = train_one_epoch(
        student,
        method,
        method.effective_loss(LossConfig()),
        optimizer,
        scheduler,
        images,
        labels,
        AUGMENTATIONS["d4"],
        teacher,
        batch_size=args.batch_size,
        seed=0,
        epoch=0,
        device=torch.device("cpu"),
        desc=method_name,
        progress=False,
    )
    return stats.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--teacher", default="vgg16")
    p.add_argument("--student", default="mobilenet_v2")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.resolution, args.resolution), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (args.images,), generator=g)
    teacher = build_model(args.teacher, args.classes).eval()
    aug = AUGMENTATIONS["d4"]

    t0 = time.perf_counter()
    logits = build_logit_cache(teacher, images, aug, batch_size=256, device=torch.device("cpu"), source=args.teacher)
    cache_s = time.perf_counter() - t0
    cached = CachedTeacher(logits, aug.views)
    online = OnlineTeacher(teacher, args.teacher)

    rows = [("baseline student (CE)", epoch_seconds("baseline", None, images, labels, args))]
    rows += [
        (f"{get_method(name).label}, cached teacher", epoch_seconds(name, cached, images, labels, args))
        for name in METHODS
        if get_method(name).needs_teacher
    ]
    rows.append(("KD (KL+Cos), online teacher", epoch_seconds("kd_kl_cos", online, images, labels, args)))
    base = rows[0][1]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images at {args.resolution} px, "
        f"batch {args.batch_size}, fp32"
    )
    print(f"{'variant':<32} {'s/epoch':>8} {'img/s':>8} {'x baseline':>10}")
    n = (args.images // args.batch_size) * args.batch_size
    for name, seconds in rows:
        print(f"{name:<32} {seconds:>8.2f} {n / seconds:>8.0f} {seconds / base:>10.3f}")
    print(f"{'cache pass (8 views, once)':<32} {cache_s:>8.2f} {8 * args.images / cache_s:>8.0f} {cache_s / base:>10.3f}")


if __name__ == "__main__":
    main()
