"""The zero-shot@k stage and the report's trained-vs-zero-shot table (issue 20: printed side by side)."""

import json

from l2rclip.config import Params, from_dict
from l2rclip.stages import report as report_stage
from l2rclip.stages.prepare import prepare
from l2rclip.stages.zero_shot import zero_shot_fold


def test_the_demo_clip_zero_shot_counts_far_above_chance_and_says_which_backbone(tmp_path):
    params = from_dict(
        Params,
        {
            "folds": [0],
            "data": {"root": str(tmp_path / "demo"), "demo": {"n_per_rank": 6}},
            "split": {"n_folds": 2, "val_fraction": 0.0, "calib_fraction": 0.0, "holdout_fraction": 0.0},
            "model": {"arch": "L2RCLIP-Demo", "pretrained": "demo", "prompt_template": "a photo of {} shapes."},
            "train": {"device": "cpu", "feature_cache": str(tmp_path / "cache")},
            "tracking": {"enabled": False},
        },
    )
    prepare(params, tmp_path / "prepared")
    result = zero_shot_fold(params, 0, tmp_path / "prepared", tmp_path / "metrics" / "zero_shot_0.json")
    assert json.loads((tmp_path / "metrics" / "zero_shot_0.json").read_text()) == result
    assert result["backbone_kind"] == "demo" and result["prompt_template"] == "a photo of {} shapes."
    assert result["zero_shot/accuracy"] > 0.5 and result["zero_shot/mae"] < 1.0  # chance: 0.1 and 3.3


def test_the_report_prints_zero_shot_beside_the_trained_model(tmp_path):
    for fold, (accuracy, mae) in enumerate([(0.80, 0.25), (0.70, 0.35)]):
        (tmp_path / f"zero_shot_{fold}.json").write_text(
            json.dumps({"zero_shot/accuracy": accuracy, "zero_shot/mae": mae, "prompt_template": "{} dots"})
        )
    zero_shot = report_stage.read_zero_shot(tmp_path, [0, 1])
    assert zero_shot["summary"]["zero_shot/accuracy"]["mean"] == 0.75
    trained = {"test/accuracy": {"mean": 0.9, "std": 0.01}, "test/mae": {"mean": 0.1, "std": 0.02}}
    header = {"method": "l2rclip", "backbone_kind": "demo", "zero_shot": zero_shot}
    lines = report_stage.zero_shot_lines(trained, header)
    assert "DEMO CLIP" in lines[1]
    assert '| zero-shot, "{} dots" | 0.750 +- 0.071 | 0.300 +- 0.071 |' in lines
    assert "| trained (`l2rclip`) | 0.900 +- 0.010 | 0.100 +- 0.020 |" in lines
    assert report_stage.read_zero_shot(tmp_path, [0, 1, 2]) is None  # a fold without one: no table
    assert report_stage.zero_shot_lines(trained, {"method": "l2rclip"}) == []
