"""Resuming continues only the same computation; a damaged state or a second trainer loses nothing."""

import json
import logging
import os
import subprocess
import sys

import pytest
from support.project import SMALL, merge

from l2rclip.config import Params, from_dict
from l2rclip.data.demo import generate_demo
from l2rclip.locking import OutputLockedError, exclusive_output
from l2rclip.stages.prepare import prepare
from l2rclip.stages.train import train_fold
from l2rclip.training.resume import identity_difference, run_identity


@pytest.fixture
def fold_inputs(tmp_path):
    params = from_dict(
        Params,
        merge(
            SMALL,
            {
                "data": {"root": str(tmp_path / "demo"), "demo": {"n_per_rank": 8, "image_size": 48}},
                "model": {"arch": "L2RCLIP-Tiny", "pretrained": "none", "fallback": {"epochs": 2}},
                "train": {"epochs": 2, "device": "cpu"},
                "tracking": {"enabled": False},
            },
        ),
    )
    generate_demo(tmp_path / "demo", n_per_rank=8, image_size=48)
    prepare(params, tmp_path / "prepared")
    return params, tmp_path / "prepared"


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_identity_names_what_differs():
    base = run_identity({"train.epochs": 2}, 0, "v1")
    other = {**base, "params": {"train.epochs": 3}, "code": {**base["code"], "l2rclip/training/loop.py": "x"}}
    text = identity_difference(base, other)
    assert "params train.epochs" in text and "code l2rclip/training/loop.py" in text
    assert "older l2rclip" in identity_difference(None, base)


def test_identity_difference_does_not_name_unchanged_list_params():
    """Issue 21.10: a saved identity has been through JSON; tuples equal to its lists are not changes."""
    params = {"folds": (0, 1, 2), "model.probe_c": (0.1, 1.0), "conformal.alpha": (0.1, 0.2), "train.epochs": 2}
    saved = json.loads(json.dumps(run_identity(params, 0, "v1")))
    current = run_identity({**params, "train.epochs": 3}, 0, "v1")
    assert identity_difference(saved, current) == "params train.epochs"


def test_a_corrupt_last_state_is_moved_aside_and_training_starts_fresh(fold_inputs, tmp_path, caplog):
    params, prepared = fold_inputs
    out = tmp_path / "folds/0/train"
    train_fold(params, 0, prepared, out)
    reference = snapshot(out)
    weights = out / "last/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    damaged = (out / "last/state.json").read_bytes()

    with caplog.at_level(logging.WARNING, logger="l2rclip"):
        train_fold(params, 0, prepared, out)
    assert "cannot be read" in caplog.text and "moved it to" in caplog.text
    aside = list((tmp_path / "folds/0").glob("train-last.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "state.json").read_bytes() == damaged  # nothing lost
    assert snapshot(out) == reference  # the fresh run is the same computation, bit for bit

    (out / "last/state.json").write_text("{not json")
    train_fold(params, 0, prepared, out)
    (out / "last/optimizer.pt").unlink()
    train_fold(params, 0, prepared, out)
    assert len(list((tmp_path / "folds/0").glob("train-last.corrupt-*"))) >= 2
    assert snapshot(out) == reference


def test_a_second_trainer_on_the_same_folder_fails_with_the_holders_pid(fold_inputs, tmp_path):
    params, prepared = fold_inputs
    out = tmp_path / "folds/0/train"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("earlier output")
    with exclusive_output(out):
        with pytest.raises(OutputLockedError, match=f"PID {os.getpid()}"):
            train_fold(params, 0, prepared, out)
        # another process is refused too (flock is per open file, so this is the real case)
        code = (
            f"from pathlib import Path; from l2rclip.locking import exclusive_output\n"
            f"with exclusive_output(Path({str(out)!r})): pass"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and f"PID {os.getpid()}" in other.stderr
    assert (out / "keep.txt").read_text() == "earlier output"  # the refused runs touched nothing
    train_fold(params, 0, prepared, out)  # released with its holder: the next run goes ahead
    assert json.loads((out / "summary.json").read_text())["best_epoch"] >= 1
