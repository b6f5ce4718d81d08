"""`l2rclip serve` before it hands over to MLflow (issue 21.4): exposure warning, unknown models in one line."""

import os

import pytest

from l2rclip import cli
from l2rclip.serving.registry import check_model_uri


@pytest.fixture
def no_exec(monkeypatch):
    """Record the command `l2rclip serve` would exec instead of replacing the test process."""
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: calls.append(command))
    return calls


def test_serve_on_every_interface_warns_and_says_how_to_protect_it(tmp_path, capsys, no_exec):
    model = tmp_path / "model"
    model.mkdir()
    cli.main(["serve", str(model), "--host", "0.0.0.0", "--port", "6001"])
    err = capsys.readouterr().err
    assert no_exec and no_exec[0][no_exec[0].index("-h") + 1] == "0.0.0.0"  # it still serves, as asked
    assert "warning: --host 0.0.0.0 exposes an UNAUTHENTICATED endpoint" in err
    assert "reverse proxy" in err and "ssh -L 6001:127.0.0.1:6001" in err
    cli.main(["serve", str(model)])
    assert "warning" not in capsys.readouterr().err  # the loopback default says nothing


def test_serve_of_an_unknown_model_is_one_line_naming_the_store(tmp_path, capsys, no_exec, monkeypatch):
    store = (tmp_path / "mlruns").as_uri()  # a file store: no database migrations to wait for
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert cli.main(["serve", "models:/no-such-model@champion"]) == 2
    err = capsys.readouterr().err
    assert not no_exec and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"models:/no-such-model@champion: not in the MLflow store {store}" in err
    assert "registered models there: none" in err
    assert cli.main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err and not no_exec


def test_ctrl_c_in_predict_is_one_line_exit_130_and_the_old_output_stays(tmp_path, capsys, monkeypatch):
    """Issue 21.5: Ctrl+C at the 2nd batch: no traceback, exit 130, --out untouched, no temporary file left."""
    from PIL import Image
    from support.models import on_forward, save_tiny_model

    def interrupt(call: int) -> None:
        if call == 2:
            raise KeyboardInterrupt

    model = save_tiny_model(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(images / f"{i}.png")
    calls = on_forward(monkeypatch, interrupt)
    out = tmp_path / "predictions.csv"
    out.write_text("path,pred_label\nold.png,3\n")
    command = ["predict", str(model), str(images), "--out", str(out), "--batch-size", "2", "--store", "none"]
    assert cli.main([*command, "--device", "cpu"]) == 130 and calls == [1, 2]
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"interrupted, nothing written ({out} unchanged)" and "Traceback" not in err
    assert out.read_text() == "path,pred_label\nold.png,3\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model", "predictions.csv"]


def test_serve_accepts_a_logged_model_id_uri_and_names_an_unknown_one(logged, capsys, no_exec, monkeypatch):
    """MLflow 3 addresses a logged model as models:/m-<id> (what logging returns): it must serve."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged["uri"])
    assert logged["model_uri"].startswith("models:/m-")
    assert check_model_uri(logged["model_uri"], logged["uri"]).startswith("logged model m-")
    cli.main(["serve", logged["model_uri"]])
    assert no_exec and logged["model_uri"] in no_exec[0]
    assert "serving models:/m-" in capsys.readouterr().err
    no_exec.clear()
    assert cli.main(["serve", "models:/m-0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert (
        not no_exec and len(err.splitlines()) == 1 and "models:/m-0123456789abcdef: not in the MLflow store" in err
    )
