"""What the report says, in order: what ran, notes, the tables and the figures with their captions."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from kdbench import engine, losses
from kdbench.config import Recipe
from kdbench.data.specs import get_spec
from kdbench.report import figures
from kdbench.report.across import across_table
from kdbench.report.document import Block, Bullets, FigureBlock, Heading, Paragraph, TableBlock
from kdbench.report.load import BENCH_FILE, ReportData
from kdbench.report.notes import findings, int8_missing, report_notes
from kdbench.report.stats import CONFIDENCE
from kdbench.report.tables import (
    MISSING_BENCH_NOTE,
    PAPER_LABEL,
    Table,
    accuracy_table,
    bench_latency,
    best_students,
    claim_table,
    complexity_table,
    has_ablation,
    incomplete_table,
    int8_table,
    latency_table,
    own_defaults,
    temperature_table,
    trials_table,
    weights_table,
)


def build_tables(data: ReportData) -> dict[str, Table]:
    """Every table this store supports, by CSV name (ablation and latency tables only when there is data for them)."""
    tables = [accuracy_table(data), *filter(None, [claim_table(data), across_table(data)]), complexity_table(data)]
    if data.bench is not None:
        tables.append(latency_table(data))
    tables += filter(None, [int8_table(data)])
    if has_ablation(data, ("temperature",)):
        tables.append(temperature_table(data))
    if has_ablation(data, ("beta", "gamma")):
        tables.append(weights_table(data))
    tables += [incomplete_table(data), trials_table(data)]
    return {t.name: t for t in tables}


def draw_figures(data: ReportData, tables: dict[str, Table], folder: Path) -> dict[str, FigureBlock]:
    """Draw and save every figure the store has data for (ablation plots with their tables); report blocks by stem."""
    latency, resolution = bench_latency(data)
    int8_latency = bench_latency(data, "onnxruntime-int8")[0]
    if latency:
        latency_text = f" and its median CPU latency at batch 1 ({resolution} px, {BENCH_FILE})"
    else:
        latency_text = f" (no {BENCH_FILE}: no latency panel)"
    int8 = "int8" in tables and data.done["int8"].notna().any()
    int8_text = (
        " Hollow markers: the same models quantized to INT8 (Table 2c), at the same GFLOPs"
        + (" and at their ONNX Runtime INT8 latency." if int8_latency else ".")
        if int8
        else ""
    )
    specs = [
        (
            "accuracy",
            lambda: figures.accuracy_figure(data),
            "Test accuracy (best-val checkpoint) per method and dataset, default settings: bars are means, "
            "error bars ±1 standard deviation across seeds (none with one seed), "
            f"dots single seeds ({len(data.seeds)} planned). Dashed line: {PAPER_LABEL}, "
            "for reference only.",
        ),
        (
            "forest",
            lambda: figures.forest_figure(
                tables["accuracy"].data,
                tables["claim"].data if "claim" in tables else None,
                tables["across"].data if "across" in tables else None,
            ),
            f"Every difference of Tables 1, 1b and 1c with its {CONFIDENCE:.0%} interval, per dataset and pooled over "
            "datasets (bold), zero dashed: left, each student against the baseline student; right, the paper's method "
            "against each other student. Filled markers: a gain or loss by the verdict rules of the tables; hollow: "
            "no significant difference, or no verdict (fewer than 3 seeds).",
        ),
        (
            "critical_difference",
            lambda: figures.critical_difference_figure(data),
            "Critical-difference diagram (Demšar, JMLR 2006; scikit-posthocs): the students' mean ranks over (dataset, "
            "seed) blocks, 1 = most accurate; students joined by a bar are not significantly different by the Nemenyi "
            "post-hoc test after the Friedman test (Table 1c).",
        ),
        (
            "accuracy_vs_cost",
            lambda: figures.cost_figure(data, latency, int8_latency),
            "Mean test accuracy (±1 std across seeds) against the model's GFLOPs per image "
            f"at the trained resolution{latency_text}. "
            "Squares: teacher; circles: students, spread slightly sideways because they share one architecture." + int8_text,
        ),
        (
            "temperature",
            lambda: figures.temperature_figure(data) if "temperature" in tables else None,
            "Test accuracy against the distillation temperature T: lines are means, bands ±1 std across seeds; dashed lines: "
            "methods that do not depend on T (default settings).",
        ),
        (
            "loss_weights",
            lambda: figures.weights_figure(data) if "loss_weights" in tables else None,
            "Mean test accuracy (%) over the KL weight β and the cosine weight γ, at the default temperature.",
        ),
        (
            "training_curves",
            lambda: figures.curves_figure(data),
            "Validation accuracy per epoch of the teacher and each student (default settings): lines are means, bands ±1 std "
            "across seeds.",
        ),
    ]
    specs += [
        (
            f"confusion_{data.name(dataset).slug}",
            lambda d=dataset, m=method: figures.confusion_figure(data, d, m),
            f"Test confusion matrix of the best student on {dataset} (best-val checkpoint, default settings, summed over its "
            "finished seeds), each row as a percentage of the true class.",
        )
        for dataset, method in best_students(tables["accuracy"]).items()
    ]
    blocks = {}
    for stem, draw, caption in specs:
        fig = draw()
        if fig is not None:
            width = round(100 * min(1.0, fig.get_figwidth() / figures.WIDTH))  # narrow figures stay narrow in the PDF
            figures.save(fig, folder, stem)
            blocks[stem] = FigureBlock(stem, caption, width)
    return blocks


def report_blocks(data: ReportData, tables: dict[str, Table], figs: dict[str, FigureBlock]) -> list[Block]:
    """The whole report, top to bottom."""
    sweep = data.sweep
    blocks: list[Block] = [Heading(f"Knowledge-distillation benchmark: {sweep['name']}", 1)]
    if data.ablation.description:
        blocks.append(Paragraph(description(data)))
    blocks += [Heading("What ran"), Bullets(tuple(run_summary(data)))]
    lines = findings(tables["accuracy"], tables.get("claim"), tables.get("int8"), tables.get("across"))
    blocks += [Heading("Findings"), Bullets(tuple(lines))]
    blocks += [Heading("Notes"), Bullets(tuple(report_notes(data, tables["accuracy"])))]
    accuracy = [tables["accuracy"], *filter(None, [tables.get("claim"), tables.get("across")])]
    blocks += _section("1. Accuracy", accuracy, [figs.get("accuracy"), figs.get("forest"), figs.get("critical_difference")])
    speed = [tables["latency"]] if "latency" in tables else [Paragraph(MISSING_BENCH_NOTE)]
    if "int8" in tables:
        speed.append(tables["int8"] if data.done["int8"].notna().any() else Paragraph(int8_missing(data)))
    blocks += _section("2. Complexity and speed", [tables["complexity"], *speed], [figs.get("accuracy_vs_cost")])
    if "temperature" in tables:
        blocks += _section("3. Temperature ablation", [tables["temperature"]], [figs.get("temperature")])
    if "loss_weights" in tables:
        blocks += _section("4. Loss-weight ablation", [tables["loss_weights"]], [figs.get("loss_weights")])
    blocks += _section("Training curves", [], [figs.get("training_curves")])
    blocks += _section("Confusion matrices", [], [figs.get(f"confusion_{data.name(d).slug}") for d in data.datasets])
    incomplete = tables["incomplete"]
    blocks += [Heading("Failed and missing trials")]
    blocks.append(TableBlock(incomplete) if len(incomplete.display) else Paragraph("None: every planned trial finished."))
    blocks += [Heading("Files"), Bullets(tuple(files_list(tables, figs)))]
    return blocks


def overridden(ablation) -> list[str]:
    """The keys the sweep's ``--set`` overrides changed, once each; their values are in What ran (dataset paths once)."""
    return list(dict.fromkeys(o.partition("=")[0].strip() for o in ablation.overrides))


def description(data: ReportData) -> str:
    """The ablation's description; marked as the file's where ``--set`` overrides changed what ran.

    A file's description speaks of its own settings (quick.toml: "All three datasets ..."), so a sweep with
    overrides (other datasets, seeds, sizes) quotes it as the file's and points to What ran.  An overridden
    ``description`` is the user's own and shown as it is.
    """
    ab = data.ablation
    changed = overridden(ab)
    if not changed or "description" in changed:
        return ab.description
    path = data.sweep["ablation_path"]
    source = Path(path).name if path else "the ablation file"
    return (
        f"Description of {source}, written for its own settings; this sweep overrode {', '.join(changed)} "
        f"(What ran lists what ran): “{ab.description}”"
    )


def _section(title: str, content: list[Table | Paragraph], figs: list[FigureBlock | None]) -> list[Block]:
    """A heading, its tables and paragraphs, then its figures that were drawn (or a line saying there is nothing)."""
    body = [TableBlock(c) if isinstance(c, Table) else c for c in content] + [f for f in figs if f is not None]
    return [Heading(title), *(body or [Paragraph("Nothing to show: no trial of this kind has finished.")])]


def files_list(tables: dict[str, Table], figs: dict[str, FigureBlock]) -> list[str]:
    return [
        "Tables as CSV (numbers at full count or rounded to 2 decimals): " + ", ".join(f"tables/{name}.csv" for name in tables),
        "Figures as PNG and SVG: " + ", ".join(f"figures/{stem}.png|svg" for stem in figs),
    ]


def run_summary(data: ReportData) -> list[str]:
    """The header: ablation, timing, recipes, grid, data and splits, hardware and software."""
    ab, env = data.ablation, data.sweep["environment"] or {}
    g = ab.grid
    versions = ", ".join(f"{k} {env[k]}" for k in ("kdbench", "python", "torch", "torchvision") if env.get(k))
    return [
        f"Ablation {data.sweep['name']} from {data.sweep['ablation_path'] or 'an unnamed file'}"
        + (f", with --set overriding {', '.join(overridden(ab))} (the values that ran are below)" if ab.overrides else "")
        + ".",
        _sweep_line(data),
        f"Teacher: {_recipe(ab.teacher)}{_teacher_seed(ab.teacher_seed)}.",
        *(f"Teacher on {data.names[source].display} ([teacher.{source}]): {_recipe(r)}." for source, r in ab.dataset_teachers),
        f"Student: {_recipe(ab.student)}.",
        f"Loss: α = {ab.loss.alpha:g} (cross-entropy), cosine on {ab.loss.cosine_on}; grid T ∈ {_values(g.temperatures)}, "
        f"β (KL weight) ∈ {_values(g.kl_weights)}, γ (cosine weight) ∈ {_values(g.cos_weights)}; "
        f"methods: {', '.join(g.methods)}.",
        *(f"{label} hyperparameters ([methods] default point): {settings}." for label, settings in own_defaults(data)),
        *(
            f"{data.label(m)} grid: "
            + ", ".join(f"{name} ∈ {_values(values)}" for name, values in ab.methods[m].axes if len(values) > 1)
            + "."
            for m in g.methods
            if m in ab.methods and any(len(values) > 1 for _, values in ab.methods[m].axes)
        ),
        f"Seeds: {', '.join(map(str, g.seeds))} ({len(g.seeds)})"
        + (f" on each of {len(g.split_seeds)} splits (split seeds {', '.join(map(str, g.split_seeds))})" if g.split_seeds else "")
        + f"; Δ intervals are {CONFIDENCE:.0%} two-way bootstrap intervals over seeds and test images.",
        *(f"Dataset {dataset}: {_dataset_line(data, dataset)}." for dataset in data.datasets),
        f"Hardware: {_hardware(env)}; {_formats(data)}.",
        f"Software: {versions}; {env.get('platform', 'platform unknown')}; git commit {env.get('git_commit') or 'unknown'}.",
        *_other_versions(data),
    ]


def _other_versions(data: ReportData) -> list[str]:
    """A line when no finished trial is of this kdbench's code versions (``RESULTS_VERSION``, ``LOSS_VERSION``)."""
    done = data.done
    ours = (done["results_version"] == engine.RESULTS_VERSION) & (done["loss_version"] == losses.LOSS_VERSION)
    if done.empty or ours.any():
        return []
    pairs = zip(done["results_version"], done["loss_version"])
    stored = ", ".join(sorted({f"results version {r}, loss version {lo}" for r, lo in pairs}))
    return [
        f"Results of another kdbench code version: {stored} (this kdbench: results version {engine.RESULTS_VERSION}, "
        f"loss version {losses.LOSS_VERSION}); a rerun with this kdbench trains every trial again."
    ]


def _sweep_line(data: ReportData) -> str:
    """When the trials ran and how long they took (their own records, whichever invocation trained them), and where they stand.

    A trial's time is its result's ``total_s`` (at least its epochs' summed ``train_s``, which survives a
    resume); the span runs from the first trial's start to the last one's end (UTC).
    """
    trials = data.trials
    counts = trials["status"].value_counts()
    status = ", ".join(f"{counts[s]} {s}" for s in ("done", "failed", "running", "pending") if s in counts)
    done = data.done
    seconds = sum(max(r.timings.total_s, r.timings.train_s) for r in done["result"])
    timing = f"trials took {_duration(seconds)} of compute in all" if len(done) else "no trial finished"
    start, end = trials["started_at"].dropna(), done["finished_at"].dropna()
    if len(start) and len(end):
        timing += f", from {_utc(start.min())} to {_utc(end.max())} (span {_duration(end.max() - start.min())})"
    if data.sweep["finished_at"] is None:
        timing += "; the last invocation did not finish"
    return f"{len(trials)} trials planned: {status}; {timing}."


def _teacher_seed(seed: int | None) -> str:
    if seed is None:
        return "; one teacher per student seed, trained with that seed"
    return (
        f"; one teacher per dataset, trained with seed {seed}, serves every student seed (the students' seed-to-seed "
        "spread holds no teacher-to-teacher variation)"
    )


def _recipe(r: Recipe) -> str:
    weights = f"pretrained {r.pretrained}" if r.pretrained != "none" else "from scratch"
    return (
        f"{r.model} ({weights}), {r.epochs} epochs, batch {r.batch_size}, SGD lr {r.lr:g} ({r.schedule}), "
        f"momentum {r.momentum:g}, weight decay {r.weight_decay:g}"
    )


def _dataset_line(data: ReportData, dataset: str) -> str:
    """The dataset's title, its data settings (``[data]`` and its ``[data.<dataset>]`` table) and its split sizes."""
    source = data.name(dataset).dataset
    d = data.ablation.data_for(source)
    images = "all images" if d.images_per_class is None else f"{d.images_per_class} per class"
    classes = f", classes {', '.join(d.classes)}" if d.classes else ""
    split = "" if data.ablation.grid.split_seeds else f", split seed {d.split_seed}"
    done = data.done[data.done["dataset"] == dataset]
    splits = sorted({(r.data["train"], r.data["val"], r.data["test"], len(r.classes)) for r in done["result"]})
    sizes = " or ".join(f"{c} classes, train / val / test = {a} / {b} / {t} images" for a, b, t, c in splits)
    settings = f"{d.resolution}×{d.resolution} px, {images}{classes}, augmentation {d.augment}{split}"
    return f"{get_spec(source).title}; {settings}; {sizes or 'split sizes unknown (no finished trial)'}"


def _formats(data: ReportData) -> str:
    """How the finished trials computed, from each one's record: memory format and precision, with counts."""
    env = [r.environment for r in data.done["result"]]
    counts = Counter(
        f"{e.get('memory_format', 'memory format not recorded (kdbench before it was: contiguous)')}, "
        f"{e.get('precision', 'precision not recorded')}"
        for e in env
    )
    return "; ".join(f"{what} ({n} trials)" for what, n in counts.most_common()) or "no finished trial"


def _hardware(env: dict) -> str:
    cores = f"{env.get('cpu_count', '?')} cores, {env.get('torch_threads', '?')} torch threads"
    parts = [f"{env.get('cpu', 'unknown CPU')} ({cores})", f"device {env.get('device', '?')}"]
    if env.get("gpu"):
        parts.append(f"GPU {env['gpu']}")
    return ", ".join(parts)


def _values(values: tuple[float, ...]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"
