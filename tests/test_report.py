"""The report (kdbench.report) on small synthetic stores: numbers, notes, files, PDF.

The main store has two datasets: eurosat with three seeds (every trial done) and
rsscn7 with one seed done, one trial failed and the other seeds never run; the
grid has two temperatures and two cosine weights so the ablation tables appear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_one_line_error, call_main, run_cli

from kdbench.errors import UserError
from kdbench.records import RESULT_FORMAT, TrialResult, from_json, to_json
from kdbench.report import build_report
from kdbench.report.__main__ import main
from kdbench.report.stats import paired_difference, summarize
from kdbench.sweep.ablation import parse_ablation
from kdbench.sweep.plan import plan_trials
from kdbench.sweep.store import STORE_FILE, Store

RAW = {
    "name": "synthetic",
    "description": "test store",
    "grid": {
        "datasets": ["eurosat", "rsscn7"],
        "seeds": [0, 1, 2],
        "temperatures": [2.0, 4.0],  # the default point is named in [loss], not the first value
        "cos_weights": [0.5, 1.0],
    },
    "loss": {"temperature": 4.0, "gamma": 1.0},
    "data": {"resolution": 32, "images_per_class": 20},
    "teacher": {"epochs": 3},
    "student": {"epochs": 4},
}
CLASSES = {
    "eurosat": [f"class_{i}" for i in range(10)],
    "rsscn7": ["Grass", "Field", "Industry", "RiverLake", "Forest", "Resident", "Parking"],
}
METHOD_ACCURACY = {"teacher": 0.90, "baseline": 0.80, "kd_kl": 0.84, "kd_cos": 0.82, "kd_kl_cos": 0.86}
ENVIRONMENT = {
    "kdbench": "0.1.0",
    "git_commit": "abc1234",
    "python": "3.12",
    "torch": "2.9",
    "torchvision": "0.24",
    "platform": "Linux",
    "cpu": "Test CPU",
    "cpu_count": 2,
    "torch_threads": 2,
    "device": "cpu",
}
FAILED_ERROR = "RuntimeError: out of memory"


def setting(cfg, name: str) -> float:
    """A trial's loss setting as the old shared fields held it: T 1, beta and gamma 0 where its method has none."""
    return dict(cfg.loss.params).get(name, 1.0 if name == "temperature" else 0.0)


def row_of(c) -> str:
    """The report's row of a trial config: its method, or "teacher" for a teacher."""
    return c.method if c.role == "student" else "teacher"


def accuracy(trial) -> float:
    """A made-up but varied best-checkpoint test accuracy for ``trial``."""
    c = trial.config
    row = row_of(c)
    value = METHOD_ACCURACY[row] + 0.013 * ((c.seed * 7 + len(row)) % 3) - 0.01 * (setting(c, "temperature") == 2.0)
    if c.data.dataset == "rsscn7" and c.role == "teacher":
        value = 0.70  # weaker than its students: flagged
    return round(value - 0.005 * (setting(c, "gamma") == 0.5), 4)


def targets(classes: list[str]) -> list[int]:
    """The synthetic test split: 20 images per class, class by class."""
    return [c for c in range(len(classes)) for _ in range(20)]


def predictions(acc: float, classes: list[str]) -> list[int]:
    """Per-image predictions with ``round(acc * n)`` of the ``n`` test images right: the first ones of a fixed
    shuffled order, so a more accurate trial is right on a superset of a less accurate one's images."""
    k = len(classes)
    truth = targets(classes)
    right = set(np.random.default_rng(0).permutation(len(truth))[: prediction_hits(acc, classes)].tolist())
    return [t if i in right else (t + 1) % k for i, t in enumerate(truth)]


def prediction_hits(acc: float, classes: list[str]) -> int:
    return round(acc * 20 * len(classes))


def prediction_accuracy(trial) -> float:
    """The test accuracy (%) of :func:`predictions` for ``trial``'s best checkpoint."""
    classes = CLASSES[trial.config.data.dataset]
    return 100 * prediction_hits(accuracy(trial), classes) / (20 * len(classes))


def metrics(acc: float, classes: list[str]) -> dict:
    k = len(classes)
    diag = round(20 * acc)
    cm = [[diag if i == j else (20 - diag if j == (i + 1) % k else 0) for j in range(k)] for i in range(k)]
    return {
        "accuracy": acc,
        "macro_precision": acc - 0.01,
        "macro_recall": acc - 0.02,
        "macro_f1": acc - 0.015,
        "per_class_accuracy": dict.fromkeys(classes, diag / 20),
        "confusion_matrix": cm,
        "n": 20 * k,
        "loss": 1 - acc,
    }


def result(trial) -> TrialResult:
    """A result shaped like kdbench.engine.runner.run_trial's, with fake metrics."""
    c = trial.config
    classes, best = CLASSES[c.data.dataset], accuracy(trial)
    epochs = c.recipe.epochs
    history = [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "train_accuracy": best * e / epochs,
            "val_loss": 1 / e,
            "val_accuracy": best * e / epochs,
            "lr": 0.01,
            "images_per_s": 100.0,
            "seconds": 1.0,
        }
        for e in range(1, epochs + 1)
    ]
    chance = {"accuracy": best, "n": 2 * len(classes), "chance": 1 / len(classes), "p_value": 1e-6, "alpha": 0.01}
    chance |= {"powered": True, "significant": True, "at_chance": False, "allowed": False}
    record = {
        "format": RESULT_FORMAT,
        "key": trial.key,
        "loss_version": "1",
        "results_version": "3",
        "config": c.identity(),
        "effective_loss": dataclasses.asdict(c.loss),
        "chance": chance,
        "classes": classes,
        "data": {
            "folder": "/data",
            "train": 14 * len(classes),
            "val": 2 * len(classes),
            "test": 4 * len(classes),
            "skipped": [],
        },
        "teacher": None,
        "test_targets": targets(classes),
        "best": {
            "epoch": epochs - 1,
            "val": metrics(best, classes),
            "test": metrics(best, classes) | {"predictions": predictions(best, classes)},
        },
        "last": {
            "epoch": epochs,
            "val": metrics(best - 0.02, classes),
            "test": metrics(best - 0.02, classes) | {"predictions": predictions(best - 0.02, classes)},
        },
        "history": history,
        "timings": {"total_s": 5.0, "train_s": 4.0, "train_images_per_s": 100.0},
        "environment": ENVIRONMENT,
    }
    return from_json(TrialResult, record, f"the synthetic result of {trial.key}")


def complexity(trial) -> dict:
    c = trial.config
    teacher = c.recipe.model == "vgg16"
    return {
        "model": c.recipe.model,
        "num_classes": len(CLASSES[c.data.dataset]),
        "resolution": c.data.resolution,
        "params_total": 134_000_000 if teacher else 2_200_000,
        "params_trainable": 0,
        "flops": 313_000_000 if teacher else 6_400_000,
        "flops_by_type": {},
        "checkpoint_bytes": 537_000_000 if teacher else 9_000_000,
        "unsupported_ops": {},
    }


def bench_json() -> dict:
    """A pytest-benchmark file shaped like tests/benchmarks/test_inference.py's output (10x student speed-up)."""
    entries = []
    for model, base in (("vgg16", 0.040), ("mobilenet_v2", 0.004)):
        for batch in (1, 32):
            median = base * (1 if batch == 1 else 12)
            stats = {
                "min": 0.9 * median,
                "max": 1.3 * median,
                "mean": 1.02 * median,
                "stddev": median / 20,
                "median": median,
                "q1": 0.95 * median,
                "q3": 1.05 * median,
                "iqr": median / 10,
                "rounds": 10,
                "iterations": 1,
                "ops": 1 / median,
                "total": 10 * median,
            }
            info = {"model": model, "batch": batch, "resolution": 64, "runtime": "torch", "threads": 2}
            entries.append({"name": f"test_torch_inference[{model}-batch{batch}]", "extra_info": info, "stats": stats})
    return {"benchmarks": entries}


def resolved(raw: dict) -> str:
    """The store's record of ``raw`` as the sweep resolves it (kdbench.sweep.runner)."""
    return to_json(parse_ablation(raw, raw["name"]))


def is_failed(trial) -> bool:
    c = trial.config
    return c.data.dataset == "rsscn7" and c.method == "kd_cos" and c.seed == 0 and setting(c, "gamma") == 1.0


def is_run(trial) -> bool:
    c = trial.config
    return c.data.dataset == "eurosat" or c.seed == 0


@pytest.fixture(scope="module")
def trials():
    return plan_trials(parse_ablation(RAW, "test"))


@pytest.fixture(scope="module")
def report(tmp_path_factory, trials) -> Path:
    """A sweep folder with the synthetic store and bench.json, and its report built once."""
    out = tmp_path_factory.mktemp("sweep")
    store = Store(out / STORE_FILE)
    sweep_id = store.begin_sweep(RAW["name"], "ablations/synthetic.toml", RAW, resolved(RAW), trials, ENVIRONMENT)
    for trial in filter(is_run, trials):
        if is_failed(trial):
            store.record_failed(trial.key, FAILED_ERROR)
        else:
            store.record_done(trial.key, result(trial), complexity(trial))
    store.flag_weak_teachers()
    store.finish_sweep(sweep_id, {"total": len(trials), "done": 0, "failed": 1, "already": 0, "wall_s": 123.0})
    store.close()
    (out / "bench.json").write_text(json.dumps(bench_json()))
    paths = build_report(out)
    assert paths == [out / "report.md", out / "report.pdf"]
    return out


def csv(report: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(report / "tables" / f"{name}.csv")


def default_accuracies(trials, dataset: str, method: str, of=lambda t: 100 * accuracy(t)) -> dict[int, float]:
    """seed -> best test accuracy (%) of the default-setting done trials, computed from the synthetic data."""
    return {
        t.config.seed: of(t)
        for t in trials
        if t.config.data.dataset == dataset
        and row_of(t.config) == method
        and is_run(t)
        and not is_failed(t)
        and setting(t.config, "temperature") in (1.0, 4.0)
        and setting(t.config, "gamma") in (0.0, 1.0)
    }


def test_accuracy_table_matches_store(report, trials):
    table = csv(report, "accuracy").set_index(["dataset", "method"])
    for dataset in ("eurosat", "rsscn7"):
        for method in METHOD_ACCURACY:
            by_seed = default_accuracies(trials, dataset, method)
            row = table.loc[(dataset, method)]
            values = list(by_seed.values())
            assert row["n"] == len(values)
            if not values:  # rsscn7 kd_cos: its only run failed
                assert math.isnan(row["best_mean"]) and math.isnan(row["diff_mean"])
                continue
            assert row["best_mean"] == pytest.approx(sum(values) / len(values), abs=0.006)
            assert row["last_mean"] == pytest.approx(sum(values) / len(values) - 2, abs=0.006)
            if len(values) > 1:
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                assert row["best_std"] == pytest.approx(std, abs=0.006)
            else:
                assert math.isnan(row["best_std"])
            if method != "baseline":  # Δ is paired image by image: from the per-image predictions
                hits = default_accuracies(trials, dataset, method, of=prediction_accuracy)
                base_hits = default_accuracies(trials, dataset, "baseline", of=prediction_accuracy)
                diffs = [hits[s] - base_hits[s] for s in hits]
                assert row["diff_mean"] == pytest.approx(sum(diffs) / len(diffs), abs=0.006)
                assert row["diff_low"] <= row["diff_mean"] <= row["diff_high"]
    # rsscn7: one seed ran, kd_cos failed there
    assert table.loc[("rsscn7", "kd_cos"), "n"] == 0
    assert table.loc[("rsscn7", "kd_kl"), "planned"] == 3


def test_temperature_table_matches_store(report, trials):
    table = csv(report, "temperature").set_index(["dataset", "method", "temperature"])
    for temperature in (2.0, 4.0):
        values = [
            100 * accuracy(t)
            for t in trials
            if t.config.data.dataset == "eurosat"
            and t.config.method == "kd_kl_cos"
            and setting(t.config, "temperature") == temperature
            and setting(t.config, "gamma") == 1.0
        ]
        row = table.loc[("eurosat", "kd_kl_cos", temperature)]
        assert (row["n"], row["mean"]) == (3, pytest.approx(sum(values) / 3, abs=0.006))
    assert table.loc[("rsscn7", "kd_kl", 2.0), "n"] == 1


def test_claim_table_pairs_the_papers_loss_with_every_other_student(report, trials):
    """Table 1b: KD (KL+Cos) minus each other student, image by image; the Findings call the claim from its verdicts."""
    claim = csv(report, "claim").set_index(["dataset", "method"])
    assert set(claim.index.get_level_values("method")) == {"baseline", "kd_kl", "kd_cos"}
    ours = default_accuracies(trials, "eurosat", "kd_kl_cos", of=prediction_accuracy)
    for method in ("baseline", "kd_kl", "kd_cos"):
        other = default_accuracies(trials, "eurosat", method, of=prediction_accuracy)
        row = claim.loc[("eurosat", method)]
        assert row["diff_mean"] == pytest.approx(sum(ours[s] - other[s] for s in ours) / 3, abs=0.006)
        assert row["diff_n"] == 3 and row["diff_low"] <= row["diff_mean"] <= row["diff_high"]
    assert math.isnan(claim.loc[("rsscn7", "kd_cos"), "diff_mean"])  # its only trial failed: nothing to pair
    verdicts = set(claim.loc["eurosat", "verdict"])
    expected = "holds" if verdicts == {"gain"} else "is contradicted" if "loss" in verdicts else "is not shown"
    md = (report / "report.md").read_text()
    assert f"eurosat: the paper's claim (KD (KL+Cos) beats Student baseline (CE), KD (KL), KD (Cos)) {expected}" in md
    teacher, baseline = (sum(default_accuracies(trials, "eurosat", m).values()) / 3 for m in ("teacher", "baseline"))
    assert f"eurosat: teacher {teacher:.2f}% against baseline student {baseline:.2f}%" in md


def store_and_report(out: Path, raw: dict) -> pd.DataFrame:
    """Every trial of ``raw``'s plan done with the synthetic results, the report built; its Table 1 CSV."""
    planned = plan_trials(parse_ablation(raw, raw["name"]))
    store = Store(out / STORE_FILE)
    sweep_id = store.begin_sweep(raw["name"], f"ablations/{raw['name']}.toml", raw, resolved(raw), planned, ENVIRONMENT)
    for trial in planned:
        store.record_done(trial.key, result(trial), complexity(trial))
    store.finish_sweep(sweep_id, {"total": len(planned), "done": len(planned), "failed": 0, "already": 0, "wall_s": 1.0})
    store.close()
    build_report(out)
    return csv(out, "accuracy")


def test_one_teacher_for_every_seed_is_paired_with_each_baseline_seed(tmp_path):
    raw = {**RAW, "grid": {"datasets": ["eurosat"], "seeds": [0, 1, 2]}, "teacher": {"epochs": 3, "seed": 0}, "loss": {}}
    teacher = store_and_report(tmp_path, raw).set_index("method").loc["teacher"]
    assert (teacher["n"], teacher["planned"], teacher["diff_n"]) == (1, 1, 3)
    md = (tmp_path / "report.md").read_text()
    assert "one teacher per dataset, trained with seed 0, serves every student seed" in md
    assert "Fewer than 3 finished seeds" not in md


def test_with_several_splits_each_split_and_seed_is_a_replicate_paired_with_its_splits_teacher(tmp_path):
    raw = {
        **RAW,
        "grid": {"datasets": ["eurosat"], "seeds": [0, 1], "split_seeds": [0, 5]},
        "teacher": {"epochs": 3, "seed": 0},
        "loss": {},
    }
    table = store_and_report(tmp_path, raw).set_index("method")
    assert (table.loc["teacher", "n"], table.loc["teacher", "planned"], table.loc["teacher", "diff_n"]) == (
        2,
        2,
        4,
    )  # one per split
    assert (table.loc["kd_kl", "n"], table.loc["kd_kl", "planned"], table.loc["kd_kl", "diff_n"]) == (4, 4, 4)
    trials = csv(tmp_path, "trials")
    assert sorted(set(trials["seed"])) == ["split 0, seed 0", "split 0, seed 1", "split 5, seed 0", "split 5, seed 1"]


def test_paired_interval_by_hand(report, trials):
    """eurosat kd_kl vs baseline over 3 seeds: mean ± t(0.975, 2) * sd / sqrt(3)."""
    kd, base = default_accuracies(trials, "eurosat", "kd_kl"), default_accuracies(trials, "eurosat", "baseline")
    diffs = [kd[s] - base[s] for s in (0, 1, 2)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)
    row = csv(report, "accuracy").set_index(["dataset", "method"]).loc[("eurosat", "kd_kl")]
    assert (row["diff_t_low"], row["diff_t_high"]) == (
        pytest.approx(mean - half, abs=0.006),
        pytest.approx(mean + half, abs=0.006),
    )
    d = paired_difference(kd, base)
    assert (d.low, d.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert summarize([1.0]).n == 1 and math.isnan(summarize([1.0]).std)


def test_markdown_marks_failures_missing_and_notes(report, trials):
    md = (report / "report.md").read_text()
    assert "1 of 3 seeds paired" in md  # rsscn7: one seed ran
    assert f"Failed: KD (Cos) on rsscn7, seed 0 (gamma 1, on logits): {FAILED_ERROR}" in md
    assert "missing (pending)" in md and "20 of 60 planned trials have no result" in md
    assert "| paper (reported) |  | 99.04 |" in md
    # the synthetic results record no memory format (as kdbench's before 2026-11-30): the report says so, with counts
    assert "memory format not recorded (kdbench before it was: contiguous), precision not recorded (" in md
    assert "| **eurosat: published, not from this run (Helber et al., IEEE JSTARS 2019)** |" in md
    assert "| ResNet-50; ImageNet weights fine-tuned, RGB at 64 px, 80/20 train/test split |  | 98.57 |" in md
    assert "Teacher weaker than its students: vgg16 on rsscn7" in md
    assert "Fewer than 3 finished seeds (rsscn7:" in md
    assert "differ by 1 pp or more in 9 of 9 cells of Table 1" in md
    assert "Ablation synthetic from ablations/synthetic.toml." in md
    assert "10 classes, train / val / test = 140 / 20 / 40 images" in md and "trials took 3 min 15 s of compute in all" in md
    assert "Table 3. Temperature ablation" in md and "Table 4. Loss-weight ablation" in md
    assert "| KD (Cos) | 0/3 | — | — | — | — | — |" in md
    incomplete = csv(report, "incomplete")
    assert incomplete.loc[incomplete["status"] == "failed", "error"].tolist() == [FAILED_ERROR]
    assert (incomplete["status"] == "pending").sum() == len(incomplete) - 1 == sum(not is_run(t) for t in trials)


def test_best_student_is_marked(report, trials):
    table = csv(report, "accuracy")
    for dataset in ("eurosat", "rsscn7"):
        means = {
            m: sum(v.values()) / len(v)
            for m in METHOD_ACCURACY
            if m != "teacher" and (v := default_accuracies(trials, dataset, m))
        }
        best = max(means, key=means.get)
        assert table.loc[table["best_student"] & (table["dataset"] == dataset), "method"].tolist() == [best]
        # the star: the most accurate student among those whose bootstrap interval excludes 0 (none: no star)
        rows = table[table["dataset"] == dataset]
        gains = rows[(rows["verdict"] == "gain") & (rows["method"] != "teacher")]
        starred = rows.loc[rows["star"], "method"].tolist()
        assert starred == ([gains.loc[gains["best_mean"].idxmax(), "method"]] if len(gains) else [])
        assert all(rows.loc[rows["verdict"] == "gain", "diff_low"] > 0)
    md = (report / "report.md").read_text()
    assert "KD (KL+Cos) ★" in md  # eurosat: +3.5 to +7.5 pp over 200 test images in each of 3 seeds
    assert "eurosat: KD (KL), KD (KL+Cos) significantly better than the baseline student" in md


def test_latency_and_speedup_from_bench(report):
    latency = csv(report, "latency")
    batch1 = latency[latency["batch"] == 1].set_index("model")
    assert batch1.loc["vgg16", "latency_median_ms"] == pytest.approx(40.0)
    assert batch1.loc["mobilenet_v2", "images_per_s"] == pytest.approx(250.0)
    assert "Speed-up: vgg16 latency / mobilenet\\_v2 latency" in (report / "report.md").read_text()
    complexity = csv(report, "complexity").set_index("dataset")
    assert complexity.loc["eurosat", "params_ratio"] == pytest.approx(134_000_000 / 2_200_000, abs=0.01)
    assert complexity.loc["rsscn7", "student_flops"] == 6_400_000


def pdf_pages(pdf: bytes) -> int:
    """Page objects in a PDF, looking inside its compressed object streams too."""
    chunks = [pdf]
    for match in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        with contextlib.suppress(zlib.error):
            chunks.append(zlib.decompress(match.group(1)))
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", b"".join(chunks)))


def test_files_and_pdf(report):
    pdf = (report / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and pdf_pages(pdf) > 1
    tables = {p.stem for p in (report / "tables").glob("*.csv")}
    expected = {"accuracy", "claim", "across", "complexity", "latency", "temperature", "loss_weights", "incomplete", "trials"}
    assert tables == expected
    figures = {p.stem for p in (report / "figures").glob("*.png")}
    assert {p.stem for p in (report / "figures").glob("*.svg")} == figures
    expected = {
        "accuracy",
        "accuracy_vs_cost",
        "forest",
        "critical_difference",
        "temperature",
        "loss_weights",
        "training_curves",
        "confusion_eurosat",
        "confusion_rsscn7",
    }
    assert figures == expected


def test_rebuild_is_byte_identical(report, tmp_path):
    """Same store, other folder: every file comes out the same (no generation time or path in any of them)."""
    for name in (STORE_FILE, "bench.json"):
        (tmp_path / name).write_bytes((report / name).read_bytes())
    build_report(tmp_path)
    outputs = ["report.md", "report.pdf", *(str(p.relative_to(report)) for p in report.glob("*/*.*"))]
    assert [name for name in outputs if (tmp_path / name).read_bytes() != (report / name).read_bytes()] == []


def test_rebuilds_in_processes_of_other_string_hashing_write_the_same_bytes(report, tmp_path):
    """A rebuild in another process (another PYTHONHASHSEED) writes every file byte for byte the same: the
    critical-difference diagram's crossbars, drawn through sets of labels, included (issue 32)."""
    for seed in ("1", "2"):
        folder = tmp_path / seed
        folder.mkdir()
        for name in (STORE_FILE, "bench.json"):
            (folder / name).write_bytes((report / name).read_bytes())
        proc = run_cli("kdbench.report", str(folder), env={"PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
    outputs = ["report.md", "report.pdf", *(str(p.relative_to(report)) for p in report.glob("*/*.*"))]
    assert [name for name in outputs if (tmp_path / "1" / name).read_bytes() != (tmp_path / "2" / name).read_bytes()] == []


def test_store_without_results(tmp_path, trials):
    """A sweep that planned trials but finished none: every cell is — and every trial is listed as missing."""
    store = Store(tmp_path / STORE_FILE)
    store.begin_sweep(RAW["name"], "ablations/synthetic.toml", RAW, resolved(RAW), trials, ENVIRONMENT)
    store.close()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "stale.png").write_bytes(b"old")
    build_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No bench.json" in md and "the last invocation did not finish" in md
    assert md.count("missing (pending)") == len(trials)
    assert list((tmp_path / "figures").iterdir()) == []
    assert csv(tmp_path, "accuracy")["n"].eq(0).all()


def test_cli_errors_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"kdbench: error: no results store in {tmp_path}: run a sweep into it first (python -m kdbench.sweep --out {tmp_path})"
    )
    Store(tmp_path / STORE_FILE).close()
    with pytest.raises(UserError, match="records no sweep"):
        build_report(tmp_path)


def test_a_report_rebuilt_from_a_store_ignores_todays_planning_rules(report, tmp_path, monkeypatch):
    """What planning decided is read from the store: changed labels, resolution, default point and axes change nothing."""
    import shutil

    import kdbench.methods
    import kdbench.sweep.ablation

    shutil.copy(report / STORE_FILE, tmp_path / STORE_FILE)
    shutil.copy(report / "bench.json", tmp_path / "bench.json")
    for cls in kdbench.methods.METHODS.values():
        monkeypatch.setattr(cls, "label", f"renamed {cls.name}")
        monkeypatch.setattr(cls, "rank", -cls.rank)
    monkeypatch.setattr(kdbench.methods.Method, "describe", lambda self, loss: "today's wording")
    monkeypatch.setattr(kdbench.methods.Method, "resolve", lambda self, loss: (self, loss))
    monkeypatch.setattr(kdbench.sweep.ablation.Ablation, "default_loss", lambda self, name: None)
    monkeypatch.setattr(kdbench.sweep.ablation, "parse_ablation", lambda raw, source: pytest.fail("the report re-planned"))
    build_report(tmp_path)
    tables = sorted(p.relative_to(report) for p in (report / "tables").glob("*.csv"))
    assert tables and all((tmp_path / t).read_bytes() == (report / t).read_bytes() for t in tables)
    assert (tmp_path / "report.md").read_text() == (report / "report.md").read_text()


@pytest.mark.parametrize(
    ("sql", "needle"),
    [
        ("UPDATE sweep_trials SET plan = NULL", "written by a kdbench older than its plan records"),
        ("UPDATE sweeps SET resolved = NULL", "written by a kdbench older than its plan records"),
        ("UPDATE sweep_trials SET plan = replace(plan, 'kdbench-plan-v1', 'kdbench-plan-v9')", "another kdbench version"),
    ],
)
def test_a_store_of_another_format_is_refused_in_one_line(report, tmp_path, capsys, sql, needle):
    import shutil
    import sqlite3

    shutil.copy(report / STORE_FILE, tmp_path / STORE_FILE)
    db = sqlite3.connect(tmp_path / STORE_FILE)
    db.execute(sql)
    db.commit()
    db.close()
    proc = call_main(main, [str(tmp_path)], capsys)
    assert_one_line_error(proc, needle)


def edited_report(report: Path, folder: Path, edit) -> str:
    """The markdown of ``report``'s store with each done trial's result JSON changed by ``edit(n, result)`` (n: its row)."""
    import shutil
    import sqlite3

    shutil.copy(report / STORE_FILE, folder / STORE_FILE)
    db = sqlite3.connect(folder / STORE_FILE)
    rows = db.execute("SELECT key, result FROM trials WHERE status = 'done' ORDER BY key").fetchall()
    for n, (key, text) in enumerate(rows):
        record = json.loads(text)
        edit(n, record)
        db.execute("UPDATE trials SET result = ? WHERE key = ?", (json.dumps(record), key))
    db.commit()
    db.close()
    build_report(folder)
    return (folder / "report.md").read_text()


def test_a_table_mixing_code_versions_says_so_and_a_store_of_another_version_says_it_in_the_header(report, tmp_path):
    """Issue 31: results of another results_version / loss_version are named, with their trial counts."""

    def two_versions(n, record):
        record["results_version"] = "2" if n == 0 else record["results_version"]

    md = edited_report(report, tmp_path, two_versions)
    assert "computed differently" in md and "results version: 2: 1 trials" in md
    assert "Results of another kdbench code version" not in md
    (tmp_path / "all").mkdir()
    md = edited_report(report, tmp_path / "all", lambda n, record: record.update(loss_version="0"))
    assert "Results of another kdbench code version: results version 3, loss version 0 (this kdbench:" in md


def test_the_report_names_trials_that_differ_in_threads_teacher_source_or_memory_format(report, tmp_path):
    """Issue 31: threads, teacher source and memory format are not in a key; trials of one table differing in them is said."""

    def differ(n, record):
        record["environment"] = record["environment"] | {"torch_threads": 1 + n % 2, "memory_format": "contiguous"}
        if n % 3 == 0:
            del record["environment"]["memory_format"]  # a result of an older kdbench: not recorded
        if record["config"]["method"] != "baseline" and record["config"]["role"] == "student":
            record["teacher"] = {"mode": "cache" if n % 2 else "online", "features": {}, "feature_memory_format": "x"}

    md = edited_report(report, tmp_path, differ)
    assert "torch threads: 1:" in md and "2:" in md
    assert "memory format: contiguous:" in md and "not recorded:" in md
    assert "teacher source: cache:" in md and "online:" in md
    assert "computed differently" not in (report / "report.md").read_text()
