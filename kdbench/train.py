"""``python -m kdbench.train``: train a teacher, or (with ``--teacher``) a student by KD.

Without ``--teacher`` and ``--method`` it trains a teacher (role ``teacher``: hard labels, VGG16 by default);
``--method baseline`` alone trains the student baseline.

Examples::

    python -m kdbench.train --dataset eurosat --model vgg16_bn --out runs/teacher
    python -m kdbench.train --dataset eurosat --teacher runs/teacher/best.pt --method kd_kl_cos --out runs/kd
    python -m kdbench.train --dataset eurosat --teacher runs/teacher/best.pt --method kd_kl --param temperature=2 --out runs/kl
    python -m kdbench.train --dataset eurosat --teacher runs/teacher/best.pt --method dkd --param beta=4 --out runs/dkd
"""

from __future__ import annotations

import argparse
import sys

from kdbench.advice import command, spelled
from kdbench.config import TEACHER_METHOD, DataConfig, LossConfig, Recipe, TrialConfig, check_recipe
from kdbench.data.config import check_data
from kdbench.errors import UserError, cli_main, log_errors_to
from kdbench.methods import METHODS, get_method


def build_parser() -> argparse.ArgumentParser:
    d, r, lo = DataConfig(), Recipe(), LossConfig()
    p = argparse.ArgumentParser(
        prog=command("train"), description=spelled(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        help="how the student learns (default kd_kl_cos with --teacher); without --method and --teacher a teacher is trained",
    )
    p.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint (best.pt of a teacher run) for KD methods")
    p.add_argument(
        "--trust-teacher",
        action="store_true",
        help="use a teacher checkpoint without provenance (older or foreign; it may have seen this run's test images)",
    )
    p.add_argument(
        "--allow-teacher-resolution",
        action="store_true",
        help="use a teacher trained at another --resolution than this run's (default: refused; recorded in the result)",
    )
    p.add_argument(
        "--allow-chance-teacher",
        action="store_true",
        help="keep a teacher whose validation accuracy is not significantly above chance (default: the run fails)",
    )
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help="eurosat, ucmerced, rsscn7 or imagefolder:<path>")
    g.add_argument("--data-root", help="folder holding the datasets (default $KDBENCH_DATA, else ./data)")
    g.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    g.add_argument("--resolution", type=int, default=d.resolution, help="input side in pixels (default %(default)s)")
    g.add_argument("--images-per-class", type=int, help="seeded subset per class, for quick runs")
    g.add_argument("--classes", help="comma-separated class subset")
    g.add_argument("--val-fraction", type=float, help="default: the dataset's (0.1)")
    g.add_argument("--test-fraction", type=float, help="default: the dataset's (0.2; 0.5 for rsscn7)")
    g.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/val/test split (default %(default)s)")
    g.add_argument("--augment", default=d.augment, help="d4 (default), hflip, none or d4_crop")
    g.add_argument("--skip-bad-images", action="store_true", help="leave unreadable/stray files out and list them in the record")
    g = p.add_argument_group("recipe")
    g.add_argument("--model", help="torchvision model name (default vgg16 for a teacher, mobilenet_v2 for a student)")
    g.add_argument("--pretrained", default=r.pretrained, help="none, imagenet or a state-dict path")
    g.add_argument("--epochs", type=int, default=r.epochs, help="training epochs (default %(default)s)")
    g.add_argument("--optimizer", default=r.optimizer, help="sgd (default) or adamw")
    g.add_argument("--batch-size", type=int, default=r.batch_size, help="training images per step (default %(default)s)")
    g.add_argument("--lr", type=float, default=r.lr, help="peak learning rate, after the warm-up (default %(default)s)")
    g.add_argument("--momentum", type=float, default=r.momentum, help="SGD momentum, AdamW's beta1 (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=r.weight_decay, help="L2 weight decay (default %(default)s)")
    g.add_argument("--schedule", default=r.schedule, help="cosine, onecycle or constant")
    g.add_argument("--warmup-epochs", type=int, default=r.warmup_epochs, help="linear LR warm-up (default %(default)s)")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights, batch order and augmentation (default %(default)s)"
    )
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g = p.add_argument_group("distillation loss: alpha*CE + the method's distillation terms")
    g.add_argument("--alpha", type=float, default=lo.alpha, help="cross-entropy weight (default %(default)s)")
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyperparameter of the method (default: its published value), e.g. --param temperature=2 "
        "--param on=probs; repeatable. "
        + "; ".join(f"{m}: {', '.join(get_method(m).settings())}" for m in METHODS if get_method(m).params),
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    role = "student" if args.method or args.teacher else "teacher"
    method = get_method(args.method or ("kd_kl_cos" if args.teacher else TEACHER_METHOD))
    if method.needs_teacher and not args.teacher:
        raise UserError(f"method {method.name} distils from a teacher: pass --teacher CHECKPOINT")
    default_model = "vgg16" if role == "teacher" else "mobilenet_v2"
    data = DataConfig(
        dataset=args.dataset,
        resolution=args.resolution,
        images_per_class=args.images_per_class,
        classes=tuple(c.strip() for c in args.classes.split(",")) if args.classes else (),
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        augment=args.augment,
        skip_bad_images=args.skip_bad_images,
    )
    recipe = Recipe(
        model=args.model or default_model,
        pretrained=args.pretrained,
        epochs=args.epochs,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=min(args.warmup_epochs, args.epochs),
    )
    loss = LossConfig(alpha=args.alpha, params=tuple(_param(method.name, item) for item in args.param))
    check_data(data, "data")
    check_recipe(recipe, "recipe")
    try:
        method.check(loss, "")
    except UserError as err:
        raise UserError(f"{err} ({method.name}'s settings: {', '.join(method.settings()) or 'none'})") from None
    return TrialConfig(
        method=method.name,
        role=role,
        data=data,
        recipe=recipe,
        loss=loss,
        seed=args.seed,
        teacher_checkpoint=args.teacher,
        device=args.device,
        trust_teacher=args.trust_teacher,
        allow_teacher_resolution=args.allow_teacher_resolution,
        allow_chance_teacher=args.allow_chance_teacher,
    )


def _param(method: str, item: str) -> tuple[str, float | str]:
    """``--param NAME=VALUE`` as ``(name, value)``: a number, or a word for a setting with a fixed set of values.

    A one-line UserError, listing the method's settings, for a name it does not have or a value of the wrong kind.
    """
    m = get_method(method)
    name, sep, text = (part.strip() for part in item.partition("="))
    settings = ", ".join(m.settings()) or "none"
    if not sep or name not in m.settings():
        raise UserError(f"--param {item}: {method} has no setting {name or item!r}: its settings are {settings}")
    if name in m.params.choices:
        return name, text
    try:
        return name, float(text)
    except ValueError:
        raise UserError(
            f"--param {item}: {name} must be a number, e.g. --param {name}=4 ({method}'s settings: {settings})"
        ) from None


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_errors_to(args.out)
    cfg = config_from_args(args)
    from kdbench.engine.runner import run_trial  # torch-heavy import after the arguments are checked

    result = run_trial(
        cfg,
        args.out,
        data_root=args.data_root,
        download=not args.no_download,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(f"wrote {args.out}/metrics.json, best.pt, state.pt, manifest.csv (trial {result.key})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
