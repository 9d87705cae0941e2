"""Locating, scanning, splitting and decoding datasets; bad data gives one-line errors."""

import csv

import pytest
import torch
from conftest import assert_one_line_error, call_main, make_image_folder, run_cli
from PIL import Image

from kdbench.config import DataConfig
from kdbench.data.decode import load_images
from kdbench.data.index import limit_per_class, scan_folder, stratified_split
from kdbench.data.locate import data_root, locate_dataset
from kdbench.data.prepare import prepare_data
from kdbench.data.presets import AUGMENTATIONS, apply_view, apply_views
from kdbench.data.specs import get_spec
from kdbench.errors import UserError
from kdbench.train import main as train_main


def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_DATA", str(tmp_path))
    assert data_root("/explicit").as_posix() == "/explicit"
    assert data_root(None) == tmp_path
    monkeypatch.delenv("KDBENCH_DATA")
    assert data_root(None).as_posix() == "data"


@pytest.mark.parametrize(
    "name, layout, fmt",
    [
        ("eurosat", "eurosat", "jpg"),
        ("eurosat", "eurosat/2750", "jpg"),
        ("ucmerced", "ucmerced/UCMerced_LandUse/Images", "tif"),
        ("rsscn7", "rsscn7", "jpg"),
    ],
)
def test_plain_and_official_archive_layouts(tmp_path, name, layout, fmt):
    make_image_folder(tmp_path / layout, classes=2, per_class=3, fmt=fmt)
    folder = locate_dataset(get_spec(name), tmp_path, download=False)
    assert folder == tmp_path / layout
    index = scan_folder(folder)
    assert index.classes == ["class0", "class1"] and len(index.paths) == 6


def test_missing_dataset_message_names_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=r"dataset eurosat not found under .*eurosat/2750.*KDBENCH_DATA"):
        locate_dataset(get_spec("eurosat"), tmp_path, download=False)


EUROSAT_MIRROR = "https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip"


def test_eurosat_downloads_from_torchvisions_mirror_and_checks_the_md5(tmp_path, monkeypatch):
    # madm.dfki.de serves an expired certificate (phelber/EuroSAT#10); torchvision's mirror has the same MD5
    import io
    import urllib.request

    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO(b"not the EuroSAT archive")

    monkeypatch.delenv("KDBENCH_NO_DOWNLOAD", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    spec = get_spec("eurosat")
    assert (spec.url, spec.md5) == (EUROSAT_MIRROR, "c8fa014336c82ac7804f0398fcb19387")
    with pytest.raises(UserError, match="EuroSAT.zip has MD5 .*, expected c8fa014336c82ac7804f0398fcb19387"):
        locate_dataset(spec, tmp_path)
    assert asked == [EUROSAT_MIRROR] and (tmp_path / "eurosat" / "EuroSAT.zip").is_file()


def test_imagefolder_and_unknown_dataset(tmp_path):
    make_image_folder(tmp_path / "aid", classes=2, per_class=3)
    spec = get_spec(f"imagefolder:{tmp_path / 'aid'}")
    assert locate_dataset(spec, tmp_path / "unused") == tmp_path / "aid"
    with pytest.raises(UserError, match="unknown dataset 'nwpu'"):
        get_spec("nwpu")


def test_split_is_stratified_seeded_and_reproducible(image_folder):
    index = scan_folder(image_folder)
    a = stratified_split(index, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert a == stratified_split(index, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert a != stratified_split(index, val_fraction=0.25, test_fraction=0.25, seed=4)
    for label in range(3):
        splits = [s for s, y in zip(a, index.labels) if y == label]
        assert splits.count("test") == 3 and splits.count("val") == 3 and splits.count("train") == 6


def test_split_refuses_too_few_images(image_folder):
    index = limit_per_class(scan_folder(image_folder), 2, seed=0)
    with pytest.raises(UserError, match="class class0 has 2 image"):
        stratified_split(index, val_fraction=0.1, test_fraction=0.2, seed=0)


def test_limit_per_class_and_class_subset(image_folder):
    index = scan_folder(image_folder, classes=["class0", "class2"])
    assert index.classes == ["class0", "class2"]
    small = limit_per_class(index, 4, seed=0)
    assert [small.labels.count(c) for c in (0, 1)] == [4, 4]
    with pytest.raises(UserError, match="class9"):
        scan_folder(image_folder, classes=["class9"])


def test_decode_cache_reuses_and_refreshes(image_folder, monkeypatch):
    index = scan_folder(image_folder)
    first, _ = load_images(image_folder, index.paths, 16)
    assert first.shape == (36, 3, 16, 16) and first.dtype == torch.uint8
    calls = []
    import kdbench.data.decode as decode

    real = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda p, r: calls.append(p) or real(p, r))
    again, _ = load_images(image_folder, index.paths, 16)
    assert calls == [] and torch.equal(first, again)
    Image.new("RGB", (24, 24), (255, 0, 0)).save(image_folder / index.paths[0])
    changed, _ = load_images(image_folder, index.paths, 16)
    assert len(calls) == 1 and changed[0].float().mean() > 0 and not torch.equal(changed[0], first[0])


def test_corrupt_image_is_an_error_unless_skipped(image_folder):
    (image_folder / "class1" / "img000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError, match=r"1 unreadable image.*class1/img000.png.*--skip-bad-images"):
        prepare_data(DataConfig(dataset=f"imagefolder:{image_folder}", resolution=16))
    data = prepare_data(DataConfig(dataset=f"imagefolder:{image_folder}", resolution=16, skip_bad_images=True))
    assert len(data.index.paths) == 35 and data.index.skipped[0]["path"] == "class1/img000.png"


def test_stray_files_and_empty_classes(image_folder):
    (image_folder / "class0" / "notes.txt").write_text("hello")
    (image_folder / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty class folder\(s\) empty and 1 non-image file\(s\) \(class0/notes.txt\)"):
        scan_folder(image_folder)
    index = scan_folder(image_folder, skip_bad=True)
    assert {s["path"] for s in index.skipped} == {"class0/notes.txt", "empty/"}
    assert index.classes == ["class0", "class1", "class2"]


def test_manifest_written_with_every_image(image_folder, tmp_path):
    data = prepare_data(DataConfig(dataset=f"imagefolder:{image_folder}", resolution=16))
    data.write_manifest(tmp_path / "m.csv")
    rows = list(csv.DictReader((tmp_path / "m.csv").read_text().splitlines()))
    assert len(rows) == 36 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert rows[0]["path"].startswith("class0/") and rows[0]["class"] == "class0"


def test_d4_views_are_the_eight_symmetries():
    x = torch.arange(9).reshape(1, 1, 3, 3)
    views = {tuple(apply_view(x, v).flatten().tolist()) for v in range(8)}
    assert len(views) == 8
    batch = torch.stack([x[0]] * 8)
    out = apply_views(batch, torch.arange(8))
    for v in range(8):
        assert torch.equal(out[v], apply_view(x[0], v))
    assert AUGMENTATIONS["d4"].cacheable and not AUGMENTATIONS["d4_crop"].cacheable


@pytest.mark.parametrize(
    "setup, needles",
    [
        ("corrupt", ["unreadable image", "class1/img000.png"]),
        ("stray", ["non-image file", "class0/readme.md"]),
        ("empty", ["empty class folder", "empty"]),
        ("few", ["too few"]),
    ],
)
def test_train_cli_bad_data_is_one_line(tmp_path, capsys, setup, needles):
    folder = make_image_folder(tmp_path / "set", classes=2, per_class=6)
    args = []
    if setup == "corrupt":
        (folder / "class1" / "img000.png").write_bytes(b"not an image")
    elif setup == "stray":
        (folder / "class0" / "readme.md").write_text("x")
    elif setup == "empty":
        (folder / "empty").mkdir()
    else:
        args = ["--images-per-class", "3", "--val-fraction", "0.5", "--test-fraction", "0.4"]
    proc = call_main(
        train_main,
        [
            "--dataset",
            f"imagefolder:{folder}",
            "--model",
            "mobilenet_v2",
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            *args,
        ],
        capsys,
    )
    assert_one_line_error(proc, *needles)


def test_train_cli_missing_dataset_is_one_line(tmp_path):
    proc = run_cli("kdbench.train", "--dataset", "eurosat", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "dataset eurosat not found", str(tmp_path))
