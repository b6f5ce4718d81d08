"""Commands that start tools by name work without an activated .venv: `l2rclip serve` (mlflow models
serve finds uvicorn), `l2rclip demo` and `l2rclip reproduce` (DVC's stages find this Python)."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support.project import ROOT
from support.servers import encoded, free_port, stop, wait_for_ping

from l2rclip.cli import main, serve_invocation
from l2rclip.venv_path import interpreter_first_on_path

VENV_PYTHON = "/home/me/l2rclip/.venv/bin/python"


def test_the_interpreters_folder_goes_first_on_path_once():
    environ = {"PATH": "/usr/bin:/home/me/l2rclip/.venv/bin:/bin", "HOME": "/home/me"}
    command, env = serve_invocation("models:/faces@champion", "127.0.0.1", 5001, environ, VENV_PYTHON)
    assert env["PATH"] == "/home/me/l2rclip/.venv/bin:/usr/bin:/bin"  # uvicorn, mlflow of this venv first
    assert command == [
        VENV_PYTHON,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/faces@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        "5001",
    ]
    assert env["HOME"] == "/home/me" and environ["PATH"] == "/usr/bin:/home/me/l2rclip/.venv/bin:/bin"


def test_the_stages_python_is_this_one_activated_or_not():
    env = interpreter_first_on_path({"PATH": "/usr/local/bin:/usr/bin", "LANG": "C"}, VENV_PYTHON)
    assert env == {"PATH": "/home/me/l2rclip/.venv/bin:/usr/local/bin:/usr/bin", "LANG": "C"}
    assert interpreter_first_on_path({}, VENV_PYTHON)["PATH"] == "/home/me/l2rclip/.venv/bin"


def test_the_store_is_the_pipelines_unless_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, env = serve_invocation("models:/m/1", "127.0.0.1", 5001, {}, VENV_PYTHON)
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'mlflow.db'}" and env["PATH"] == str(
        Path(VENV_PYTHON).parent
    )
    _, env = serve_invocation(
        "models:/m/1", "127.0.0.1", 5001, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, VENV_PYTHON
    )
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_without_a_model_or_a_registered_one_it_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "no registered model in outputs/register/registered.json" in err and "dvc repro" in err


@pytest.mark.slow
def test_l2rclip_serve_answers_without_the_venv_on_path(logged, tmp_path):  # noqa: F811 - the fixture
    """The reported failure: `mlflow models serve` from an unactivated .venv cannot find uvicorn."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "server.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "l2rclip.cli", "serve", logged["model_uri"], "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_ping(f"http://127.0.0.1:{port}", server, log)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded(logged["paths"][0])]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())["predictions"]
    finally:
        stop(server)
    assert answer[0]["error"] == "" and answer[0]["pred_rank"] == logged["expected"].iloc[0]["pred_rank"]
