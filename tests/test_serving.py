"""The pyfunc model: loaded by MLflow, and served over REST, it predicts what the Predictor predicts.

It is logged as models-from-code (no pickle) with request limits in its model config, which the
loaded and the served model both apply.
"""

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
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
from test_predict import NUMBERS, PROBABILITIES, mlflow_store, save_tiny_model

from l2rclip.data.demo import generate_demo
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.pyfunc import MODEL_CODE, RequestLimits, encode_image, log_pyfunc
from l2rclip.tracking.runs import Tracker

COLUMNS = NUMBERS + PROBABILITIES
# Small enough to break in a test, large enough for the 64 x 64 demo images the tests send.
LIMITS = RequestLimits(max_rows=5, max_request_bytes=200_000, max_image_pixels=100 * 100)


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> dict:
    """A tiny model logged as a pyfunc under a run of a fresh SQLite store, and a few demo images."""
    root = tmp_path_factory.mktemp("serving")
    uri = mlflow_store(tmp_path_factory)
    run_id = Tracker(uri, experiment="serving-test").parent_run("key", "demo pipeline", {}, {})
    model_dir = save_tiny_model(root / "model")
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    model_uri = log_pyfunc(model_dir, run_id, uri, limits=LIMITS)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # the global switch was undone
    generate_demo(root / "demo", n_per_rank=1, image_size=64)
    paths = sorted((root / "demo").rglob("*.png"))[:3]
    expected = Predictor.load(model_dir).predict_paths(paths, with_probabilities=True, progress=False)
    return {"uri": uri, "run_id": run_id, "model_uri": model_uri, "paths": paths, "expected": expected}


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_ping(url: str, server: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url}/ping within {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """End the server's process group (the CLI and the uvicorn it execs), politely first."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, sig)
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


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
