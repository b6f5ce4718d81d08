"""Every method in the same harness: presets, ordinal heads, zero-shot, linear probe, end to end."""

import numpy as np
import pytest
import torch

from l2rclip.config import EvalConfig, Params, from_dict
from l2rclip.methods import resolve_method
from l2rclip.models.heads import HeadLoss, OrdinalHeadModel
from l2rclip.stages.evaluate import evaluate_fold
from l2rclip.stages.prepare import prepare
from l2rclip.stages.train import train_fold
from l2rclip.training.baselines import fit_linear_probe

METHODS = ["l2rclip", "ordinalclip", "coop", "zero_shot", "linear_probe", "coral", "corn"]


def test_presets_switch_parts_off():
    coop = resolve_method(from_dict(Params, {"model": {"method": "coop"}}))
    assert coop.model.prompt.interpolation == "plain" and not coop.model.rankformer.enabled
    assert coop.loss.cop == 0 and coop.loss.kl_t2i == 0 and coop.loss.ce == 1
    ordinal = resolve_method(
        from_dict(Params, {"model": {"method": "ordinalclip", "prompt": {"interpolation": "plain"}}})
    )
    assert ordinal.model.prompt.interpolation == "linear" and not ordinal.model.rankformer.enabled
    assert ordinal.loss.cop == 0 and ordinal.loss.kl_t2i == 1
    assert resolve_method(Params()) == Params()


@pytest.mark.parametrize("kind", ["coral", "corn", "linear"])
def test_head_probabilities_are_distributions_and_losses_fall(kind):
    torch.manual_seed(0)
    model = OrdinalHeadModel(torch.nn.Identity(), kind, n_ranks=5, width=8)
    features = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    labels = torch.randint(0, 5, (40,))
    probs = model.rank_probabilities(model(image_features=features)["logits"])
    assert probs.shape == (40, 5) and torch.allclose(probs.sum(1), torch.ones(40)) and (probs >= 0).all()
    criterion = HeadLoss(kind, 5)
    optimizer = torch.optim.Adam(model.param_groups(0.05, 0.0), lr=0.05)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        terms = criterion(model(image_features=features), labels)
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"]))
    assert f"{kind}_loss" in terms and losses[-1] < losses[0]


def test_corn_survival_is_monotone():
    model = OrdinalHeadModel(torch.nn.Identity(), "corn", n_ranks=4, width=2)
    logits = torch.tensor([[2.0, 0.0, -2.0]])  # P(y>0)=.88, P(y>1|y>0)=.5, P(y>2|y>1)=.12
    probs = model.rank_probabilities(logits)[0]
    above = torch.sigmoid(logits[0])
    expected = torch.tensor(
        [1 - above[0], above[0] * (1 - above[1]), above[0] * above[1] * (1 - above[2]), above.prod()]
    )
    assert torch.allclose(probs, expected, atol=1e-6)


def test_linear_probe_chooses_c_on_validation_and_handles_absent_ranks():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 4)) * 3
    y = np.repeat([0, 1, 2], 20)
    x = centres[y] + rng.normal(size=(60, 4))
    weight, bias, c, metrics = fit_linear_probe(
        x[::2], y[::2], x[1::2], y[1::2], np.array([0.0, 1, 2, 3]), (0.001, 1.0), 0, EvalConfig()
    )
    assert weight.shape == (4, 4) and bias[3] < -1e3  # rank 3 has no training image
    assert c == 1.0 and metrics["accuracy"] > 0.9


def test_linear_probe_without_c_values_says_so():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"model.probe_c: expected at least one C .*, found \[\]"):
        fit_linear_probe(x, y, x, y, np.array([0.0, 1.0]), (), 0, EvalConfig())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    base = {
        "folds": [0, 1],
        "data": {"root": str(root / "demo"), "demo": {"n_per_rank": 8, "image_size": 64}},
        "split": {"n_folds": 2, "val_fraction": 0.25},
        "tracking": {"enabled": False},
        "model": {"arch": "L2RCLIP-Tiny", "pretrained": "none"},
        "train": {"epochs": 1, "stage1_epochs": 1, "batch_size": 16, "feature_cache": str(root / "cache")},
    }
    prepare(from_dict(Params, base), root / "prepared")
    return root, base


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_evaluates(prepared, method, tmp_path):
    root, base = prepared
    params = from_dict(Params, {**base, "model": {**base["model"], "method": method}})
    summary = train_fold(params, 0, root / "prepared", tmp_path / "train")
    assert summary["method"] == method and (tmp_path / "train/best/model.json").is_file()
    result = evaluate_fold(
        params, 0, root / "prepared", tmp_path / "train/best", tmp_path / "eval", tmp_path / "metrics.json"
    )
    assert result["method"] == method and 0 <= result["test/accuracy"] <= 1
    assert ("test/ordinality" in result) == (method not in ("linear_probe", "coral", "corn"))
    figures = {p.stem for p in (tmp_path / "eval/figures").glob("*.png")}
    assert {"confusion_matrix", "calibration"} <= figures


def test_two_stage_schedule_runs(prepared, tmp_path):
    root, base = prepared
    params = from_dict(Params, {**base, "train": {**base["train"], "schedule": "two_stage"}})
    summary = train_fold(params, 0, root / "prepared", tmp_path / "train")
    assert [row["phase"] for row in summary_history(tmp_path / "train")] == ["stage1", "stage2"]
    assert summary["best_epoch"] in (1, 2)


def summary_history(folder):
    import pandas as pd

    return pd.read_csv(folder / "history.csv").to_dict("records")
