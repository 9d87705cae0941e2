"""The report's tables: a numeric frame (written as CSV) and a formatted frame (shown) for each.

Accuracies and macro metrics are percentages of the test split with 2 decimals;
differences are percentage points (pp).  Cells without a finished trial are ``—``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kdbench.bench_summary import BENCH_COMMAND, speedups
from kdbench.data.specs import get_spec
from kdbench.errors import UserError
from kdbench.profile import FLOP_CONVENTION, compression
from kdbench.report.load import BENCH_FILE, ReportData, int8_correct, row_name, test_correct
from kdbench.report.stats import (
    CONFIDENCE,
    EXACT_MAX_SEEDS,
    MIN_SEEDS,
    Difference,
    bootstrap_difference,
    disagreement,
    holm,
    mcnemar_exact,
    paired_difference,
    summarize,
    verdict,
)
from kdbench.sweep.ablation import same

PAPER = "arXiv 2606.14886"
PAPER_BEST_ACCURACY = 99.04  # percent, the paper's best reported test accuracy; not a result of this code
PAPER_LABEL = "paper (reported)"
BEST_MARK = "★"
MISSING = "—"
VERDICT_TEXT = {"gain": "gain", "loss": "loss", "no significant difference": "n.s.", "too few seeds": "no verdict"}
BORDERLINE_MARK = "†"  # the bootstrap verdict and the per-seed McNemar tests disagree (stats.disagreement)
MISSING_BENCH_NOTE = (
    f"No {BENCH_FILE} in the sweep folder: CPU latency and throughput were not measured, so speed-ups and the "
    f"accuracy-vs-latency plot are left out. To add them, write {BENCH_FILE} into this folder with the inference benchmark, "
    f"e.g. for reports/quick: {BENCH_COMMAND}."
)


@dataclass(frozen=True)
class Table:
    """One table of the report.

    ``data`` is written to ``tables/<name>.csv``; ``display`` (strings) is what the
    report shows, one block per value of its ``group`` column when that is set.
    """

    name: str
    title: str
    data: pd.DataFrame
    display: pd.DataFrame
    notes: tuple[str, ...] = field(default=())
    group: str | None = None


# --- formatting -----------------------------------------------------------------------------------
def number(value: float, digits: int = 2, sign: bool = False) -> str:
    """``value`` with ``digits`` decimals (``+`` for positives when ``sign``), ``—`` for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def mean_std(mean: float, std: float) -> str:
    """``mean ± std``, just the mean when the std is undefined (one seed), ``—`` without data."""
    if math.isnan(mean):
        return MISSING
    return number(mean) if math.isnan(std) else f"{number(mean)} ± {number(std)}"


def difference_text(diff: Difference, seeds: int, call: str, flag: str = "") -> str:
    """A paired difference in pp with its bootstrap interval and verdict ``call`` (:func:`judge`), or why there is
    none; :data:`BORDERLINE_MARK` where ``flag`` says the verdict is borderline."""
    if diff.n == 0 or math.isnan(diff.mean):
        return MISSING
    pairs = f"; {diff.n} of {seeds} seeds paired" if diff.n < seeds else ""
    if math.isnan(diff.low):
        return f"{number(diff.mean, sign=True)} (no interval{pairs})"
    interval = f"[{number(diff.low, sign=True)}, {number(diff.high, sign=True)}]"
    mark = f" {BORDERLINE_MARK}" if flag else ""
    return f"{number(diff.mean, sign=True)} {interval} {VERDICT_TEXT[call]}{mark}{pairs}"


def judge(frame: pd.DataFrame, family: pd.Series | None, prefix: str = "diff", mcnemar: str | None = "mcnemar_p") -> pd.DataFrame:
    """``frame`` with the verdicts of its ``<prefix>_*`` bootstrap differences (:func:`kdbench.report.stats.verdict`).

    ``family`` labels the rows whose comparisons form one family for Holm's adjustment (NaN: a row without a
    comparison); None: no adjustment (``<prefix>_p_holm`` is the p-value itself).  Adds ``<prefix>_p_holm``,
    ``<verdict column>`` (``verdict`` for ``diff``, else ``<prefix>_verdict``) and ``<prefix>_flag``: why the verdict
    is borderline against the per-seed McNemar p-values in column ``mcnemar`` (:func:`kdbench.report.stats.disagreement`).
    """
    p = frame[f"{prefix}_p"].astype(float)
    adjusted = p.copy()
    if family is not None:
        for _, rows in frame.groupby(family, sort=False, dropna=True):
            adjusted.loc[rows.index] = holm(list(p.loc[rows.index]))
    calls = [verdict(boot_of(r, prefix), a) if r[f"{prefix}_n"] else "" for (_, r), a in zip(frame.iterrows(), adjusted)]
    flags = [disagreement(call, r[mcnemar]) if mcnemar and call else "" for call, (_, r) in zip(calls, frame.iterrows())]
    column = "verdict" if prefix == "diff" else f"{prefix}_verdict"
    return frame.assign(**{f"{prefix}_p_holm": adjusted, column: calls, f"{prefix}_flag": flags})


def one_family(members: pd.Series) -> pd.Series:
    """A :func:`judge` family: one Holm family of the rows where ``members`` is True (NaN, no comparison, elsewhere)."""
    return pd.Series("family", index=members.index).where(members)


def verdict_rules(family: str) -> str:
    """The note that states the verdict rules of a table whose comparisons form ``family``."""
    return (
        f"Verdicts: a gain (or loss) only where the {CONFIDENCE:.0%} interval excludes 0, the Holm-adjusted p-value over "
        f"{family} is below {1 - CONFIDENCE:.2f} (statsmodels; the CSV has diff_p and diff_p_holm), and at least "
        f"{MIN_SEEDS} seeds are paired: with fewer, training noise (which one or two seeds cannot measure) can exceed "
        f"the test-image interval, so the difference and its interval are shown with no verdict. The bootstrap "
        f"distribution is computed exactly (up to {EXACT_MAX_SEEDS} seeds), not sampled, so no verdict rests on "
        f"Monte-Carlo noise. {BORDERLINE_MARK}: borderline, the verdict disagrees with the per-seed McNemar tests "
        "(the CSV's diff_flag says how)."
    )


def p_values_text(p_values: tuple[float, ...]) -> str:
    return ", ".join(f"{p:.3f}" if p >= 0.001 else "<0.001" for p in p_values) or MISSING


def axis_value(value: float) -> str:
    return f"{value:g}"


# --- 1. accuracy ----------------------------------------------------------------------------------
def accuracy_table(data: ReportData) -> Table:
    """Table 1: default-point trials of every method per dataset, test metrics over seeds, paired Δ vs baseline."""
    trials = data.trials[data.trials["default"]]
    shared = data.ablation.teacher_seed is not None
    rows = [_accuracy_row(trials, dataset, method, shared) for dataset in data.datasets for method in _methods(data)]
    frame = pd.DataFrame(rows)
    # two families of comparisons with the baseline: the students' (every dataset) and the teacher's
    family = frame["role"].where(frame["method"] != "baseline")
    frame = judge(frame, family)
    frame["best_student"] = _best_student(frame)
    frame["star"] = _star(frame)
    ci = f"{CONFIDENCE:.0%}"
    display = pd.DataFrame(
        {
            "Dataset": frame["dataset"],
            "Method": [f"{label} {BEST_MARK}" if star else label for label, star in zip(frame["label"], frame["star"])],
            "Seeds": [f"{n}/{planned}" for n, planned in zip(frame["n"], frame["planned"])],
            "Test acc. %, best-val ckpt": [mean_std(m, s) for m, s in zip(frame["best_mean"], frame["best_std"])],
            "Macro F1 %": frame["f1"].map(number),
            "Test acc. %, last epoch": [mean_std(m, s) for m, s in zip(frame["last_mean"], frame["last_std"])],
            f"Δ vs baseline, pp [{ci} CI]": [
                "reference" if r.method == "baseline" else difference_text(boot_of(r), len(data.seeds), r.verdict, r.diff_flag)
                for r in frame.itertuples()
            ],
            "McNemar p per seed": ["" if r.method == "baseline" else p_values_text(r.mcnemar_p) for r in frame.itertuples()],
        }
    )
    published = [
        dict.fromkeys(display.columns, "")
        | {
            "Dataset": f"{dataset}: published, not from this run ({p.source})",
            "Method": f"{p.model}; {p.protocol}",
            "Test acc. %, best-val ckpt": number(p.accuracy),
        }
        for dataset in data.datasets
        for p in get_spec(data.name(dataset).dataset).published
    ]
    reference = dict.fromkeys(display.columns, "") | {
        "Dataset": f"reference, not from this run: {PAPER}",
        "Method": PAPER_LABEL,
        "Test acc. %, best-val ckpt": number(PAPER_BEST_ACCURACY),
    }
    display = pd.concat([display, pd.DataFrame([*published, reference])], ignore_index=True)
    notes = (
        "Default point only ([methods.<name>] of the ablation, as planned)"
        + "".join(f"; {label}: {settings}" for label, settings in own_defaults(data))
        + ".",
        "Best-val ckpt: the weights of the epoch with the best validation accuracy, evaluated on the test split; "
        "last epoch: the final weights. Accuracies are mean ± sample standard deviation over seeds; macro F1 (and, in "
        "the CSV, macro precision and recall) are means over seeds. Seeds: finished / planned.",
        f"Δ: test accuracy minus the student baseline's in percentage points, paired by seed and by test image; "
        f"{ci} interval of a two-way bootstrap that resamples both the seeds and the test images "
        "(percentile interval), so it holds test-set noise as well as seed noise. The CSV also has the Student-t "
        "interval over seeds alone (diff_t_low, diff_t_high).",
        verdict_rules("the students' comparisons with the baseline on every dataset (the teacher's are a family of their own)"),
        "McNemar p per seed: exact two-sided McNemar test of the method against the baseline on the same test images, "
        "one p-value per seed (binomial test of the images only one of the two gets right).",
        *(
            ["The teacher's row pairs its one trial (the ablation's [teacher] seed) with every seed of the baseline."]
            if shared
            else []
        ),
        f"{BEST_MARK} the most accurate student among those with a significant gain over the baseline; no mark on a "
        "dataset where no method has one.",
        f"Last rows: published accuracies of the datasets (kdbench.data.specs; only numbers checked against their "
        "source are listed: none yet for UC Merced and RSSCN7), under their own protocols (ImageNet fine-tuning, "
        f"their image size and training share), and the best test accuracy the paper reports ({PAPER}); for "
        "reference, not from this run, and not in the CSV.",
    )
    frame = frame.drop(columns=["mcnemar_p"]).assign(mcnemar_p=frame["mcnemar_p"].map(p_values_text))
    return Table("accuracy", "Table 1. Test accuracy per method", _round(frame), display, notes, group="Dataset")


def boot_of(row, prefix: str = "diff") -> Difference:
    """The bootstrap difference stored in ``row``'s ``<prefix>_mean/low/high/n/p`` (a tuple or a Series)."""
    get = row.get if isinstance(row, pd.Series) else lambda k: getattr(row, k)
    return Difference(*(get(f"{prefix}_{k}") for k in ("mean", "low", "high", "n", "p")))


def own_defaults(data: ReportData) -> list[tuple[str, str]]:
    """(label, default-point text) of each method of the ablation that has hyperparameters ([methods.<name>]),
    as its default trial's plan says."""
    return [
        (plan.label, plan.settings)
        for m in _methods(data)
        for plan in [next((p for p in data.plans.values() if row_name(p) == m and p.default), data.plan(m))]
        if plan.own_params
    ]


def _methods(data: ReportData) -> list[str]:
    """The ablation's methods in the order of every table (:attr:`ReportData.methods`)."""
    return data.methods


def _accuracy_row(trials: pd.DataFrame, dataset: str, method: str, shared_teacher: bool) -> dict:
    planned = trials[(trials["dataset"] == dataset) & (trials["method"] == method)]
    done = planned[planned["status"] == "done"]
    best, last = summarize(list(done["best_acc"])), summarize(list(done["last_acc"]))
    baseline = _done(trials, dataset, "baseline")
    paired = _every_seed(done, baseline) if shared_teacher and planned["role"].eq("teacher").any() else done
    comparison = compare(paired, baseline)
    return {
        "dataset": dataset,
        "method": method,
        "label": planned["label"].iloc[0] if len(planned) else method,
        "role": planned["role"].iloc[0] if len(planned) else "student",
        "n": best.n,
        "planned": len(planned),
        "best_mean": best.mean,
        "best_std": best.std,
        **{m: summarize(list(done[f"best_{m}"])).mean for m in ("precision", "recall", "f1")},
        "last_mean": last.mean,
        "last_std": last.std,
        **(comparison if method != "baseline" else dict.fromkeys(comparison, math.nan) | {"diff_n": 0, "mcnemar_p": ()}),
    }


def _done(trials: pd.DataFrame, dataset: str, method: str) -> pd.DataFrame:
    return trials[(trials["dataset"] == dataset) & (trials["method"] == method) & (trials["status"] == "done")]


def _every_seed(teacher: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """The one teacher per split of an ablation with ``[teacher] seed`` as the partner of every baseline seed of its split."""
    if teacher["split"].nunique() != len(teacher):
        return teacher
    of_split = dict(zip(teacher["split"], teacher.index))
    partners = [teacher.loc[[of_split[b.split]]].assign(seed=b.seed) for b in baseline.itertuples() if b.split in of_split]
    return pd.concat(partners, ignore_index=True) if partners else teacher.iloc[:0]


def compare(done: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """``done``'s trials against ``reference``'s, paired by seed and test image: the bootstrap Δ (``diff_*``, its
    p-value ``diff_p``; :func:`judge` gives the verdict), the Student-t interval over seeds alone (``diff_t_*``)
    and the exact McNemar p-value of each seed."""
    by_seed_t = paired_difference(_by_seed(done), _by_seed(reference))
    correct, paired = paired_correct(done, reference)
    boot = bootstrap_difference(correct, paired)
    return {
        "diff_mean": boot.mean,
        "diff_low": boot.low,
        "diff_high": boot.high,
        "diff_n": boot.n,
        "diff_p": boot.p,
        "diff_t_low": by_seed_t.low,
        "diff_t_high": by_seed_t.high,
        "mcnemar_p": tuple(mcnemar_exact(correct[s], paired[s]) for s in sorted(correct.keys() & paired.keys())),
    }


def _by_seed(trials: pd.DataFrame) -> dict[int, float]:
    return dict(zip(trials["seed"], trials["best_acc"]))


def paired_correct(done: pd.DataFrame, reference: pd.DataFrame) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """seed -> per-test-image correctness of ``done``'s and ``reference``'s trials, for the seeds both have on the same images."""
    correct, paired = {}, {}
    base = {t.seed: t.result for t in reference.itertuples()}
    for t in done.itertuples():
        pair = base.get(t.seed)
        if pair is None or pair.test_targets != t.result.test_targets:
            continue  # no per-image predictions (an older store) or other test images: not paired
        correct[t.seed], paired[t.seed] = test_correct(t.result), test_correct(pair)
    return correct, paired


def _best_student(frame: pd.DataFrame) -> pd.Series:
    """True on the student rows with the highest mean accuracy of their dataset (all of them on a tie)."""
    students = frame["role"] == "student"
    top = frame[students].groupby("dataset")["best_mean"].transform("max")
    return pd.Series(students & np.isclose(frame["best_mean"], top.reindex(frame.index)), index=frame.index)


def _star(frame: pd.DataFrame) -> pd.Series:
    """True on the most accurate student row of each dataset among those with a significant gain over the baseline."""
    gains = (frame["verdict"] == "gain") & (frame["role"] == "student")
    top = frame[gains].groupby("dataset")["best_mean"].transform("max")
    return pd.Series(gains & np.isclose(frame["best_mean"], top.reindex(frame.index)), index=frame.index)


def best_students(accuracy: Table) -> dict[str, str]:
    """dataset -> its most accurate student in Table 1, the first in method order on a tie (datasets without one left out)."""
    best = accuracy.data[accuracy.data["best_student"]].drop_duplicates("dataset")
    return dict(zip(best["dataset"], best["method"]))


CLAIM_METHOD = "kd_kl_cos"  # the paper's method; its claim: it beats the baseline and the single-loss KD students


def claim_table(data: ReportData) -> Table | None:
    """Table 1b: the paper's method against every other student method of the ablation, paired by seed and test image."""
    methods = [m for m in _methods(data) if data.plan(m).role == "student" and m != CLAIM_METHOD]
    if CLAIM_METHOD not in data.ablation.grid.methods or not methods:
        return None
    trials = data.trials[data.trials["default"]]
    rows = [
        {"dataset": dataset, "method": m, "label": data.label(m)}
        | compare(_done(trials, dataset, CLAIM_METHOD), _done(trials, dataset, m))
        for dataset in data.datasets
        for m in methods
    ]
    frame = pd.DataFrame(rows)
    frame = judge(frame, frame["dataset"])
    ci, name = f"{CONFIDENCE:.0%}", data.label(CLAIM_METHOD)
    display = pd.DataFrame(
        {
            "Dataset": frame["dataset"],
            f"{name} against": frame["label"],
            f"Δ, pp [{ci} CI]": [
                difference_text(boot_of(r), len(data.seeds), r.verdict, r.diff_flag) for r in frame.itertuples()
            ],
            "McNemar p per seed": frame["mcnemar_p"].map(p_values_text),
        }
    )
    notes = (
        f"The paper's claim is that its loss ({name}) beats the baseline student and the single-loss KD students. "
        f"Δ: test accuracy of {name} minus that of the method named, default point, paired by seed and test image, "
        f"with the {ci} two-way bootstrap interval of Table 1. The claim holds on a dataset only where every "
        "comparison is a gain.",
        verdict_rules("each dataset's comparisons (conservative for the claim, which needs every one of them)"),
    )
    frame = frame.assign(mcnemar_p=frame["mcnemar_p"].map(p_values_text))
    return Table("claim", f"Table 1b. {name} against each other student", _round(frame), display, notes, group="Dataset")


def claim_verdict(calls) -> str:
    """The paper's claim from the verdicts ``calls`` of its method's comparisons: ``holds`` when every one is a gain,
    ``contradicted`` when one is a loss, ``not judged`` when one has too few seeds for a verdict, ``not shown``
    otherwise."""
    verdicts = set(calls)
    if "too few seeds" in verdicts:
        return "not judged"
    if verdicts == {"gain"}:
        return "holds"
    return "contradicted" if "loss" in verdicts else "not shown"


# --- 2. complexity and speed ----------------------------------------------------------------------
def complexity_table(data: ReportData) -> Table:
    """Table 2: parameters, FLOPs and checkpoint size of the teacher and student per dataset, and their ratios.

    The CSV has one row per dataset: ``teacher_*`` and ``student_*`` columns (model, params,
    flops, bytes) and ``*_ratio`` columns (teacher / student), empty where a role has not finished.
    """
    rows, display = [], []
    for dataset in data.datasets:
        info = {role: _complexity(data, dataset, role) or {} for role in ("teacher", "student")}
        known = info["teacher"] or info["student"]
        ratios = compression(info["teacher"], info["student"]) if all(info.values()) else {}
        row = {"dataset": dataset, "resolution": known.get("resolution"), "num_classes": known.get("num_classes")}
        for role, c in info.items():
            row |= {
                f"{role}_model": c.get("model"),
                f"{role}_params": c.get("params_total"),
                f"{role}_flops": c.get("flops"),
                f"{role}_bytes": c.get("checkpoint_bytes"),
            }
            display.append(_model_cells(dataset, role, c))
        rows.append(row | {f"{key}_ratio": ratios.get(key) for key in ("params", "flops", "bytes")})
        display.append(_ratio_cells(dataset, ratios))
    counts = [
        "resolution",
        "num_classes",
        *(f"{r}_{k}" for r in ("teacher", "student") for k in ("params", "flops", "bytes")),
    ]
    frame = pd.DataFrame(rows).astype(dict.fromkeys(counts, "Int64")).round(2)
    notes = (
        f"{FLOP_CONVENTION}. GFLOPs are for one image at the trained resolution.",
        "Size on disk: bytes of the saved fp32 state dict (MB = 10^6 bytes). Ratio: how many times smaller the student is.",
    )
    return Table("complexity", "Table 2. Model complexity", frame, pd.DataFrame(display), notes, group="Dataset")


def _model_cells(dataset: str, role: str, c: dict) -> dict:
    """A display row of one model: counts in millions, GFLOPs and MB (``—`` when no trial of the role finished)."""

    def scaled(field: str, unit: float) -> str:
        return f"{c[field] / unit:.4g}" if field in c else MISSING

    return {
        "Dataset": dataset,
        "Model": f"{role}: {c.get('model', MISSING)}",
        "Input": f"{c['resolution']} px, {c['num_classes']} classes" if c else MISSING,
        "Params (M)": scaled("params_total", 1e6),
        "GFLOPs / image": scaled("flops", 1e9),
        "Size on disk (MB)": scaled("checkpoint_bytes", 1e6),
    }


def _ratio_cells(dataset: str, ratios: dict) -> dict:
    """The display row of the teacher / student ratios."""

    def times(key: str) -> str:
        return f"{ratios[key]:.1f}×" if key in ratios else MISSING

    return {
        "Dataset": dataset,
        "Model": "ratio teacher / student",
        "Input": MISSING,
        "Params (M)": times("params"),
        "GFLOPs / image": times("flops"),
        "Size on disk (MB)": times("bytes"),
    }


def _complexity(data: ReportData, dataset: str, role: str) -> dict | None:
    """The complexity record of a finished trial of ``role`` on ``dataset`` (equal for all of them), if any."""
    done = data.done
    found = done[(done["dataset"] == dataset) & (done["role"] == role) & done["complexity"].notna()]
    return found["complexity"].iloc[0] if len(found) else None


def latency_table(data: ReportData) -> Table:
    """Table 2b: CPU inference latency and throughput from ``bench.json``, with the teacher/student speed-up."""
    bench = data.bench
    frame = bench[
        [
            "model",
            "runtime",
            "resolution",
            "batch",
            "threads",
            "rounds",
            "latency_median_ms",
            "latency_iqr_ms",
            "images_per_s",
        ]
    ]
    frame = frame.round({"latency_median_ms": 3, "latency_iqr_ms": 3, "images_per_s": 1})
    pair = (data.ablation.teacher.model, data.ablation.student.model)
    try:
        ratio = {(r.batch, r.resolution, r.runtime): r.speedup for r in speedups(bench, *pair).itertuples()}
    except UserError:  # the benchmark did not time both trained models at the same settings
        ratio = {}
    display = pd.DataFrame(
        {
            "Model": frame["model"],
            "Runtime": frame["runtime"],
            "Input": frame["resolution"].map(lambda r: f"{r} px"),
            "Batch": frame["batch"].astype(str),
            "Threads": frame["threads"].astype(str),
            "Latency median ms [IQR]": [
                f"{m:.2f} [{q:.2f}]" for m, q in zip(frame["latency_median_ms"], frame["latency_iqr_ms"])
            ],
            "Images / s": frame["images_per_s"].map(lambda v: f"{v:.1f}"),
            "Speed-up": [
                f"{ratio[k]:.1f}×" if k in ratio and m == pair[1] else ""
                for k, m in zip(zip(frame["batch"], frame["resolution"], frame["runtime"]), frame["model"])
            ],
        }
    )
    notes = [
        f"From {BENCH_FILE} (pytest-benchmark): wall time of one forward pass of the whole batch on the CPU, median and "
        "inter-quartile range over the timed rounds; images / s = batch / median latency. The benchmark uses random "
        "weights and 10 classes at its own input size, which may differ from the trained resolution.",
    ]
    notes.append(
        f"Speed-up: {pair[0]} latency / {pair[1]} latency at the same batch, input size and runtime."
        if ratio
        else "No speed-up: the benchmark did not time the trained teacher and student at the same settings."
    )
    notes += _bench_model_notes(data)
    return Table("latency", "Table 2b. CPU inference latency and throughput", frame, display, tuple(notes))


def _bench_model_notes(data: ReportData) -> list[str]:
    timed = set(data.bench["model"])
    return [
        f"The trained {role} {model} is not in {BENCH_FILE} (it times {', '.join(sorted(timed))})."
        for role, model in (("teacher", data.ablation.teacher.model), ("student", data.ablation.student.model))
        if model not in timed
    ]


# --- 2c. INT8 deployment --------------------------------------------------------------------------
INT8_RUNTIMES = (("torch", "torch fp32"), ("onnxruntime", "ORT fp32"), ("onnxruntime-int8", "ORT INT8"))


def int8_table(data: ReportData) -> Table | None:
    """Table 2c: fp32 against INT8 test accuracy of the teacher and each student (default point), paired by seed and test
    image, the INT8 drop of each KD student against the baseline's, sizes on disk and CPU latency; None without
    ``[deploy] int8``."""
    if not data.ablation.deploy.int8:
        return None
    trials = data.trials[data.trials["default"]]
    rows = []
    for dataset in data.datasets:
        drops = {m: _int8_drops(_done(trials, dataset, m)) for m in _methods(data)}
        for method in _methods(data):
            done = _done(trials, dataset, method)
            quantized = done[done["int8"].notna()]
            fp32, int8 = summarize(list(quantized["best_acc"])), summarize(list(quantized["int8_acc"]))
            correct = {t.seed: int8_correct(t.int8, t.result) for t in quantized.itertuples()}
            reference = {t.seed: test_correct(t.result) for t in quantized.itertuples()}
            boot = bootstrap_difference(correct, reference)
            kd = data.plan(method).role == "student" and method != "baseline"  # its INT8 drop against the baseline's
            vs_base = bootstrap_difference(drops[method] if kd else {}, drops.get("baseline", {}))
            first = quantized["int8"].iloc[0] if len(quantized) else None
            model = done["model"].iloc[0] if len(done) else None
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "label": data.label(method),
                    "role": data.plan(method).role,
                    "model": model,
                    "n": len(done),
                    "int8_n": int8.n,
                    "fp32_mean": fp32.mean,
                    "fp32_std": fp32.std,
                    "int8_mean": int8.mean,
                    "int8_std": int8.std,
                    "diff_mean": boot.mean,
                    "diff_low": boot.low,
                    "diff_high": boot.high,
                    "diff_n": boot.n,
                    "diff_p": boot.p,
                    "mcnemar_p": tuple(mcnemar_exact(correct[k], reference[k]) for k in sorted(correct)),
                    "drop_vs_baseline_mean": vs_base.mean,
                    "drop_vs_baseline_low": vs_base.low,
                    "drop_vs_baseline_high": vs_base.high,
                    "drop_vs_baseline_n": vs_base.n,
                    "drop_vs_baseline_p": vs_base.p,
                    "bytes_fp32": first.bytes_fp32 if first else math.nan,
                    "bytes_int8": first.bytes_int8 if first else math.nan,
                    "quantize_s": quantized["int8"].map(lambda r: r.quantize_s).mean() if len(quantized) else math.nan,
                    **_int8_latency(data, model),
                }
            )
    frame = pd.DataFrame(rows)
    frame = judge(frame, one_family(frame["diff_n"] > 0))  # every INT8 - fp32 comparison
    frame = judge(frame, one_family(frame["drop_vs_baseline_n"] > 0), prefix="drop_vs_baseline", mcnemar=None)
    ci = f"{CONFIDENCE:.0%}"
    settings = next((r.settings for r in data.done["int8"] if r is not None), None)
    counts = sorted({r.calibration_count for r in data.done["int8"] if r is not None})
    display = pd.DataFrame(
        {
            "Dataset": frame["dataset"],
            "Method": frame["label"],
            "Seeds": [f"{n}/{planned}" for n, planned in zip(frame["int8_n"], frame["n"])],
            "fp32 acc. %": [mean_std(m, s) for m, s in zip(frame["fp32_mean"], frame["fp32_std"])],
            "INT8 acc. %": [mean_std(m, s) for m, s in zip(frame["int8_mean"], frame["int8_std"])],
            f"INT8 − fp32, pp [{ci} CI]": [
                difference_text(boot_of(r), len(data.seeds), r.verdict, r.diff_flag) for r in frame.itertuples()
            ],
            "McNemar p per seed": frame["mcnemar_p"].map(p_values_text),
            f"INT8 drop − baseline's, pp [{ci} CI]": [_drop_text(r, len(data.seeds)) for r in frame.itertuples()],
            "Size MB fp32 / INT8": [
                f"{number(a / 1e6, 1)} / {number(b / 1e6, 1)}" for a, b in zip(frame["bytes_fp32"], frame["bytes_int8"])
            ],
            **{
                f"Latency ms, batch {batch} ({' / '.join(name for _, name in INT8_RUNTIMES)})": [
                    " / ".join(number(getattr(r, f"latency_b{batch}_{_slug(runtime)}")) for runtime, _ in INT8_RUNTIMES)
                    for r in frame.itertuples()
                ]
                for batch in (1, 32)
            },
        }
    )
    method = (
        f"ONNX Runtime static quantization, {settings.format} format, per-channel {settings.weight_type} weights and "
        f"{settings.activation_type} activations, {settings.calibration} calibration on "
        f"{' or '.join(map(str, counts))} training images of each trial (seed {settings.calibration_seed}), preprocessed "
        "like evaluation inputs"
        if settings
        else "no trial was quantized"
    )
    notes = (
        f"INT8: the best-val checkpoint exported to ONNX and quantized ({method}); scored on the same test split. "
        "fp32: the trained model in PyTorch, as in Table 1. Default point only; Seeds: quantized / finished.",
        f"INT8 − fp32: paired by seed and test image (the INT8 model of each trial against that trial), with the {ci} "
        "two-way bootstrap interval of Table 1; McNemar p per seed: exact test of the INT8 model against its fp32 model.",
        "INT8 drop − baseline's: the KD student's INT8 − fp32 difference minus the baseline student's, paired by seed and "
        "test image: whether distillation changes how much accuracy INT8 costs (gain: KD loses less).",
        verdict_rules("the table's INT8 − fp32 comparisons (and, apart, over its KD students' drops against the baseline's)"),
        "Size: the ONNX files on disk (fp32 export / INT8 model). Latency: median of one forward pass of the whole batch "
        f"on the CPU from {BENCH_FILE} (random weights, at the benchmarked input size nearest the trained one): PyTorch "
        "fp32, ONNX Runtime fp32 and ONNX Runtime INT8; — where it was not timed.",
    )
    frame = frame.assign(mcnemar_p=frame["mcnemar_p"].map(p_values_text))
    return Table("int8", "Table 2c. INT8 deployment: accuracy, size and latency", _round(frame), display, notes, group="Dataset")


def _int8_drops(done: pd.DataFrame) -> dict[int, np.ndarray]:
    """seed -> per-test-image INT8 correctness minus fp32 correctness (-1, 0 or 1) of the quantized trials of ``done``."""
    return {
        t.seed: int8_correct(t.int8, t.result).astype(float) - test_correct(t.result)
        for t in done.itertuples()
        if t.int8 is not None
    }


def _drop_text(row, seeds: int) -> str:
    """A KD student's INT8 drop minus the baseline's, ``reference`` for the baseline, nothing for the teacher."""
    if row.method == "baseline":
        return "reference"
    if row.role != "student":
        return ""
    return difference_text(boot_of(row, "drop_vs_baseline"), seeds, row.drop_vs_baseline_verdict)


def _slug(runtime: str) -> str:
    return runtime.replace("-", "_")


def _int8_latency(data: ReportData, model: str | None) -> dict[str, float]:
    """``latency_b<batch>_<runtime>``: median ms of ``model`` in ``bench.json`` per runtime and batch, NaN where not timed."""
    cells = {}
    for batch in (1, 32):
        for runtime, _ in INT8_RUNTIMES:
            timed = bench_latency(data, runtime, batch)[0]
            cells[f"latency_b{batch}_{_slug(runtime)}"] = timed.get(model, math.nan)
    return cells


# --- 3-4. ablations -------------------------------------------------------------------------------
def swept(data: ReportData, axes: tuple[str, ...]) -> pd.DataFrame:
    """The trials at every grid point of the methods swept along any of ``axes``, every other axis at its default.

    Rows are labelled with the grid's method and point, as planning recorded them
    (:attr:`kdbench.records.TrialPlan.grid_points`), also where the point's trial is another method's
    (``kd_kl_cos`` at ``beta = 0`` is the ``kd_cos`` trial), so a figure over the grid shows the whole grid.
    """
    trials = data.trials
    rows = []
    for position, key in enumerate(trials["key"]):
        for where in data.plans[key].grid_points:
            point = dict(where.point)
            default = default_settings(data, where.method)
            off_slice = [a for a in where.axes if a not in axes and a in default and not same(point[a], default[a])]
            if set(axes) & set(where.axes) and not off_slice:
                row = trials.iloc[position].copy()
                row["method"], row["label"] = where.method, where.label
                for axis in where.axes:
                    row[axis] = point[axis]
                rows.append((where.rank, tuple(point[a] for a in where.axes), position, row))
    if not rows:
        return trials.iloc[0:0]
    frame = pd.DataFrame([row for *_, row in sorted(rows, key=lambda r: r[:3])]).reset_index(drop=True)
    rank = frame["dataset"].map({d: i for i, d in enumerate(data.datasets)})
    return frame.assign(_d=rank).sort_values(["_d"], kind="stable", ignore_index=True).drop(columns="_d")


def default_settings(data: ReportData, method: str) -> dict:
    """The default point of ``method`` in the ablation as resolved (``[methods.<name>]``, shorthand expanded)."""
    if method in data.ablation.methods:
        return dict(data.ablation.methods[method].default)
    loss = data.ablation.loss  # a store planned before the paper methods had [methods.<name>] tables
    return {"temperature": loss.temperature, "beta": loss.beta, "gamma": loss.gamma}


def has_ablation(data: ReportData, axes: tuple[str, ...]) -> bool:
    """Whether the sweep holds more than one setting of ``axes`` for some method."""
    trials = swept(data, axes)
    return bool(len(trials)) and trials.groupby("method")[list(axes)].nunique().max(axis=None) > 1


def grid_summary(data: ReportData, axes: tuple[str, ...]) -> pd.DataFrame:
    """Mean, std and count of best-val-checkpoint test accuracy per dataset, method and setting of ``axes``."""
    rows = []
    for (dataset, method, *values), group in swept(data, axes).groupby(["dataset", "method", *axes], sort=False):
        s = summarize(list(group.loc[group["status"] == "done", "best_acc"]))
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "label": group["label"].iloc[0],
                **dict(zip(axes, values)),
                "mean": s.mean,
                "std": s.std,
                "n": s.n,
                "planned": len(group),
            }
        )
    return pd.DataFrame(rows)


def temperature_table(data: ReportData) -> Table:
    """Table 3: accuracy against the distillation temperature, one column per T."""
    frame = grid_summary(data, ("temperature",))
    rows = pd.MultiIndex.from_frame(frame[["dataset", "label"]].drop_duplicates())  # dataset and method order
    cells = frame.assign(cell=[_cell(r) for r in frame.itertuples()])
    display = cells.pivot(index=["dataset", "label"], columns="temperature", values="cell").reindex(rows).fillna(MISSING)
    display.columns = [f"T = {t:g}" for t in display.columns]
    display = display.reset_index().rename(columns={"dataset": "Dataset", "label": "Method"})
    default = data.ablation.loss
    notes = (
        f"Test accuracy % (best-val ckpt), mean ± std (finished seeds / planned), at the default β = "
        f"{axis_value(default.beta)}, γ = {axis_value(default.gamma)}; methods whose loss does not depend on T are in Table 1.",
    )
    return Table("temperature", "Table 3. Temperature ablation", _round(frame), display, notes, group="Dataset")


def weights_table(data: ReportData) -> Table:
    """Table 4: accuracy over the KL weight β and the cosine weight γ."""
    frame = grid_summary(data, ("beta", "gamma"))
    display = pd.DataFrame(
        {
            "Dataset": frame["dataset"],
            "Method": frame["label"],
            "β (KL weight)": frame["beta"].map(axis_value),
            "γ (cosine weight)": frame["gamma"].map(axis_value),
            "Test acc. %, best-val ckpt": [_cell(r) for r in frame.itertuples()],
        }
    )
    notes = (
        f"Mean ± std (finished seeds / planned) at the default T = {axis_value(data.ablation.loss.temperature)}. "
        "A grid point with a weight of 0 is the trial of the method it really is (β = 0: KD (Cos); γ = 0: KD (KL); "
        "both 0: the baseline), trained once and shown here at its grid point.",
    )
    return Table("loss_weights", "Table 4. Loss-weight ablation", _round(frame), display, notes, group="Dataset")


def _cell(row) -> str:
    return f"{mean_std(row.mean, row.std)} ({row.n}/{row.planned})"


# --- trials that did not finish -------------------------------------------------------------------
def incomplete_table(data: ReportData) -> Table:
    """Failed trials (with their error) and planned trials that never finished."""
    trials = data.trials[data.trials["status"] != "done"]
    frame = trials[["dataset", "method", "label", "seed", "temperature", "beta", "gamma", "settings", "status", "error", "key"]]
    display = pd.DataFrame(
        {
            "Dataset": frame["dataset"],
            "Method": frame["label"],
            "Seed": frame["seed"].astype(str),
            "Settings": frame["settings"],
            "Status": frame["status"].map(lambda s: "failed" if s == "failed" else f"missing ({s})"),
            "Error": frame["error"].fillna(""),
            "Key": frame["key"],
        }
    )
    return Table("incomplete", "Table 5. Trials without a result", frame, display)


def trials_table(data: ReportData) -> Table:
    """Every trial of the sweep, one row each (CSV only)."""
    columns = [
        "key",
        "dataset",
        "method",
        "model",
        "seed",
        "temperature",
        "beta",
        "gamma",
        "settings",
        "default",
        "status",
        "best_epoch",
        "best_acc",
        "best_precision",
        "best_recall",
        "best_f1",
        "last_epoch",
        "last_acc",
        "error",
    ]
    frame = _round(data.trials[columns])
    return Table("trials", "All trials", frame, frame.astype(str))


def _round(frame: pd.DataFrame) -> pd.DataFrame:
    """Floats to 2 decimals (percentages and pp), the precision the report shows."""
    return frame.round({c: 2 for c in frame.columns if pd.api.types.is_float_dtype(frame[c])})


def bench_latency(data: ReportData, runtime: str = "torch", batch: int = 1) -> tuple[dict[str, float], int | None]:
    """model -> median CPU latency (ms) at ``batch`` with ``runtime``, at the benchmarked input size nearest the trained
    one, and that size; ``({}, None)`` where it was not timed."""
    if data.bench is None:
        return {}, None
    rows = data.bench[(data.bench["batch"] == batch) & (data.bench["runtime"] == runtime)]
    if rows.empty:
        return {}, None
    trained = data.ablation.data_for(data.ablation.grid.datasets[0]).resolution  # the first dataset's
    resolution = min(rows["resolution"].unique(), key=lambda r: (abs(r - trained), r))
    rows = rows[rows["resolution"] == resolution]
    return dict(zip(rows["model"], rows["latency_median_ms"])), int(resolution)
