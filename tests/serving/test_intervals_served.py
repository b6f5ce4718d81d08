"""Conformal intervals travel with the model: predict, the registered model and the pyfunc agree."""

import base64

import mlflow
import numpy as np
import pandas as pd
import pytest
from support.models import mlflow_store, save_tiny_model

from l2rclip import cli
from l2rclip.data.demo import generate_demo
from l2rclip.evaluation.conformal import Calibration, ConformalError
from l2rclip.evaluation.predictions import probabilities_of
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.pyfunc import log_pyfunc
from l2rclip.serving.registry import register
from l2rclip.tracking.runs import Tracker

INTERVALS = ["interval_low", "interval_high", "interval_low_value", "interval_high_value", "interval_level"]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """A tiny model calibrated on 20 demo images, logged as a pyfunc and registered in a SQLite store."""
    root = tmp_path_factory.mktemp("intervals")
    model_dir = save_tiny_model(root / "model")
    table = generate_demo(root / "demo", n_per_rank=3, image_size=64)  # 30 images, counts 1..10
    paths = [root / "demo" / p for p in table["path"]]
    calib, test = np.arange(0, 30, 3).tolist() + np.arange(1, 30, 3).tolist(), np.arange(2, 30, 3).tolist()
    plain = Predictor.load(model_dir, device="cpu")
    probs = plain.predict_paths([paths[i] for i in calib], with_probabilities=True, progress=False)
    probs = probabilities_of(probs, plain.rank_space)  # (20, 10): p_1 .. p_10
    calibration = Calibration.fit(
        probs, table["label"].to_numpy()[calib] - 1, np.arange(1.0, 11.0), "ordinal", [0.1, 0.2]
    ).to_dict()
    uri = mlflow_store(tmp_path_factory)
    run_id = Tracker(uri, experiment="intervals-test").parent_run("key", "demo pipeline", {}, {})
    registered = register(model_dir, "l2rclip-intervals", run_id, {}, uri, calibration=calibration)
    return {
        "uri": uri,
        "model_dir": model_dir,
        "calibration": calibration,
        "paths": [paths[i] for i in test],
        "registered": registered,
        "logged": log_pyfunc(model_dir, run_id, uri, calibration=calibration),
    }


def test_predict_and_the_served_pyfunc_give_the_same_interval_columns(served, monkeypatch, tmp_path):
    direct = Predictor.load(served["model_dir"], device="cpu", calibration=served["calibration"])
    expected = direct.predict_paths(served["paths"], progress=False)
    low, high = expected["interval_low"].astype(int), expected["interval_high"].astype(int)
    assert (low <= expected["pred_label"].astype(int)).all() and (expected["pred_label"].astype(int) <= high).all()
    assert (expected["interval_level"] == 0.9).all()
    assert (expected["interval_high_value"] - expected["interval_low_value"] == high - low).all()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["uri"])
    images = [base64.b64encode(p.read_bytes()).decode("ascii") for p in served["paths"]] + ["not base64!"]
    for model_uri in (served["logged"], served["registered"]["model_uri"]):
        out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
        assert (
            out.loc[:9, INTERVALS].astype(float).to_numpy().tolist()
            == expected[INTERVALS].astype(float).to_numpy().tolist()
        )
        assert out.loc[10, INTERVALS].isna().all()  # an unreadable image has no interval

    csv = tmp_path / "predictions.csv"
    registered = served["registered"]["model_uri"]
    assert cli.main(["predict", registered, *map(str, served["paths"]), "--out", str(csv), "--device", "cpu"]) == 0
    from_cli = pd.read_csv(csv)
    np.testing.assert_array_equal(from_cli[INTERVALS].to_numpy(float), expected[INTERVALS].to_numpy(float))


def test_alpha_picks_another_supported_level_or_fails_clearly(served, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["uri"])
    registered, paths = served["registered"]["model_uri"], list(map(str, served["paths"]))
    csv = tmp_path / "p.csv"
    assert cli.main(["predict", registered, *paths, "--alpha", "0.3", "--out", str(csv), "--device", "cpu"]) == 0
    at_70, at_90 = pd.read_csv(csv), Predictor.load(registered, device="cpu").predict_paths(paths, progress=False)
    assert (at_70["interval_level"] == 0.7).all()
    width_70, width_90 = (t["interval_high"] - t["interval_low"] for t in (at_70, at_90))
    assert (width_70 <= width_90).all()

    assert cli.main(["predict", registered, *paths, "--alpha", "0.01", "--out", str(csv)]) == 2
    assert "n = 20; the smallest level it supports is 0.04762" in capsys.readouterr().err
    assert cli.main(["predict", str(served["model_dir"]), *paths, "--alpha", "0.1", "--out", str(csv)]) == 2
    assert "the model has no conformal calibration" in capsys.readouterr().err
    with pytest.raises(ConformalError, match="strictly between 0 and 1"):
        Predictor.load(registered, device="cpu", alpha=1.0)
    with pytest.raises(ConformalError, match="expected a conformal calibration"):
        Predictor.load(served["model_dir"], device="cpu", calibration={"fold": 0, "calibrated": False})
