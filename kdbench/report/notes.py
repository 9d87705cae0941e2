"""Caveats read off the data: unfinished sweeps, failed and missing trials, weak teachers, few seeds, best vs last."""

from __future__ import annotations

import pandas as pd

from kdbench.errors import one_line
from kdbench.report.across import overall_claim
from kdbench.report.load import COMPUTATION, ReportData
from kdbench.report.stats import MIN_SEEDS
from kdbench.report.tables import CLAIM_METHOD, PAPER, PAPER_BEST_ACCURACY, PAPER_LABEL, Table, claim_verdict

BEST_LAST_GAP = 1.0  # percentage points between best-val-checkpoint and last-epoch accuracy worth a note


def report_notes(data: ReportData, accuracy: Table) -> list[str]:
    """One sentence (or short list) per caveat that applies to this store, most serious first."""
    return [
        *_unfinished(data),
        *_computed_differently(data),
        *_failed(data),
        *_missing(data),
        *_weak_teachers(data),
        *_at_chance(data),
        *_few_seeds(data, accuracy.data),
        *_best_vs_last(accuracy.data),
        *_skipped_images(data),
        *_int8_notes(data),
        *_caveats(data),
        f"Reference: the paper ({PAPER}) reports a best test accuracy of {PAPER_BEST_ACCURACY:.2f}%, labelled "
        f"'{PAPER_LABEL}' in Table 1 and the accuracy figure; "
        "it comes from the paper's own training settings, not from this run.",
    ]


def findings(accuracy: Table, claim: Table | None, int8: Table | None = None, across: Table | None = None) -> list[str]:
    """Per dataset, what Table 1 says of each distillation method against the baseline (by the significance rule),
    how far the teacher is ahead of the baseline student, whether Table 1b bears out the paper's claim, and whether
    distillation changes how much accuracy INT8 costs (Table 2c); then the paper's claim across datasets (Table 1c)."""
    rows = accuracy.data
    lines = []
    for dataset, group in rows.groupby("dataset", sort=False):
        students = group[(group["role"] == "student") & (group["method"] != "baseline")]
        judged = students[students["verdict"].isin(_VERDICT_PROSE)]
        if judged.empty:
            lines.append(f"{dataset}: no method could be compared with the baseline (no paired finished trials).")
            continue
        gains = judged[judged["verdict"] == "gain"]
        if judged["verdict"].eq("too few seeds").all():
            head = (
                f"with fewer than {MIN_SEEDS} seeds there is no verdict (training noise is not measured); the "
                "differences from the baseline student are"
            )
        elif gains.empty:
            head = "no distillation method is significantly better than the baseline student"
        else:
            head = f"{', '.join(gains['label'])} significantly better than the baseline student"
        lines.append(f"{dataset}: {head} ({_differences(judged)}).")
        lines += _losses(dataset, judged)
        lines += _teacher_gap(dataset, group)
        if claim is not None:
            claimant = group.loc[group["method"] == CLAIM_METHOD, "label"]
            name = claimant.iloc[0] if len(claimant) else CLAIM_METHOD
            lines += _claim(dataset, claim.data[claim.data["dataset"] == dataset], name)
        if int8 is not None:
            lines += _int8_finding(dataset, int8.data[int8.data["dataset"] == dataset])
    if across is not None:
        lines += _across_finding(across.data, accuracy.data)
    return lines


def _across_finding(frame: pd.DataFrame, accuracy: pd.DataFrame) -> list[str]:
    """The paper's claim over every dataset (pooled differences of Table 1c) and the students' mean ranks."""
    datasets = accuracy["dataset"].nunique()
    ranks = "; ".join(f"{r.label} {r.mean_rank:.2f}" for r in frame.sort_values("mean_rank").itertuples())
    friedman = frame["friedman_p"].iloc[0]
    tested = f", Friedman p {'< 0.001' if friedman < 0.001 else f'= {friedman:.3g}'}" if friedman == friedman else ""
    lines = [f"Across the {datasets} datasets: mean ranks (1 = best) {ranks}{tested}."]
    verdict = overall_claim(frame)
    if verdict:
        claimant = accuracy.loc[accuracy["method"] == CLAIM_METHOD, "label"].iloc[0]
        pooled = frame[frame["claim_n"] > 0]
        each = "; ".join(
            f"vs {r.label} {r.claim_mean:+.2f} pp [{r.claim_low:+.2f}, {r.claim_high:+.2f}], {_VERDICT_PROSE[r.claim_verdict]}"
            for r in pooled.itertuples()
        )
        lines.append(
            f"Across the {datasets} datasets, the paper's claim ({claimant} beats every other student) "
            f"{_CLAIM_PROSE[verdict]}: pooled over datasets, {each}. These intervals hold the seed and test-image noise "
            f"of these {datasets} datasets, not the spread between land-use datasets, which {datasets} cannot estimate."
        )
    return lines


def _int8_finding(dataset: str, rows: pd.DataFrame) -> list[str]:
    """Whether the KD students' INT8 drop differs from the baseline student's (paired by seed and test image)."""
    baseline = rows[rows["method"] == "baseline"]
    students = rows[(rows["role"] == "student") & (rows["method"] != "baseline")]
    kd = students[students["drop_vs_baseline_verdict"].isin(_VERDICT_PROSE)]
    if baseline.empty or baseline["int8_n"].iloc[0] == 0 or kd.empty:
        return []
    b = baseline.iloc[0]
    changed = kd[kd["drop_vs_baseline_verdict"].isin(["gain", "loss"])]
    head = (
        f"with fewer than {MIN_SEEDS} seeds there is no verdict on whether distillation changes how much accuracy INT8 costs"
        if kd["drop_vs_baseline_verdict"].eq("too few seeds").all()
        else "distillation changes how much accuracy INT8 costs: "
        + ", ".join(f"{r.label} loses {'less' if r.drop_vs_baseline_verdict == 'gain' else 'more'}" for r in changed.itertuples())
        + " than the baseline student"
        if len(changed)
        else "distillation does not significantly change how much accuracy INT8 costs"
    )
    each = "; ".join(
        f"{r.label} {r.drop_vs_baseline_mean:+.2f} pp [{r.drop_vs_baseline_low:+.2f}, {r.drop_vs_baseline_high:+.2f}]"
        for r in kd.itertuples()
    )
    return [
        f"{dataset}, INT8: {head} (the baseline student's INT8 − fp32 is {b.diff_mean:+.2f} pp "
        f"[{b.diff_low:+.2f}, {b.diff_high:+.2f}]; each KD student's INT8 − fp32 minus the baseline's, paired: {each})."
    ]


def _losses(dataset: str, judged: pd.DataFrame) -> list[str]:
    """What a significant loss against the baseline does and does not say."""
    lost = judged[judged["verdict"] == "loss"]
    if lost.empty:
        return []
    return [
        f"{dataset}: {', '.join(lost['label'])} significantly worse than the baseline student. That is a finding about "
        "these methods' settings (Table 1's note; the published defaults unless the ablation changed them) in this "
        "run's training budget and recipe, not about the methods: their authors tuned them for other budgets (DKD also "
        "warms its loss up over 20 epochs, which kdbench does not; see the method's module), and a larger seed spread "
        "than the baseline's (Table 1) is a sign of unstable training at these settings."
    ]


def _differences(rows: pd.DataFrame) -> str:
    return "; ".join(
        f"{r.label} {r.diff_mean:+.2f} pp [{r.diff_low:+.2f}, {r.diff_high:+.2f}], {_VERDICT_PROSE[r.verdict]}"
        for r in rows.itertuples()
    )


def _teacher_gap(dataset: str, group: pd.DataFrame) -> list[str]:
    teacher = group[(group["role"] == "teacher") & group["verdict"].isin(_VERDICT_PROSE)]
    baseline = group[group["method"] == "baseline"]
    if teacher.empty or baseline.empty:
        return []
    t, b = teacher.iloc[0], baseline.iloc[0]
    meaning = {
        "gain": "the teacher is significantly ahead: this is the gap distillation can close",
        "loss": "the teacher is significantly behind its students: distillation cannot be expected to help",
        "no significant difference": f"the teacher is not significantly ahead, but the interval cannot rule out a gap "
        f"of up to {t['diff_high']:+.2f} pp",
        "too few seeds": f"no verdict with fewer than {MIN_SEEDS} seeds; the interval reaches {t['diff_high']:+.2f} pp",
    }[t["verdict"]]
    return [
        f"{dataset}: teacher {t['best_mean']:.2f}% against baseline student {b['best_mean']:.2f}%, "
        f"{t['diff_mean']:+.2f} pp [{t['diff_low']:+.2f}, {t['diff_high']:+.2f}]; {meaning}."
    ]


def _claim(dataset: str, rows: pd.DataFrame, claimant: str) -> list[str]:
    rows = rows[rows["verdict"].isin(_VERDICT_PROSE)]
    if rows.empty:
        return []
    label = rows["label"]
    verdict = claim_verdict(rows["verdict"])
    against = ", ".join(label)
    return [
        f"{dataset}: the paper's claim ({claimant} beats {against}) {_CLAIM_PROSE[verdict]} here: "
        f"{_differences(rows.assign(label='vs ' + label))}."
    ]


_VERDICT_PROSE = {
    "gain": "a significant gain",
    "loss": "a significant loss",
    "no significant difference": "no significant difference",
    "too few seeds": f"no verdict (fewer than {MIN_SEEDS} seeds)",
}
_CLAIM_PROSE = {
    "not judged": f"is not judged (fewer than {MIN_SEEDS} seeds: no verdict)",
    "holds": "holds",
    "contradicted": "is contradicted (a significant loss)",
    "not shown": "is not shown (no significant gain over every method)",
}


def _unfinished(data: ReportData) -> list[str]:
    if data.sweep["finished_at"] is None:
        return ["The sweep has no finish time: it was interrupted or is still running; this report shows what the store held."]
    return []


def _trial_name(t) -> str:
    return f"{t.label} on {t.dataset}, seed {t.seed} ({t.settings})"


def _failed(data: ReportData) -> list[str]:
    failed = data.trials[data.trials["status"] == "failed"]
    return [f"Failed: {_trial_name(t)}: {one_line(t.error or 'no error recorded')}" for t in failed.itertuples()]


def _missing(data: ReportData) -> list[str]:
    missing = data.trials[data.trials["status"].isin(["pending", "running"])]
    if missing.empty:
        return []
    counts = ", ".join(f"{n} {status}" for status, n in missing["status"].value_counts().sort_index().items())
    return [
        f"Missing: {len(missing)} of {len(data.trials)} planned trials have no result ({counts}); their cells are "
        "— and they are listed under 'Failed and missing trials'."
    ]


def _weak_teachers(data: ReportData) -> list[str]:
    done = data.done
    notes = []
    for teacher in done[done["flags"].map(lambda f: "teacher_weaker_than_students" in f)].itertuples():
        students = done[done["teacher_key"] == teacher.key]
        better = students[students["best_acc"] > teacher.best_acc]
        if better.empty:  # the store flagged it for students outside this sweep
            continue
        best = better.loc[better["best_acc"].idxmax()]
        notes.append(
            f"Teacher weaker than its students: {teacher.model} on {teacher.dataset}, seed {teacher.seed}, reaches "
            f"{teacher.best_acc:.2f}% test accuracy; {len(better)} of its {len(students)} finished students beat it "
            f"(best: {best['label']}, {best['best_acc']:.2f}%), so distillation cannot be expected to help there."
        )
    return notes


CHANCE_FLAGS = {
    "student_at_chance": "Student at chance level",
    "teacher_at_chance": "Teacher at chance level, kept by run.allow_chance_teacher (its students' numbers mean nothing)",
    "chance_untestable": "Too few validation images to test against chance",
}


def _at_chance(data: ReportData) -> list[str]:
    """Trials whose best validation accuracy is not significantly above chance (store flags, kdbench.sweep.store)."""
    notes = []
    for flag, title in CHANCE_FLAGS.items():
        flagged = data.done[data.done["flags"].map(lambda f, flag=flag: flag in f)]
        if len(flagged):
            names = "; ".join(_trial_name(t) for t in flagged.itertuples())
            notes.append(f"{title} (one-sided exact binomial test of the validation accuracy, p >= 0.01): {names}.")
    return notes


def _few_seeds(data: ReportData, accuracy: pd.DataFrame) -> list[str]:
    finished = accuracy[accuracy["n"] > 0]
    if data.ablation.teacher_seed is not None:  # one teacher by design (said in "What ran")
        finished = finished[finished["role"] != "teacher"]
    few = finished[finished["n"] < MIN_SEEDS]
    if few.empty:
        return []
    if len(few) == len(finished) and few["n"].nunique() == 1:
        where = f"every cell of Table 1 has n={few['n'].iloc[0]}"
    else:
        groups = few.groupby("dataset", sort=False)
        where = "; ".join(
            f"{dataset}: " + ", ".join(f"{r.label} n={r.n}" for r in group.itertuples()) for dataset, group in groups
        )
    return [
        f"Fewer than {MIN_SEEDS} finished seeds ({where}): standard deviations are not meaningful there (one seed has "
        "none), and the Δ intervals there hold test-image noise but little or no seed-to-seed noise, so they carry no "
        "gain/loss verdict, no best-student mark and no verdict on the paper's claim."
    ]


def _best_vs_last(accuracy: pd.DataFrame) -> list[str]:
    rows = accuracy[accuracy["n"] > 0]
    gap = rows["best_mean"] - rows["last_mean"]
    wide = gap[gap.abs() >= BEST_LAST_GAP]
    if wide.empty:
        return []
    top = rows.loc[wide.abs().idxmax()]
    return [
        f"The best-val checkpoint and the last epoch differ by {BEST_LAST_GAP:g} pp or more in {len(wide)} of {len(rows)} "
        f"cells of Table 1 (mean test accuracy; largest: {top['dataset']} {top['label']}, {top['best_mean']:.2f}% best vs "
        f"{top['last_mean']:.2f}% last): model selection on the validation split matters there."
    ]


def _caveats(data: ReportData) -> list[str]:
    """How this run's protocol differs from the paper's (ImageNet weights, 224 px), where it does."""
    ab = data.ablation
    scratch = [role for role, r in (("teacher", ab.teacher), ("student", ab.student)) if r.pretrained in ("", "none")]
    notes = []
    if scratch:
        notes.append(
            f"Trained from scratch ({' and '.join(scratch)}, no ImageNet weights), where the paper fine-tunes ImageNet "
            "models: absolute accuracies are far below the paper's, and what this run judges is whether the distillation "
            "losses help a student trained from scratch in this budget."
        )
    small = sorted({ab.data_for(d).resolution for d in ab.grid.datasets if ab.data_for(d).resolution < 224})
    if small:
        notes.append(
            f"Images at {' and '.join(f'{r}×{r}' for r in small)} px (the paper's protocol: 224 px): the networks were "
            "designed for 224 px, so their last feature maps are at most a few pixels wide here."
        )
    return notes


def int8_missing(data: ReportData) -> str:
    """Why ``[deploy] int8`` gave no INT8 result at all."""
    skipped = (data.sweep["summary"] or {}).get("int8_skipped")
    if skipped:
        return f"INT8 deployment was asked for ([deploy] int8 = true) but skipped: {skipped}."
    return "INT8 deployment was asked for ([deploy] int8 = true), but no finished trial has an INT8 result (see Notes)."


def _int8_notes(data: ReportData) -> list[str]:
    """Trials the INT8 step failed for (their trained results stand); a step skipped for the whole sweep is said in
    place of Table 2c (:func:`int8_missing`)."""
    if not data.ablation.deploy.int8:
        return []
    failed = data.done[data.done["int8"].isna() & data.done["int8_error"].notna()]
    return [f"No INT8 model for {_trial_name(t)}: {one_line(t.int8_error)}" for t in failed.itertuples()]


def _skipped_images(data: ReportData) -> list[str]:
    notes = []
    for dataset, group in data.done.groupby("dataset", sort=False):
        skipped = max(len(r.data.get("skipped") or []) for r in group["result"])
        if skipped:
            notes.append(f"{dataset}: {skipped} unreadable or stray files were skipped while indexing the images.")
    return notes


def _computed_differently(data: ReportData) -> list[str]:
    """The finished trials, which every table is built from, where they differ in what can change a trial's numbers
    (:data:`kdbench.report.load.COMPUTATION`): each value with its trial count and datasets (trials without a teacher
    have no teacher source)."""
    parts = []
    for column, what in COMPUTATION.items():
        rows = data.done[data.done[column].notna()]
        if rows[column].nunique() > 1:
            values = "; ".join(
                f"{value}: {len(group)} trials ({', '.join(group['dataset'].unique())})"
                for value, group in rows.groupby(column, sort=True)
            )
            parts.append(f"{what}: {values}")
    if not parts:
        return []
    return [
        "The trials of these tables were computed differently, which can change their numbers (kdbench promises "
        "bitwise-equal reruns only at the same code versions, torch threads, memory format and teacher source): "
        + "; and ".join(parts)
        + "."
    ]
