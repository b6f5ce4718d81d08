"""A connected user's path, simulated offline: train -> evaluate -> predict -> served model, one network.

The CLIP weights come by tag from a private Hugging Face cache (tests/simulated_hub.py), so
training runs open_clip's real tag path: the tag's QuickGELU and its preprocessing. Every
consumer of the saved model must then compute what the trained model computed: the evaluate
stage (from the image store), `l2rclip predict`, and the registered pyfunc loaded through MLflow
(SQLite store). Written against stage functions and public entry points only, so it runs on the
code before the backbone recipe too (where it fails: GELU rebuilt, OpenAI mean/std).
"""

import base64
import json
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from l2rclip import cli
from l2rclip.config import Params, from_dict
from l2rclip.data.demo import generate_demo
from l2rclip.models.checkpoint import load_model
from l2rclip.serving.predictor import Predictor
from l2rclip.serving.registry import register
from l2rclip.stages import evaluate as evaluate_stage
from l2rclip.stages import train as train_stage
from l2rclip.stages.evaluate import evaluate_fold
from l2rclip.stages.prepare import prepare
from l2rclip.stages.preprocess import preprocess
from l2rclip.tracking.runs import Tracker
from l2rclip.training import loop as training_loop

TOLERANCE = 1e-5


def run_pipeline(
    arch: str, tag: str, root, monkeypatch, image_size: int = 64, n_per_rank: int = 8, image_tower: str = "auto"
) -> dict:
    """Train one epoch, evaluate, predict and serve; returns every consumer's numbers and the reference.

    `image_tower` auto on this CPU with a (simulated) real CLIP freezes the tower: evaluation then
    reads the training stage's feature cache; `train` fine-tunes it, as on a GPU.
    """
    params = from_dict(
        Params,
        {
            "folds": [0],
            "ranks": {"start": 1, "stop": 10},
            "data": {"root": str(root / "demo"), "demo": {"n_per_rank": n_per_rank, "image_size": image_size}},
            "split": {"n_folds": 2, "val_fraction": 0.25, "calib_fraction": 0, "holdout_fraction": 0.0},
            "model": {
                "arch": arch,
                "pretrained": tag,
                "fallback": {"enabled": False},
                "image_tower": image_tower,
                "prompt": {"context_init": "the number of shapes is"},
            },
            "preprocess": {"margin": 0.0},
            "train": {
                "epochs": 1,
                "batch_size": 4,
                "eval_batch_size": 4,
                "device": "cpu",
                "feature_cache": str(root / "cache"),
            },
            "tracking": {"enabled": False},
        },
    )
    generate_demo(root / "demo", n_per_rank=n_per_rank, image_size=image_size)
    prepare(params, root / "prepared")
    preprocess(params, root / "prepared", root / "store")

    captured: dict = {}
    resolve, save = train_stage.resolve_backbone, training_loop.save_model

    def resolve_spy(*args, **kwargs):
        captured["backbone"], used = resolve(*args, **kwargs)
        return captured["backbone"], used

    def save_spy(model, folder, *args, **kwargs):
        if folder.name == "best":
            captured["model"] = model  # one epoch: the best model is the model as trained
        return save(model, folder, *args, **kwargs)

    monkeypatch.setattr(train_stage, "resolve_backbone", resolve_spy)
    monkeypatch.setattr(training_loop, "save_model", save_spy)
    train_stage.train_fold(params, 0, root / "prepared", root / "train", root / "store")
    model_dir = root / "train" / "best"
    summary = json.loads((root / "train" / "summary.json").read_text())

    outputs = evaluate_stage.split_outputs
    monkeypatch.setattr(
        evaluate_stage, "split_outputs", lambda *a, **k: captured.setdefault("evaluate", outputs(*a, **k))
    )
    evaluate_fold(
        params, 0, root / "prepared", model_dir, root / "evaluate", root / "metrics.json", store_dir=root / "store"
    )
    test = pd.read_csv(root / "evaluate" / "predictions.csv")
    paths = [root / "demo" / p for p in test["path"]]
    images = [Image.open(p).convert("RGB") for p in paths]

    trained = captured["model"].eval()
    with torch.no_grad():
        pixels = torch.stack([captured["backbone"].preprocess_eval(im) for im in images])  # (N, 3, H, W)
        logits = trained(pixels)["logits"].double()  # (N, M), as trained
    probs = torch.softmax(logits, dim=1).numpy()

    def logits_of(model, transform) -> np.ndarray:
        with torch.no_grad():
            return model(torch.stack([transform(im) for im in images]))["logits"].double().numpy()

    loaded, meta = load_model(model_dir)
    result = {
        "summary": summary,
        "logits": logits.numpy(),
        "probs": probs,
        "evaluate probs": captured["evaluate"][0],
        "load_model logits": logits_of(loaded, meta["preprocess"]),
    }

    out = root / "predict.csv"
    assert (
        cli.main(
            ["predict", str(model_dir), *map(str, paths), "--out", str(out), "--probabilities", "--device", "cpu"]
        )
        == 0
    )
    columns = [c for c in pd.read_csv(out).columns if c.startswith("p_")]
    result["predict probs"] = pd.read_csv(out)[columns].to_numpy(float)
    predictor = Predictor.load(model_dir, device="cpu")
    result["predictor logits"] = logits_of(predictor.model, predictor.transform)

    uri = f"sqlite:///{root}/mlflow.db"
    run_id = Tracker(uri, experiment="real-weights").parent_run("key", "pipeline", {}, {})
    registered = register(model_dir, "l2rclip-real-weights", run_id, {}, uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    served = mlflow.pyfunc.load_model(registered["model_uri"])
    frame = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode("ascii") for p in paths]})
    answer = served.predict(frame)
    result["pyfunc probs"] = answer[columns].to_numpy(float)
    inner = served.unwrap_python_model().predictor
    result["pyfunc logits"] = logits_of(inner.model, inner.transform)
    return result


def check_every_consumer(result: dict) -> dict[str, float]:
    """Max abs difference of each consumer to the trained model (logits, or probabilities of the logits)."""
    diffs = {}
    for name, value in result.items():
        if name not in ("logits", "probs", "summary"):
            reference = result["logits"] if "logits" in name else result["probs"]
            diffs[name] = float(np.abs(np.asarray(value, dtype=float) - reference).max())
    print(diffs)
    assert all(value <= TOLERANCE for value in diffs.values()), diffs
    return diffs


@pytest.mark.parametrize(
    ("tag", "image_tower", "trained_as"),
    [("sim_quickgelu", "auto", "frozen"), ("sim_laion", "train", "train")],  # a CPU's default, a GPU's
)
def test_every_consumer_computes_what_training_computed(
    tag, image_tower, trained_as, tiny_tags, tmp_path, monkeypatch, capsys, caplog
):
    arch, _ = tiny_tags
    caplog.set_level("INFO", logger="l2rclip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = run_pipeline(arch, tag, tmp_path, monkeypatch, image_tower=image_tower)
    check_every_consumer(result)
    device = result["summary"]["device"]  # the device is recorded with the fold
    assert device["device"] == "cpu" and device["autocast"] == "off" and device["torch"] == torch.__version__
    out = capsys.readouterr().out
    assert "train fold 0: device cpu (no GPU), float32 weights, autocast off" in out
    assert load_model(tmp_path / "train" / "best")[1]["config"].image_tower == trained_as
    # A frozen tower's test images are read from the training stage's feature cache, not encoded again.
    reused = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage() and "for" in r.getMessage()]
    assert bool(reused) == (trained_as == "frozen"), reused
    if image_tower == "auto":
        assert "model.image_tower auto: a CPU with a real CLIP" in out


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ViT-B-16 on CPU: train, evaluate, predict and serve 40 test images
def test_the_papers_backbone_vit_b16_openai(simulated_hub, tmp_path, monkeypatch):
    simulated_hub.add("ViT-B-16", "openai")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_every_consumer(run_pipeline("ViT-B-16", "openai", tmp_path, monkeypatch))
