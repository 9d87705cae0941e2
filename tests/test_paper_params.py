"""Issue 22: every distilling method owns a frozen Params (the paper's methods too); one vocabulary."""

import pytest
from conftest import loss_config

import kdbench.methods
from kdbench.errors import UserError
from kdbench.methods import get_method
from kdbench.sweep.ablation import parse_ablation
from kdbench.sweep.plan import plan_trials


def test_paper_methods_own_params_with_the_published_defaults():
    assert get_method("kd_kl").params().pairs() == (("temperature", 4.0), ("beta", 1.0))
    assert get_method("kd_cos").params().pairs() == (("gamma", 1.0), ("on", "logits"))  # on logits: no temperature
    assert get_method("kd_cos").params(on="probs").pairs() == (("gamma", 1.0), ("on", "probs"), ("temperature", 4.0))
    assert get_method("kd_kl_cos").params().pairs() == (("temperature", 4.0), ("beta", 1.0), ("gamma", 1.0), ("on", "logits"))
    assert get_method("baseline").params is None


@pytest.mark.parametrize(
    ("method", "settings", "needle"),
    [
        ("kd_kl", {"temperature": 0.0}, "kd_kl.temperature must be > 0, got 0"),
        ("kd_kl", {"beta": -1.0}, "kd_kl.beta must be >= 0 (a loss weight), got -1"),
        ("kd_cos", {"on": "features"}, "kd_cos.on must be one of logits, probs, got 'features'"),
        ("kd_kl_cos", {"gamma": float("nan")}, "kd_kl_cos.gamma must be a finite number"),
        ("kd_kl_cos", {"alpha": 0.0, "beta": 0.0, "gamma": 0.0}, "loss weights alpha and beta, gamma are all 0"),
        ("kd_kl_cos", {"tau": 2.0}, "kd_kl_cos has no hyperparameter tau: its hyperparameters are temperature, beta"),
    ],
)
def test_paper_params_range_and_choice_errors_are_one_line(method, settings, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        get_method(method).check(loss_config(**settings), "")
    assert "\n" not in str(err.value)


def test_a_degenerate_point_is_resolved_by_the_method_itself(monkeypatch):
    monkeypatch.setattr(kdbench.methods, "METHODS", dict(kdbench.methods.METHODS))  # no registry scan needed: same answer
    kl_cos = get_method("kd_kl_cos")
    real, loss = kl_cos.resolve(loss_config(temperature=2.0, beta=0.5, gamma=0.0, on="probs"))
    assert (real.name, loss) == ("kd_kl", loss_config(temperature=2.0, beta=0.5))
    real, loss = kl_cos.resolve(loss_config(temperature=2.0, beta=0.0, gamma=3.0))
    assert (real.name, loss) == ("kd_cos", loss_config(gamma=3.0, on="logits"))  # on logits: T is canonical, not kept
    real, loss = kl_cos.resolve(loss_config(temperature=2.0, beta=0.0, gamma=3.0, on="probs"))
    assert (real.name, loss) == ("kd_cos", loss_config(gamma=3.0, on="probs", temperature=2.0))
    assert kl_cos.resolve(loss_config(alpha=0.5, beta=0.0, gamma=0.0))[0].name == "baseline"
    assert get_method("kd_kl").resolve(loss_config(beta=0.0))[0].name == "baseline"
    assert get_method("kd_cos").resolve(loss_config(gamma=0.0, on="probs"))[0].name == "baseline"
    real, loss = kl_cos.resolve(loss_config())
    assert real is kl_cos and loss == loss_config(temperature=4, beta=1, gamma=1, on="logits")


def _raw(**extra):
    raw = {
        "name": "t",
        "grid": {"datasets": ["eurosat"], "methods": ["baseline", "kd_kl", "kd_cos", "kd_kl_cos"], "seeds": [0]},
        "run": {"device": "cpu"},
    }
    for table, values in extra.items():
        raw[table] = {**raw.get(table, {}), **values}
    return raw


def _keys(raw):
    return sorted(t.key for t in plan_trials(parse_ablation(raw, "t")))


def test_the_shorthand_and_the_explicit_method_tables_plan_the_same_trials():
    shorthand = _raw(
        grid={"temperatures": [2.0, 4.0], "kl_weights": [0.0, 1.0], "cos_weights": [1.0]},
        loss={"temperature": 4.0, "beta": 1.0, "cosine_on": "probs"},
    )
    explicit = _raw(
        grid={
            "kd_kl": {"temperature": [2.0, 4.0], "beta": [0.0, 1.0]},
            "kd_cos": {"temperature": [2.0, 4.0]},
            "kd_kl_cos": {"temperature": [2.0, 4.0], "beta": [0.0, 1.0]},
        },
        methods={
            "kd_kl": {"temperature": 4.0, "beta": 1.0},
            "kd_cos": {"on": "probs", "temperature": 4.0},
            "kd_kl_cos": {"temperature": 4.0, "beta": 1.0, "on": "probs"},
        },
    )
    assert _keys(shorthand) == _keys(explicit)
    ablation = parse_ablation(shorthand, "t")
    assert dict(ablation.methods["kd_kl"].axes) == {"temperature": (2.0, 4.0), "beta": (0.0, 1.0)}
    assert ablation.methods["kd_cos"].default == (("gamma", 1.0), ("on", "probs"), ("temperature", 4.0))
    # an explicit [methods.kd_kl] value wins over the shorthand
    ablation = parse_ablation(
        _raw(grid={"temperatures": [2.0, 4.0]}, loss={"temperature": 4.0}, methods={"kd_kl": {"temperature": 8.0}}), "t"
    )
    assert dict(ablation.methods["kd_kl"].axes)["temperature"] == (8.0,)
    assert dict(ablation.methods["kd_kl_cos"].axes)["temperature"] == (2.0, 4.0)
    assert dict(ablation.methods["kd_cos"].axes)["temperature"] == (4.0,)  # on the logits: no T axis (its default, unused)


def test_planned_grid_points_name_the_method_settings():
    trials = plan_trials(parse_ablation(_raw(grid={"cos_weights": [0.0, 1.0]}, loss={"gamma": 1.0}), "t"))
    kl = next(t for t in trials if t.config.method == "kd_kl")
    points = {(g.method, g.point) for g in kl.plan.grid_points}
    assert ("kd_kl_cos", (("temperature", 4.0), ("beta", 1.0), ("gamma", 0.0), ("on", "logits"))) in points
    assert kl.plan.axes == ("temperature", "beta") and kl.plan.default
