"""The pyfunc model: loaded by MLflow, and served over REST, it predicts what the Predictor predicts.

It is logged as models-from-code (no pickle) with request limits in its model config, which the
loaded and the served model both apply.
"""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from PIL import Image
from support.models import NUMBERS, PROBABILITIES
from support.servers import encoded, free_port, stop, wait_for_ping

from l2rclip.serving.predictor import Predictor
from l2rclip.serving.pyfunc import MODEL_CODE, RequestLimits, encode_image

COLUMNS = NUMBERS + PROBABILITIES


def test_pyfunc_agrees_with_the_predictor(logged, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    images = [encoded(p) for p in logged["paths"]] + ["not base64!", encoded(Path(__file__))]
    out = model.predict(pd.DataFrame({"image": images}))

    assert len(out) == 5 and out["error"].tolist()[:3] == ["", "", ""]
    assert "invalid base64" in out.loc[3, "error"] and "UnidentifiedImageError" in out.loc[4, "error"]
    assert out.loc[3:, COLUMNS].isna().all().all()
    expected = logged["expected"]
    assert [c for c in out.columns if c.startswith("p_")] == [c for c in expected.columns if c.startswith("p_")]
    np.testing.assert_allclose(out.loc[:2, COLUMNS].to_numpy(float), expected[COLUMNS].to_numpy(float), atol=1e-6)
    assert out.loc[:2, "pred_name"].tolist() == expected["pred_name"].tolist()
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"picture": ["x"]}))


def test_logged_model_is_code_not_a_pickle_and_carries_the_limits(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    local = Path(download_artifacts(artifact_uri=logged["model_uri"], dst_path=str(tmp_path)))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert (local / flavor["model_code_path"]).read_text() == MODEL_CODE.read_text()
    assert flavor["config"] == {"max_rows": 5, "max_request_bytes": 200_000, "max_image_pixels": 10_000}


def test_pyfunc_refuses_requests_over_its_limits(logged, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    model = mlflow.pyfunc.load_model(logged["model_uri"])
    one = encoded(logged["paths"][0])
    with pytest.raises(MlflowException, match=r"at most serving.max_rows = 5 images per request, found 6"):
        model.predict(pd.DataFrame({"image": [one] * 6}))
    with pytest.raises(MlflowException, match=r"at most serving.max_request_bytes = 200000 bytes .* found 250000"):
        model.predict(pd.DataFrame({"image": ["A" * 50_000] * 5}))
    large = encode_image(Image.new("RGB", (101, 100)))  # 10,100 pixels, over max_image_pixels
    out = model.predict(pd.DataFrame({"image": [one, large]}))
    assert out.loc[0, "error"] == "" and out.loc[0, "pred_name"] == logged["expected"].loc[0, "pred_name"]
    assert out.loc[1, "error"] == ("ImageTooLargeError: 101x100 = 10100 pixels, more than the limit "
                                   "data.max_image_pixels = 10000")
    assert out.loc[1, COLUMNS].isna().all()
    with pytest.raises(ValueError, match=r"serving.max_rows: expected a positive integer, found 0"):
        RequestLimits(max_rows=0)


def test_runs_uri_loads_the_same_model(logged):
    predictor = Predictor.load(f"runs:/{logged['run_id']}/model", tracking_uri=logged["uri"])
    out = predictor.predict_paths(logged["paths"], with_probabilities=True, progress=False)
    expected = logged["expected"][COLUMNS].to_numpy(float)
    np.testing.assert_allclose(out[COLUMNS].to_numpy(float), expected, atol=1e-6)


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_predictor(logged, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged["model_uri"], "--env-manager",
               "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for_ping(url, server, log)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded(logged["paths"][0])]]}})
        request = urllib.request.Request(f"{url}/invocations", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
        too_many = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["x"]] * 6}})
        request = urllib.request.Request(f"{url}/invocations", data=too_many.encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        status, message = refused.value.code, json.loads(refused.value.read())["message"]
    finally:
        stop(server)
    assert status == 400 and "at most serving.max_rows = 5 images per request, found 6" in message
    expected = logged["expected"].iloc[0]
    assert len(answer) == 1 and answer[0]["error"] == ""
    assert answer[0]["pred_rank"] == expected["pred_rank"] and answer[0]["pred_name"] == expected["pred_name"]
    np.testing.assert_allclose([answer[0][c] for c in COLUMNS], expected[COLUMNS].to_numpy(float), atol=1e-6)
