"""File and folder names as they come (kdbench.data.index): undecodable bytes, NFC and NFD, links, nesting.

Every case must give the same classes, the same split under the same seed and the same manifest
as the plain folder it stands for, or one line naming the file; nothing is left out unlisted.
"""

import os
import re
import unicodedata

import numpy as np
import pytest
from conftest import make_image_folder
from PIL import Image

from kdbench.config import DataConfig, TrialConfig
from kdbench.data.index import portable_name, scan_folder, stratified_split
from kdbench.data.prepare import prepare_data
from kdbench.engine.runner import run_trial
from kdbench.errors import UserError

ACCENTED = ["Forêt dense", "Rivière", "Zone_industrielle"]


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(path)


def _accented_set(root, form: str):
    """The same three classes of four images, names written in Unicode ``form`` (NFC as Linux, NFD as macOS)."""
    for c, name in enumerate(ACCENTED):
        for i in range(4):
            _png(root / unicodedata.normalize(form, name) / unicodedata.normalize(form, f"été_{i}.png"), 40 * c + i)
    return root


def test_nfc_and_nfd_spellings_give_the_same_classes_split_and_manifest(tmp_path):
    nfc, nfd = _accented_set(tmp_path / "nfc", "NFC"), _accented_set(tmp_path / "nfd", "NFD")
    assert sorted(os.listdir(nfc)) != sorted(os.listdir(nfd))  # the file system keeps both spellings
    a, b = scan_folder(nfc), scan_folder(nfd)
    assert a.classes == b.classes == sorted(unicodedata.normalize("NFC", n) for n in ACCENTED)
    assert a.paths == b.paths and a.labels == b.labels
    assert b.files != b.paths  # opened by their own spelling
    split = dict(val_fraction=0.25, test_fraction=0.25, seed=5)
    assert stratified_split(a, **split) == stratified_split(b, **split)
    data = [prepare_data(DataConfig(dataset=f"imagefolder:{root}", resolution=16)) for root in (nfc, nfd)]
    assert data[0].fingerprint == data[1].fingerprint and data[0].manifest_digest() == data[1].manifest_digest()
    for d, root in zip(data, (nfc, nfd)):
        d.write_manifest(root.parent / f"{root.name}.csv")
    assert (tmp_path / "nfc.csv").read_bytes() == (tmp_path / "nfd.csv").read_bytes()


def test_both_spellings_in_one_folder_are_one_line_naming_them(tmp_path):
    _accented_set(tmp_path / "d", "NFC")
    _png(tmp_path / "d" / ACCENTED[0] / unicodedata.normalize("NFD", "été_0.png"), 7)
    with pytest.raises(UserError, match="same name in two Unicode forms") as err:
        scan_folder(tmp_path / "d")
    assert "\n" not in str(err.value) and "\\u0301" in str(err.value)


def test_undecodable_bytes_in_a_name_train_and_are_named_portably(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=6, size=16)
    raw = os.fsencode(root / "class0") + b"/caf\xe9.png"  # Latin-1 bytes, as unpacked from an old Windows zip
    Image.fromarray(np.full((16, 16, 3), 9, dtype=np.uint8)).save(os.fsdecode(raw))
    index = scan_folder(root)
    assert "class0/caf\\xe9.png" in index.paths and portable_name(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    cfg = TrialConfig(
        method="baseline",
        data=DataConfig(dataset=f"imagefolder:{root}", resolution=16, val_fraction=0.25, test_fraction=0.25),
    )
    cfg = TrialConfig(**{**cfg.__dict__, "recipe": cfg.recipe.__class__(epochs=1, batch_size=4, eval_batch_size=8)})
    result = run_trial(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    manifest = (tmp_path / "run" / "manifest.csv").read_text(encoding="utf-8")
    assert "class0/caf\\xe9.png" in manifest and result.data["train"] + result.data["val"] + result.data["test"] == 13


def test_links_nesting_and_hidden_files_are_read_or_listed(tmp_path):
    real = make_image_folder(tmp_path / "real", classes=2, per_class=3, size=16)
    root = tmp_path / "d"
    (root / "class0").mkdir(parents=True)
    for i in range(3):
        os.symlink(real / "class0" / f"img00{i}.png", root / "class0" / f"link{i}.png")  # links to files
    os.symlink(real / "class1", root / "class1")  # a linked class folder
    _png(root / "class0" / "2024" / "june" / "deep.png", 3)  # nested folders inside a class
    os.symlink(root / "class0" / "2024", root / "class0" / "again")  # a folder of the class a second way: read once, listed
    _png(root / "class0" / ".thumbs" / "t.png", 1)
    _png(root / "class0" / ".hidden.png", 1)
    (root / "notes.txt").write_text("not in a class folder")
    index = scan_folder(root)
    assert index.classes == ["class0", "class1"]
    assert index.paths == [
        "class0/2024/june/deep.png",
        "class0/link0.png",
        "class0/link1.png",
        "class0/link2.png",
        "class1/img000.png",
        "class1/img001.png",
        "class1/img002.png",
    ]
    reasons = {s["path"]: s["reason"] for s in index.skipped}
    assert reasons == {
        "notes.txt": "not in a class folder",
        "class0/again/": "folder already read through another link",
        "class0/.thumbs/": "hidden folder",
        "class0/.hidden.png": "hidden file",
    }
    os.symlink(tmp_path / "gone.png", root / "class1" / "dangling.png")  # in the real folder, through the link
    with pytest.raises(UserError, match=r"1 broken symbolic link\(s\) \(class1/dangling.png\)"):
        scan_folder(root)
    kept = scan_folder(root, skip_bad=True)
    assert kept.paths == index.paths and {"path": "class1/dangling.png", "reason": "broken symbolic link"} in kept.skipped


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda root: os.symlink("..", root / "class0" / "loop"), "a link loop"),  # back up to the dataset: reads class1
        (lambda root: os.symlink(".", root / "class0" / "sub" / "loop"), "a link loop"),
        (lambda root: os.symlink(root / "class1", root / "class0" / "more"), "the same images as class folder class1/"),
    ],
)
def test_a_folder_link_that_reads_images_twice_is_bad_data(tmp_path, make, reason):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3, size=16)
    _png(root / "class0" / "sub" / "deep.png", 3)
    clean = scan_folder(root)
    make(root)
    with pytest.raises(UserError, match=r"folder link\(s\) that read images twice \(class0/.*" + re.escape(reason)):
        scan_folder(root)
    kept = scan_folder(root, skip_bad=True)
    assert kept.paths == clean.paths and kept.labels == clean.labels
    assert any(s["reason"].startswith(reason) for s in kept.skipped)


def test_one_real_folder_linked_as_two_classes_is_bad_data(tmp_path):
    real = make_image_folder(tmp_path / "real", classes=3, per_class=3, size=16)
    root = tmp_path / "d"
    root.mkdir()
    for name, folder in (("Forest", "class0"), ("River", "class1"), ("Lake", "class2"), ("Highway", "class0")):
        os.symlink(real / folder, root / name)  # Highway: Forest's images again, under another label
    with pytest.raises(UserError, match=r"the same images as class folder"):
        scan_folder(root)
    kept = scan_folder(root, skip_bad=True)  # neither label can be trusted: both left out, listed
    assert kept.classes == ["Lake", "River"]
    assert {s["path"] for s in kept.skipped} >= {"Forest/", "Highway/"}


def test_a_dangling_class_folder_link_is_a_broken_link(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=3, size=16)
    os.symlink(tmp_path / "gone", root / "Lake")
    with pytest.raises(UserError, match=r"1 broken symbolic link\(s\) \(Lake/\)"):
        scan_folder(root)
    kept = scan_folder(root, skip_bad=True)
    assert kept.classes == ["class0", "class1", "class2"]
    assert {"path": "Lake/", "reason": "broken symbolic link"} in kept.skipped
