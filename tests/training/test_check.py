"""The library check (what `make demo` runs for now) on the real demo data, offline."""

from l2rclip.cli import main
from l2rclip.config import Params, from_dict
from l2rclip.training.check import run_check


def test_check_falls_back_offline_and_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = from_dict(
        Params,
        {
            "data": {"root": str(tmp_path / "demo"), "demo": {"n_per_rank": 3}},
            "model": {"arch": "ViT-B-16", "pretrained": "openai"},
        },
    )
    result = run_check(params, steps=4, per_rank=2)
    assert result.arch == "L2RCLIP-Demo" and result.kind == "demo" and not result.is_clip
    assert len(result.losses) == 4 and result.losses[-1]["loss"] < result.losses[0]["loss"]
    assert {"ce_loss", "kl_t2i_loss", "cop_loss", "loss"} <= set(result.losses[0])
    assert result.truncation_error < 1e-4 and 0.0 <= result.metrics["accuracy"] <= 1.0


def test_cli_check_prints_what_ran(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  root: {tmp_path / 'demo'}\n  demo:\n    n_per_rank: 2\n")
    assert main(["check", "--params", str(params), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "library check passed" in out and "DEMO CLIP (pretrained on drawn shapes only" in out
