"""The pyfunc model: loaded by MLflow, and served over REST, it predicts what the Predictor predicts.

It is logged as models-from-code (no pickle) with request limits in its model config, which the
loaded and the served model both apply.
"""

import json
import os
import shutil
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
from support.models import NUMBERS, PROBABILITIES, mlflow_store, save_tiny_model
from support.project import ROOT
from support.servers import encoded, free_port, stop, wait_for_ping

from l2rclip.data.demo import generate_demo
from l2rclip.serving.environment import requirements, served_imports
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.predictor import mlflow_store as use_store
from l2rclip.serving.pyfunc import MODEL_CODE, RequestLimits, encode_image
from l2rclip.serving.registry import register
from l2rclip.tracking.runs import Tracker

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
    assert out.loc[1, "error"] == (
        "ImageTooLargeError: 101x100 = 10100 pixels, more than the limit data.max_image_pixels = 10000"
    )
    assert out.loc[1, COLUMNS].isna().all()
    with pytest.raises(ValueError, match=r"serving.max_rows: expected a positive integer, found 0"):
        RequestLimits(max_rows=0)


def test_runs_uri_loads_the_same_model(logged):
    predictor = Predictor.load(f"runs:/{logged['run_id']}/model", tracking_uri=logged["uri"])
    out = predictor.predict_paths(logged["paths"], with_probabilities=True, progress=False)
    expected = logged["expected"][COLUMNS].to_numpy(float)
    np.testing.assert_allclose(out[COLUMNS].to_numpy(float), expected, atol=1e-6)


def serve_and_ask(
    model_uri: str,
    env_manager: str,
    tracking_uri: str,
    image: str,
    folder: Path,
    env_root: Path | None = None,
    timeout: float = 120.0,
) -> tuple[list[dict], int, str]:
    """`mlflow models serve` on 127.0.0.1: (answer to one image, status and message of a 6-row request)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # uvicorn, pyenv
    if env_root is not None:
        env["MLFLOW_ENV_ROOT"] = str(env_root)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        env_manager,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    log = folder / f"server-{env_manager}.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            command, env=env, cwd=folder, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_ping(url, server, log, timeout)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}})
        request = urllib.request.Request(
            f"{url}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
        too_many = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["x"]] * 6}})
        request = urllib.request.Request(
            f"{url}/invocations", data=too_many.encode(), headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        return answer, refused.value.code, json.loads(refused.value.read())["message"]
    finally:
        stop(server)


def assert_answers_like(answer: list[dict], expected: pd.Series) -> None:
    assert len(answer) == 1 and answer[0]["error"] == ""
    assert answer[0]["pred_rank"] == expected["pred_rank"] and answer[0]["pred_name"] == expected["pred_name"]
    np.testing.assert_allclose([answer[0][c] for c in COLUMNS], expected[COLUMNS].to_numpy(float), atol=1e-6)


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_predictor(logged, tmp_path):
    answer, status, message = serve_and_ask(
        logged["model_uri"], "local", logged["uri"], encoded(logged["paths"][0]), tmp_path
    )
    assert status == 400 and "at most serving.max_rows = 5 images per request, found 6" in message
    assert_answers_like(answer, logged["expected"].iloc[0])


def test_logged_model_carries_its_code_and_requirements_an_index_has(logged, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    local = Path(download_artifacts(artifact_uri=logged["model_uri"], dst_path=str(tmp_path)))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    code = local / flavor["code"] / "l2rclip"
    assert (code / "serving" / "served_model.py").read_text() == MODEL_CODE.read_text()
    assert (code / "models" / "configs").is_dir() and not list(code.rglob("__pycache__"))
    pins = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    assert "l2rclip" not in pins  # on no index: the code travels in code/ instead
    assert {"mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pandas", "pillow"} <= set(pins)
    assert all("+" not in pinned for pinned in pins.values()), pins  # no local labels (+cu130): no index has them
    python_env = yaml.safe_load((local / "python_env.yaml").read_text())
    assert python_env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert python_env["dependencies"] == ["-r requirements.txt"]


@pytest.mark.slow
def test_the_requirements_follow_every_l2rclip_module_a_fresh_interpreter_loads_to_serve(logged):
    """The source walk behind `requirements()` sees every l2rclip module that loading and predicting runs.

    Its third-party imports are then mapped to distributions; that these install and serve is the
    virtualenv test's to show (optional imports of the dependencies themselves are pip's concern).
    """
    script = f"""
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({logged["model_uri"]!r})
model.predict(pd.DataFrame({{"image": [{encoded(logged["paths"][0])!r}]}}))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "l2rclip")))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"]}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    walked, third_party = served_imports()
    assert "l2rclip.serving.served_model" in walked and {"torch", "open_clip", "mlflow"} <= third_party
    assert loaded - walked == set(), f"loaded to serve, missed by the source walk: {loaded - walked}"
    pins = {line.split("==")[0] for line in requirements()}
    assert {"torch", "open_clip_torch", "mlflow", "safetensors"} <= pins


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_registered_champion_serves_from_a_fresh_virtualenv_like_the_local_pyfunc(tmp_path_factory, tmp_path):
    """`mlflow models serve --env-manager virtualenv` builds the model's own environment and answers alike.

    The environment is built from the model alone (requirements.txt, python_env.yaml, code/), in a
    fresh MLFLOW_ENV_ROOT unless one is set (reuse: set it). Needs pyenv on PATH and an index with
    the pinned releases; on this machine torch comes from the local disk (minutes, not a CUDA download).
    """
    if shutil.which("pyenv") is None:
        pytest.skip("MLflow's virtualenv env manager needs pyenv on PATH")
    uri = mlflow_store(tmp_path_factory)
    tracker = Tracker(uri, experiment="serving-virtualenv-test")
    run_id = tracker.child_run(tracker.parent_run("key", "demo pipeline", {}, {}), "fold 0", {}, {})
    tracker.end_run(run_id)
    name = "l2rclip-virtualenv-test"
    register(
        save_tiny_model(tmp_path / "model"),
        name,
        run_id,
        {"l2rclip.fold": 0},
        uri,
        limits=RequestLimits(max_rows=5),
    )
    generate_demo(tmp_path / "demo", n_per_rank=1, image_size=64)
    image = encoded(sorted((tmp_path / "demo").rglob("*.png"))[0])
    with use_store(uri):
        local = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({"image": [image]}))
    env_root = None if os.environ.get("MLFLOW_ENV_ROOT") else tmp_path / "envs"
    answer, status, message = serve_and_ask(
        f"models:/{name}@champion", "virtualenv", uri, image, tmp_path, env_root=env_root, timeout=3000
    )
    assert status == 400 and "at most serving.max_rows = 5 images per request, found 6" in message
    assert_answers_like(answer, local.iloc[0])
