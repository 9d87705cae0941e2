"""Across datasets: one verdict on the paper's claim from every dataset of the sweep.

- Mean ranks of the students over blocks (dataset, seed), best = 1, ties averaged, with the Friedman test of
  equal ranks (``scipy.stats.friedmanchisquare``) and the Nemenyi post-hoc p-values
  (``scikit_posthocs.posthoc_nemenyi_friedman``) that the critical-difference diagram draws (Demšar, JMLR 2006).
- Pooled differences (:func:`kdbench.report.stats.pooled_difference`): every student against the baseline, and the
  paper's method against every other student, each dataset resampled on its own (seeds and test images) and the
  datasets weighted equally; Holm over each of the two families; the same verdict rules as Table 1.

Only a sweep of two or more datasets has this table.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats as scipy_stats

from kdbench.report.load import ReportData
from kdbench.report.stats import CONFIDENCE, pooled_difference
from kdbench.report.tables import (
    CLAIM_METHOD,
    MISSING,
    Table,
    boot_of,
    claim_verdict,
    difference_text,
    judge,
    number,
    one_family,
    paired_correct,
    verdict_rules,
)


def across_table(data: ReportData) -> Table | None:
    """Table 1c: each student's mean rank over datasets x seeds and its pooled differences; None for one dataset."""
    students = [m for m in data.methods if data.plan(m).role == "student"]
    if len(data.datasets) < 2 or len(students) < 2:
        return None
    trials = data.done[data.done["default"]]
    ranks = student_ranks(trials, students)
    rows = []
    for m in students:
        row = {"method": m, "label": data.label(m), "mean_rank": ranks.mean().get(m, math.nan), "blocks": len(ranks)}
        row |= _pooled(trials, data.datasets, m, "baseline", "diff") if m != "baseline" else {"diff_n": 0}
        if CLAIM_METHOD in students and m != CLAIM_METHOD:
            row |= _pooled(trials, data.datasets, CLAIM_METHOD, m, "claim")
        else:
            row |= {"claim_n": 0}
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame = judge(frame, one_family(frame["diff_n"] > 0), mcnemar=None)
    frame = judge(frame, one_family(frame["claim_n"] > 0), prefix="claim", mcnemar=None)
    friedman = friedman_test(ranks)
    ci, name, seeds = f"{CONFIDENCE:.0%}", data.label(CLAIM_METHOD), len(data.seeds)
    display = pd.DataFrame(
        {
            "Method": frame["label"],
            f"Mean rank ({len(ranks)} blocks)": frame["mean_rank"].map(number),
            f"Pooled Δ vs baseline, pp [{ci} CI]": [
                "reference" if r.method == "baseline" else difference_text(boot_of(r, "diff"), seeds, r.verdict)
                for r in frame.itertuples()
            ],
            f"Pooled Δ of {name} against it, pp [{ci} CI]": [
                difference_text(boot_of(r, "claim"), seeds, r.claim_verdict) if r.claim_n else MISSING for r in frame.itertuples()
            ],
        }
    )
    notes = (
        f"Mean rank: each student's rank by best-val test accuracy (default point) among the students in each block "
        f"(dataset, seed) that all of them finished, 1 = best, ties averaged; {len(ranks)} complete blocks. "
        + friedman_text(friedman),
        f"Pooled Δ: the mean over the {len(data.datasets)} datasets of the per-dataset Δ of Table 1 (1b), each dataset "
        f"resampled on its own (seeds and test images), the datasets weighted equally; {ci} percentile interval.",
        verdict_rules("the pooled comparisons with the baseline (and, apart, over those of " + name + ")"),
        f"What {len(data.datasets)} datasets can tell: the pooled interval holds the seed and test-image noise within "
        "these datasets, not how the methods would fare on other land-use datasets (a population of 3 datasets is too "
        "small to estimate that spread).",
    )
    frame = frame.assign(friedman_p=friedman.pvalue if friedman else math.nan)
    return Table("across", "Table 1c. Across datasets: ranks and pooled differences", frame.round(4), display, notes)


def student_ranks(trials: pd.DataFrame, students: list[str]) -> pd.DataFrame:
    """Ranks (1 = most accurate) of ``students`` in every complete (dataset, seed) block of ``trials``."""
    students_done = trials[trials["method"].isin(students)]
    table = students_done.pivot_table(index=["dataset", "seed"], columns="method", values="best_acc")
    table = table.reindex(columns=students).dropna()
    return table.rank(axis=1, ascending=False)


def friedman_test(ranks: pd.DataFrame):
    """The Friedman test of equal mean ranks (scipy), or None with fewer than 3 students or 2 blocks."""
    if ranks.shape[1] < 3 or ranks.shape[0] < 2:
        return None
    return scipy_stats.friedmanchisquare(*(ranks[c].to_numpy() for c in ranks.columns))


def friedman_text(result) -> str:
    if result is None:
        return "No Friedman test: it needs at least 3 students and 2 complete blocks."
    return (
        f"Friedman test of equal mean ranks: chi² = {result.statistic:.2f}, p = {result.pvalue:.3g} "
        "(scipy.stats.friedmanchisquare); the critical-difference figure gives the Nemenyi post-hoc tests."
    )


def nemenyi(ranks: pd.DataFrame) -> pd.DataFrame | None:
    """Nemenyi post-hoc p-values between students (scikit-posthocs), or None where Friedman is not defined."""
    if friedman_test(ranks) is None:
        return None
    import scikit_posthocs

    return (
        scikit_posthocs.posthoc_nemenyi_friedman(ranks.to_numpy())  # blocks x students; it ranks each block
        .set_axis(ranks.columns, axis=0)
        .set_axis(ranks.columns, axis=1)
    )


def _pooled(trials: pd.DataFrame, datasets: list[str], method: str, reference: str, prefix: str) -> dict:
    """The pooled difference of ``method`` against ``reference`` over ``datasets`` as ``<prefix>_*`` columns."""
    pairs = []
    for dataset in datasets:
        here = trials[trials["dataset"] == dataset]
        pairs.append(paired_correct(here[here["method"] == method], here[here["method"] == reference]))
    diff = pooled_difference(pairs)
    return {
        f"{prefix}_{k}": v for k, v in zip(("mean", "low", "high", "n", "p"), (diff.mean, diff.low, diff.high, diff.n, diff.p))
    }


def overall_claim(frame: pd.DataFrame) -> str:
    """The paper's claim over every dataset (:func:`kdbench.report.tables.claim_verdict` of the pooled comparisons of
    its method), ``""`` where the table has none."""
    calls = frame.loc[frame["claim_n"] > 0, "claim_verdict"]
    return claim_verdict(calls) if len(calls) else ""
