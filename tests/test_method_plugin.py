"""A new method is one module: planned, trained and reported with no other file touched (issue 22).

The throw-away method below lives in a temporary package outside kdbench, owns its hyperparameters and
needs the teacher's and the student's embeddings (kdbench.engine.features), which no cache holds.
"""

import json
import os
import sqlite3

import pytest
import torch
from conftest import REPO, make_image_folder, run_cli
from torchvision.models import get_model
from torchvision.models.feature_extraction import create_feature_extractor

from kdbench.engine.features import FeatureTap

PLUGIN = '''
"""A throw-away method: the students' and the teacher's embedding similarities (RKD-like)."""

from dataclasses import dataclass

import torch.nn.functional as F

from kdbench.methods import OwnParams, Params, register


@dataclass(frozen=True)
class GramParams(Params):
    weight: float = 1.0


@register
class Gram(OwnParams):
    name = "gram"
    label = "Gram (embedding)"
    rank = 95
    params = GramParams
    needs = frozenset({"logits", "embedding"})

    def distill(self, student, teacher, targets, p):
        s, t = F.normalize(student.features["embedding"]), F.normalize(teacher.features["embedding"])
        term = F.mse_loss(s @ s.T, t @ t.T)
        return p.weight * term, {"gram": term}
'''

ABLATION = """
name = "plugin"
[grid]
datasets = ["imagefolder:{folder}"]
methods = ["baseline", "gram"]
seeds = [0]
[grid.gram]
weight = [1.0, 2.0]
[methods.gram]
weight = 2.0
[data]
resolution = 16
[teacher]
model = "resnet18"
epochs = 1
batch_size = 8
[student]
epochs = 1
batch_size = 8
[run]
device = "cpu"
allow_chance_teacher = true
"""


def test_a_method_module_outside_kdbench_is_planned_trained_and_reported(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "gram_method.py").write_text(PLUGIN)
    folder = make_image_folder(tmp_path / "data", classes=3, per_class=10, size=16)
    (tmp_path / "plugin.toml").write_text(ABLATION.format(folder=folder))
    env = {"KDBENCH_METHODS": "gram_method", "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "plugins")])}
    out = tmp_path / "out"
    proc = run_cli("kdbench.sweep", "--config", str(tmp_path / "plugin.toml"), "--out", str(out), "--threads", "1", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trials: 4 total, 4 done, 0 failed" in proc.stdout
    db = sqlite3.connect(out / "store.sqlite")
    rows = db.execute("SELECT params, result FROM trials WHERE method = 'gram'").fetchall()
    db.close()
    assert sorted(json.loads(params)["weight"] for params, _ in rows) == [1.0, 2.0]
    for _, result in rows:
        result = json.loads(result)
        # the plugin's need, the teacher's embedding, comes from the teacher's feature cache like a built-in method's
        assert result["teacher"]["mode"] == "cache" and list(result["teacher"]["features"]) == ["embedding"]
        assert all(torch.isfinite(torch.tensor(h["term_gram"])) for h in result["history"])
    report = (out / "report.md").read_text()
    assert "Gram (embedding)" in report and "weight 2" in report
    assert "gram" in (out / "tables" / "accuracy.csv").read_text()
    missing = run_cli("kdbench.sweep", "--config", str(tmp_path / "plugin.toml"), "--dry-run", env={"KDBENCH_METHODS": "no_such"})
    assert missing.returncode != 0 and "KDBENCH_METHODS names no_such, which cannot be imported" in missing.stderr


@pytest.mark.parametrize(
    ("name", "node", "dim"), [("mobilenet_v2", "flatten", 1280), ("resnet18", "flatten", 512), ("vgg16", "classifier.5", 4096)]
)
def test_the_embedding_is_the_input_of_the_last_linear_layer(name, node, dim):
    """Checked against torchvision's feature extractor at the node that feeds the classifier's output layer."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), FeatureTap(model, {"logits", "embedding"}) as tap:
        logits = model(x)
        embedding = tap.take()["embedding"]
        reference = create_feature_extractor(model, {node: "e"})(x)["e"]
    assert embedding.shape == (2, dim) and logits.shape == (2, 5)
    torch.testing.assert_close(embedding, reference.flatten(1))
    with FeatureTap(model, {"logits"}) as tap:  # nothing asked, nothing recorded
        model(x)
        assert tap.take() == {}
