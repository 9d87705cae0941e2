"""``python -m kdbench.sweep``: run an ablation file into a resumable results store, then report.

    python -m kdbench.sweep                                  # ablations/quick.toml -> reports/quick/
    python -m kdbench.sweep --config ablations/temperature.toml --set grid.seeds=[0,1,2]
    python -m kdbench.sweep --dry-run                        # list the trials and their cost

The last line printed is ``trials: T total, D done, F failed, S already done``; the
exit status is non-zero when any trial failed or the report could not be written (the
results are in the store then: ``python -m kdbench.report DIR`` rebuilds the report).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from pathlib import Path

from kdbench.advice import command, spelled
from kdbench.errors import UserError, cli_main, describe, log_errors_to, one_line, write_error_log
from kdbench.sweep.ablation import load_ablation, shipped_ablations
from kdbench.sweep.plan import plan_trials
from kdbench.sweep.store import STORE_FILE, Store


def done_keys(path: Path, trials: list) -> set[str]:
    """Keys of ``trials`` that the store at ``path`` holds as done, read without changing the file."""
    if not path.is_file():
        return set()
    store = Store(path, read_only=True)
    try:
        return {t.key for t in trials if store.status(t.key) == "done"}
    finally:
        store.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command("sweep"), description=spelled(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        help=f"ablation TOML file, or the name of a shipped one: {', '.join(shipped_ablations())} (default quick)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any field with a TOML value, e.g. --set teacher.epochs=2 --set grid.seeds=[0,1,2] "
        "--set 'grid.datasets=[\"eurosat\"]' (strings in a list need TOML quotes; repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the expanded trials, their count and cost; train nothing")
    p.add_argument("--out", help="output folder (default reports/<ablation name>/)")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel processes (default 1)")
    p.add_argument(
        "--pack",
        type=int,
        help="students trained together in one packed network (default run.pack: 8 on CUDA, 1 on CPU; 1 disables)",
    )
    p.add_argument("--threads", type=int, help="torch threads per trial (default: CPU cores / workers)")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="local processes (default) or a Ray cluster")
    p.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default $RAY_ADDRESS; none: start a local Ray)",
    )
    p.add_argument("--data-root", help="folder holding the datasets (default $KDBENCH_DATA, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download a missing dataset")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ablation, path, raw = load_ablation(args.config, args.overrides)
    out_dir = Path(args.out or Path("reports") / ablation.name)
    pack = pack_size(args.pack, ablation)
    plan_trials(ablation, pack=pack)  # refuses a bad grid before any dataset is looked for
    if args.dry_run:
        store = out_dir / STORE_FILE
        trials = plan(ablation, pack, args.data_root)
        done = done_keys(store, trials)
        print_plan(trials, args.data_root, ablation.grid.datasets, done, ablation.deploy.int8)
        return 0
    log_errors_to(out_dir)

    from kdbench.sweep.runner import check_datasets, run_sweep
    from kdbench.sweep.worker import SweepContext

    check_datasets(ablation, args.data_root, download=not args.no_download)
    trials = plan(ablation, pack, args.data_root)
    executor = make_executor(args.executor, args.workers, args.ray_address)
    ctx = SweepContext(
        out_dir=str(out_dir.resolve()),
        data_root=str(Path(args.data_root).resolve()) if args.data_root else None,
        download=not args.no_download,
        threads=args.threads or max(1, (os.cpu_count() or 1) // max(args.workers, 1)),
        progress=args.workers == 1 and args.executor == "local" and sys.stderr.isatty(),
    )
    shown = os.path.relpath(path)
    path = Path(shown) if not shown.startswith("..") else path
    print(f"sweep {ablation.name}: {len(trials)} trials from {path} into {out_dir}/")
    counts = run_sweep(ablation, path, raw, trials, out_dir, executor, ctx, pack=pack)
    reported = args.no_report or write_report(out_dir)
    print(f"trials: {counts['total']} total, {counts['done']} done, {counts['failed']} failed, {counts['already']} already done")
    return 1 if counts["failed"] or not reported else 0


def make_executor(name: str, workers: int, ray_address: str | None = None):
    """The executor ``--executor`` names: ``local`` processes or a ``ray`` cluster (imported only then)."""
    if name == "local":
        from kdbench.sweep.executors import LocalExecutor

        return LocalExecutor(workers)
    if name == "ray":
        from kdbench.sweep.ray_executor import RayExecutor

        return RayExecutor(address=ray_address, workers=workers)
    raise UserError(f"unknown executor {name!r}: use local or ray")


def plan(ablation, pack: int, root: str | None):
    """The ablation's trials with complete keys: the datasets' fingerprints (found, not downloaded), the pack size."""
    from functools import cache

    from kdbench.data.select import data_fingerprint

    return plan_trials(ablation, pack=pack, fingerprint=cache(lambda data: data_fingerprint(data, root, download=False)))


def pack_size(requested: int | None, ablation) -> int:
    from kdbench.config import device_type
    from kdbench.sweep.packs import default_pack_size

    if requested is not None and requested < 1:
        raise UserError(f"--pack must be >= 1, got {requested}")
    device = device_type(ablation.run.device)
    if device == "cuda":
        from kdbench.engine.runtime import resolve_device

        resolve_device(device)  # one line, before any work, where no GPU is visible
    return default_pack_size(requested or ablation.run.pack, device)


def write_report(out_dir: Path) -> bool:
    """Write the report; on any failure print one line (the results are safe in the store) and return False."""
    try:
        from kdbench.report import build_report

        paths = build_report(out_dir)
    except Exception as err:  # the trials are recorded: a failing report must not lose them or end in a traceback
        log = write_error_log(err, out_dir, "report")
        reason = one_line(err) if isinstance(err, UserError) else describe(err)
        print(
            f"kdbench: error: the report failed ({reason}); the results are safe in {out_dir / STORE_FILE}: "
            f"rebuild the report with: {command('report', shlex.quote(str(out_dir)))} (full traceback in {log})",
            file=sys.stderr,
            flush=True,
        )
        return False
    print(f"report: {', '.join(str(p) for p in paths)}")
    return True


def print_plan(trials, data_root: str | None, datasets: tuple[str, ...], done: set[str], int8: bool) -> None:
    """The trials with their cost, then per dataset its classes and images, warning about very small classes.

    ``done``: the keys the store at ``--out`` holds finished (the estimate is for the others); ``int8``: ``[deploy] int8``.
    """
    from kdbench.data.specs import dataset_names
    from kdbench.sweep.cost import SMALL_CLASS_SHARE, counts_key, train_images

    names = dataset_names(datasets)
    counts = {}
    images = train_images(trials, data_root, counts)
    width = max(10, *(len(n.display) for n in names.values()))
    print(
        f"{'key':<16}  {'method':<10} {'dataset':<{width}} {'model':<14} {'seed':>4} {'alpha':>5} "
        f"{'epochs':>6} {'epochs x train imgs':>19}  hyperparameters"
    )
    for t in trials:
        c, lo = t.config, t.config.loss
        print(
            f"{t.key:<16}  {t.name:<10} {names[c.data.dataset].display:<{width}} {c.recipe.model:<14} {c.seed:>4} "
            f"{lo.alpha:>5g} {c.recipe.epochs:>6} {images[t.key]:>19,}" + (f"  {t.plan.settings}" if t.plan.settings else "")
        )
    warnings = []
    for dataset, name in names.items():
        trial = next(t for t in trials if t.config.data.dataset == dataset)
        n = counts[counts_key(trial.config.data)]
        per_class = f"{min(n.used)} to {max(n.used)} per class" if min(n.used) != max(n.used) else f"{n.used[0]} per class"
        print(
            f"dataset {name.display} ({n.folder}): {len(n.classes)} classes, {sum(n.found):,} images found, "
            f"{sum(n.used):,} used ({per_class}), {n.train:,} for training"
        )
        small = n.small_classes()
        if small:
            shown = ", ".join(f"{c!r} {k}" for c, k in small)
            warnings.append(
                f"kdbench: warning: dataset {name.display}: {len(small)} class(es) have under {SMALL_CLASS_SHARE:.0%} of the "
                f"median class's {statistics.median(n.used):g} images ({shown}): their accuracy rests on very few test "
                "images and training is imbalanced; add images, or leave them out with data.classes"
            )
    print(
        f"{len(trials)} trials ({sum(t.role == 'teacher' for t in trials)} teachers, "
        f"{sum(t.role != 'teacher' for t in trials)} students); {sum(images.values()):,} training images "
        f"(epochs x images) in all; {cost_line(trials, done, counts, int8)}"
    )
    for line in warnings:
        print(line)


def cost_line(trials, done: set[str], counts, int8: bool) -> str:
    """The estimate of the trials the store does not hold as done, and of running them all afresh where it holds every one."""
    from kdbench.sweep.cost import sweep_seconds

    todo = [t for t in trials if t.key not in done]
    what = f"fp32 training, evaluation{' and INT8 deployment' if int8 else ''}"
    figure = "at the measured rates of a 2-core CPU VM (BENCHMARKS.md; a GPU is 10-100x faster)"
    if not todo:
        fresh = "about " + format_duration(sweep_seconds(trials, counts, int8))
        return f"all {len(trials)} already done in the store: nothing to train; afresh (another --out) {fresh} of {what} {figure}"
    left = f"the {len(todo)} not yet done in the store ({len(done)} are): " if done else ""
    return f"{left}about {format_duration(sweep_seconds(todo, counts, int8))} of {what} {figure}"


def format_duration(seconds: float) -> str:
    """``45 s``, ``12.3 min``, ``5.2 h (307 min)`` or ``12.8 days (307 h)``: the unit a reader can picture."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ({seconds / 60:,.0f} min)"
    return f"{seconds / 86400:.1f} days ({seconds / 3600:,.0f} h)"


if __name__ == "__main__":
    raise SystemExit(main())
