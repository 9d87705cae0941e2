"""Typed records as JSON (kdbench.records): read back exactly as written, or refused in one line."""

import json

import pytest

from kdbench.errors import UserError
from kdbench.records import GridPoint, TrialPlan, from_json, to_json
from kdbench.sweep.ablation import ABLATIONS_DIR, Ablation, load_ablation
from kdbench.sweep.plan import plan_trials


@pytest.mark.parametrize("name", sorted(p.stem for p in ABLATIONS_DIR.glob("*.toml")))
def test_every_shipped_ablation_and_its_plans_round_trip(name):
    ablation, _, _ = load_ablation(name, ['run.device="cpu"'])
    assert from_json(Ablation, to_json(ablation), "ablation") == ablation
    for trial in plan_trials(ablation):
        assert from_json(TrialPlan, to_json(trial.plan), "plan") == trial.plan


def test_a_grid_point_resolved_to_another_method_lists_where_it_came_from():
    ablation, _, _ = load_ablation("weights", ['run.device="cpu"', "grid.datasets=['eurosat']"])
    plans = [t.plan for t in plan_trials(ablation)]
    kd_kl = [p for p in plans if p.method == "kd_kl"]
    assert kd_kl and all([g.method for g in p.grid_points] == ["kd_kl_cos"] for p in kd_kl)  # kd_kl_cos at gamma = 0
    baseline = next(p for p in plans if p.method == "baseline" and p.role == "student")  # also kd_kl_cos at beta = gamma = 0
    assert GridPoint("baseline", baseline.label, 10, (), ()) in baseline.grid_points
    assert any(g.method == "kd_kl_cos" and dict(g.point)["beta"] == 0 == dict(g.point)["gamma"] for g in baseline.grid_points)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d | {"colour": "red"}, "unknown field colour"),
        (lambda d: d | {"rank": "first"}, "expected int"),
        (lambda d: d | {"axes": "beta"}, "expected a list"),
        (lambda d: d | {"format": "kdbench-plan-v0"}, "format 'kdbench-plan-v0'"),
        (lambda d: {k: v for k, v in d.items() if k != "label"}, "label"),
    ],
)
def test_a_record_of_another_shape_is_one_line(change, needle):
    plan = TrialPlan("student", "kd_kl", "KD (KL)", 20, False, "T 4", ("temperature",), True)
    text = json.dumps(change(json.loads(to_json(plan))))
    with pytest.raises(UserError, match=needle) as err:
        from_json(TrialPlan, text, "the plan of trial x")
    assert "\n" not in str(err.value) and str(err.value).startswith("the plan of trial x was written by another kdbench")
