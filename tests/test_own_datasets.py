"""Your own land-use sets (``imagefolder:``) end to end: names, dry-run counts, the report, errors without tracebacks."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, call_main, make_image_folder, run_cli
from PIL import Image

import kdbench.report
from kdbench.config import DataConfig
from kdbench.data.prepare import prepare_data
from kdbench.data.specs import dataset_names, get_spec, slugify
from kdbench.errors import UserError
from kdbench.report.__main__ import main as report_main
from kdbench.sweep.__main__ import main as sweep_main

SET_NAME = "Land use – Set.A"
CLASSES = {"Forêt dense": 12, "Urban Area": 10, "river-bank.2": 3}  # one class with exactly 3 images
TINY = [
    "grid.seeds=[0]",
    "data.resolution=16",
    "data.images_per_class=8",  # more than some classes hold
    "teacher.model='resnet18'",
    "teacher.epochs=1",
    "teacher.batch_size=8",
    "student.epochs=1",
    "student.batch_size=8",
    "run.device='cpu'",
]


def make_messy_set(root: Path, classes: dict[str, int] = CLASSES, seed: int = 0) -> Path:
    """Class folders with spaces, mixed case and non-ASCII names; JPEG, PNG and TIFF; 600 px and 20 px images."""
    rng = np.random.default_rng(seed)
    formats = ("jpg", "PNG", "tif", "jpeg")
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 40) % 256], dtype=np.float64)
        for i in range(count):
            size = 600 if i == 0 else 150 if i == 1 else 20
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"Image {i:02d}.{formats[i % len(formats)]}")
    return root


def markdown(text: str) -> str:
    """``text`` as report.md writes it."""
    return text.replace("\\", "\\\\").replace("_", "\\_").replace("*", "\\*")


def sweep_args(out: Path, *datasets: str, extra: list[str] = ()) -> list[str]:
    grid = "grid.datasets=[" + ", ".join(repr(d) for d in datasets) + "]"
    # one torch thread: on a busy 2-core machine two threads per trial are several times slower
    return ["--out", str(out), "--threads", "1", *(a for o in [grid, *TINY, *extra] for a in ("--set", o))]


# --- names ----------------------------------------------------------------------------------------
def test_display_names_and_slugs():
    names = dataset_names(
        [
            "eurosat",
            "imagefolder:/data/one/Land use – Set.A",
            "imagefolder:/data/two/Land use – Set.A",
            "imagefolder:Mine=/data/x/y",
            "imagefolder:/srv/eurosat",
            "imagefolder:/data/a=b/AID/",
        ]
    )
    assert [(n.display, n.slug) for n in names.values()] == [
        ("eurosat", "eurosat"),
        ("one/Land use – Set.A", "one-Land-use-Set-A"),
        ("two/Land use – Set.A", "two-Land-use-Set-A"),
        ("Mine", "Mine"),
        ("srv/eurosat", "srv-eurosat"),  # a folder named like a built-in set
        ("AID", "AID"),  # '=' after a '/' is part of the path
    ]
    deeper = dataset_names(["imagefolder:/a/x/S", "imagefolder:/b/x/S", "imagefolder:/c/S"])
    assert [n.display for n in deeper.values()] == ["a/x/S", "b/x/S", "c/S"]
    assert slugify("Forêt dense") == "Foret-dense" and slugify("森林").startswith("dataset-")
    assert len({n.slug for n in dataset_names(["imagefolder:/p/Set A", "imagefolder:/q/set-a"]).values()}) == 2


def test_label_syntax(tmp_path):
    folder = make_image_folder(tmp_path / "some folder", classes=2, per_class=6)
    spec = get_spec(f"imagefolder:My Set={folder}")
    assert spec.label == "My Set" and spec.path == folder
    assert dataset_names([f"imagefolder:My Set={folder}"])[f"imagefolder:My Set={folder}"].slug == "My-Set"
    data = prepare_data(DataConfig(dataset=f"imagefolder:My Set={folder}", resolution=16))
    assert data.classes == ["class0", "class1"]
    with pytest.raises(UserError, match="two datasets are named 'X'"):
        dataset_names(["imagefolder:X=/a", "imagefolder:X=/b"])
    with pytest.raises(UserError, match="listed twice"):
        dataset_names(["eurosat", "eurosat"])
    with pytest.raises(UserError, match="name before '=' is empty"):
        get_spec("imagefolder:=/a")


def test_sets_as_users_have_them_load(tmp_path):
    """Spaces, mixed case, accents, JPEG/PNG/TIFF, 600 px and 20 px images, a 3-image class, fewer images than asked."""
    folder = make_messy_set(tmp_path / SET_NAME)
    data = prepare_data(DataConfig(dataset=f"imagefolder:{folder}", resolution=16, images_per_class=8))
    assert data.classes == sorted(CLASSES) and data.images.shape == (8 + 8 + 3, 3, 16, 16)
    splits = [s for s, y in zip(data.split, data.index.labels) if data.classes[y] == "river-bank.2"]
    assert sorted(splits) == ["test", "train", "val"]  # the 3-image class: one image in each split


# --- dry run --------------------------------------------------------------------------------------
def test_dry_run_counts_per_dataset_and_warns_about_small_classes(tmp_path, capsys):
    small = make_messy_set(tmp_path / SET_NAME, {"Big one": 16, "Big two": 16, "Tiny": 3})
    even = make_image_folder(tmp_path / "Even", classes=2, per_class=5)
    proc = call_main(
        sweep_main, ["--dry-run", *sweep_args(tmp_path / "o", f"imagefolder:{small}", f"imagefolder:E={even}")], capsys
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"dataset {SET_NAME} ({small}): 3 classes, 35 images found, 19 used (3 to 8 per class)" in proc.stdout
    assert any(line.startswith("dataset E (") and "2 classes, 10 images found, 10 used (5 per class)" in line for line in lines)
    warnings = [line for line in lines if line.startswith("kdbench: warning:")]
    assert len(warnings) == 0  # with 8 per class used the 3-image class is not under a quarter of the median (8)
    proc = call_main(
        sweep_main, ["--dry-run", *sweep_args(tmp_path / "o", f"imagefolder:{small}", extra=["data.images_per_class=60"])], capsys
    )
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("kdbench: warning:")]
    assert len(warnings) == 1 and f"dataset {SET_NAME}" in warnings[0] and "'Tiny' 3" in warnings[0], proc.stdout
    assert not (tmp_path / "o").exists()


# --- the whole sweep and its report ---------------------------------------------------------------
def test_default_sweep_on_two_own_sets_writes_the_report(tmp_path):
    first = make_messy_set(tmp_path / SET_NAME)
    second = make_messy_set(tmp_path / "Région-2.b" / SET_NAME, {"Forêt dense": 6, "Prairie": 6}, seed=1)
    out = tmp_path / "out dir"
    proc = run_cli("kdbench.sweep", *sweep_args(out, f"imagefolder:{first}", f"imagefolder:{second}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "trials: 10 total, 10 done, 0 failed, 0 already done"
    names = {
        f"{tmp_path.name}/{SET_NAME}": f"{tmp_path.name}-Land-use-Set-A",
        f"Région-2.b/{SET_NAME}": "Region-2-b-Land-use-Set-A",
    }
    assert [n.display for n in dataset_names([f"imagefolder:{first}", f"imagefolder:{second}"]).values()] == list(names)

    db = sqlite3.connect(out / "store.sqlite")
    assert set(db.execute("SELECT DISTINCT dataset_name FROM trials").fetchall()) == {(n,) for n in names}
    md = (out / "report.md").read_text()
    assert (out / "report.pdf").read_bytes()[:4] == b"%PDF"
    figures = {p.name for p in (out / "figures").iterdir()}
    expected = ["accuracy", "forest", "critical_difference", "accuracy_vs_cost", "training_curves"]
    expected += [f"confusion_{slug}" for slug in names.values()]
    assert figures == {f"{stem}.{ext}" for stem in expected for ext in ("png", "svg")}
    tables = {p.stem for p in (out / "tables").glob("*.csv")}
    assert tables == {"accuracy", "claim", "across", "complexity", "incomplete", "trials"}
    for name in ("accuracy", "claim", "complexity", "trials"):
        text = (out / "tables" / f"{name}.csv").read_text()
        assert all(n in text for n in names) and "imagefolder:" not in text, name
    for slug in names.values():
        assert f"figures/confusion_{slug}.png" in md
    assert all(md.count(markdown(n)) >= 3 for n in names)  # What ran, tables, captions
    what_ran = md[md.index("## What ran") : md.index("## Notes")]
    for folder in (first, second):  # the full path once, in What ran
        assert md.count(markdown(str(folder))) == 1 and markdown(f"ImageFolder {folder}") in what_ran
    assert "imagefolder:" not in md


def test_a_failing_report_keeps_the_results_and_says_how_to_rebuild(tmp_path, capsys, monkeypatch):
    folder = make_image_folder(tmp_path / "Set A", classes=2, per_class=6)

    def broken(*args, **kwargs):
        raise RuntimeError("figure engine exploded")

    monkeypatch.setattr(kdbench.report, "draw_figures", broken)
    out = tmp_path / "out"
    proc = call_main(sweep_main, sweep_args(out, f"imagefolder:{folder}", extra=["grid.methods=['baseline','kd_kl']"]), capsys)
    assert proc.returncode != 0
    line = assert_one_line_error(
        proc, "the report failed (RuntimeError: figure engine exploded)", f"python -m kdbench.report {out}"
    )
    log = Path(re.search(r"full traceback in (\S+\.log)", line).group(1))
    assert log.is_file() and log.parent == out / "logs"
    assert "Traceback" in log.read_text() and "figure engine exploded" in log.read_text()
    assert proc.stdout.strip().splitlines()[-1] == "trials: 3 total, 3 done, 0 failed, 0 already done"
    db = sqlite3.connect(out / "store.sqlite")
    assert db.execute("SELECT status, count(*) FROM trials GROUP BY status").fetchall() == [("done", 3)]
    assert db.execute("SELECT finished_at IS NOT NULL FROM sweeps").fetchone() == (1,)

    monkeypatch.undo()  # the command the message gives rebuilds the report from the store
    rebuilt = call_main(report_main, [str(out)], capsys)
    assert rebuilt.returncode == 0 and (out / "report.pdf").exists()


# --- unexpected errors in every command -----------------------------------------------------------
def test_unexpected_errors_are_one_line_with_a_log(tmp_path, capsys, monkeypatch):
    import kdbench.profile
    import kdbench.report.__main__ as report_cli
    import kdbench.train

    def boom(*args, **kwargs):
        raise ValueError("something internal\nover two lines")

    folder = make_image_folder(tmp_path / "d", classes=2, per_class=6)
    (tmp_path / "sweep").mkdir()
    monkeypatch.setattr("kdbench.engine.runner.run_trial", boom)
    monkeypatch.setattr(report_cli, "build_report", boom)
    monkeypatch.setattr(kdbench.profile, "complexity", boom)
    cases = [
        (kdbench.train.main, ["--dataset", f"imagefolder:{folder}", "--out", str(tmp_path / "run")], tmp_path / "run" / "logs"),
        (report_cli.main, [str(tmp_path / "sweep")], tmp_path / "sweep" / "logs"),
        (kdbench.profile.main, ["--num-classes", "3"], tmp_path / "cache" / "logs"),
    ]
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    for main, args, logs in cases:
        proc = call_main(main, args, capsys)
        assert proc.returncode == 1
        line = assert_one_line_error(proc, "unexpected ValueError: something internal over two lines", "full traceback in")
        log = Path(line.rsplit("full traceback in ", 1)[1])
        assert log.parent == logs.resolve() and "ValueError: something internal" in log.read_text(), line


def test_a_store_written_before_display_names_gets_the_column(tmp_path):
    from kdbench.sweep.store import Store

    Store(tmp_path / "store.sqlite").close()
    db = sqlite3.connect(tmp_path / "store.sqlite")
    db.execute("ALTER TABLE trials DROP COLUMN dataset_name")
    db.commit()
    db.close()
    Store(tmp_path / "store.sqlite").close()
    db = sqlite3.connect(tmp_path / "store.sqlite")
    assert "dataset_name" in {r[1] for r in db.execute("PRAGMA table_info(trials)")}


# --- the ablation file's description under --set overrides -----------------------------------------
QUICK_DESCRIPTION = "All three datasets and five methods at 32 px on 60 images per class, ResNet-18 teacher, one seed."


def test_a_sweep_with_overrides_quotes_the_files_description_as_the_files(tmp_path, monkeypatch):
    """``--set grid.datasets=[imagefolder:...]`` on quick.toml: its description (EuroSAT, UC Merced, RSSCN7) is not
    presented as this sweep's; the report names the file and the overrides.  A synthetic store: no training."""
    import test_report

    from kdbench.sweep.ablation import load_ablation

    folder = make_image_folder(tmp_path / "Mine", classes=3, per_class=4, size=16)
    dataset = f"imagefolder:{folder}"
    monkeypatch.setitem(test_report.CLASSES, dataset, ["class0", "class1", "class2"])
    overrides = [f"grid.datasets=['{dataset}']", "run.device='cpu'"]
    ablation, _, raw = load_ablation("quick", overrides)
    assert ablation.overrides == tuple(overrides) and raw["overrides"] == overrides  # the store keeps raw
    (tmp_path / "out").mkdir()
    test_report.store_and_report(tmp_path / "out", raw)
    md = (tmp_path / "out" / "report.md").read_text()
    intro = md[: md.index("## What ran")]
    marked = (
        "Description of quick.toml, written for its own settings; this sweep overrode grid.datasets, run.device "
        f"(What ran lists what ran): “{QUICK_DESCRIPTION}”"
    )
    assert markdown(marked) in intro and intro.count(QUICK_DESCRIPTION[:20]) == 1
    what_ran = "Ablation quick from ablations/quick.toml, with --set overriding grid.datasets, run.device (the values"
    assert markdown(what_ran) in md and md.count(markdown(str(folder))) == 1 and "imagefolder:" not in md


def test_the_description_is_shown_as_it_is_without_overrides_or_when_overridden():
    from types import SimpleNamespace

    from kdbench.report.content import description
    from kdbench.sweep.ablation import load_ablation

    def shown(overrides: list[str]) -> str:
        ablation, path, _ = load_ablation("quick", overrides)
        return description(SimpleNamespace(ablation=ablation, sweep={"ablation_path": str(path)}))

    assert shown([]) == QUICK_DESCRIPTION
    assert shown(["description='My own sets at 16 px.'", "data.resolution=16"]) == "My own sets at 16 px."
    assert shown(["grid.seeds=[0,1,2]"]).startswith("Description of quick.toml, written for its own settings; this sweep")


def test_overrides_is_no_key_of_an_ablation_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\noverrides = ["grid.seeds=[1]"]\n')
    from kdbench.sweep.ablation import load_ablation

    with pytest.raises(UserError, match="overrides is not an ablation key: it records the --set options"):
        load_ablation(str(path))
