"""DVC stage `calibrate@fold`: split conformal calibration of a fold's best model on its `calib` split.

Between train and evaluate. The calibration split (split.calib_fraction) was carved from the
fold's training part and never seen by training or model selection, so its scores are
exchangeable with the test split's: the condition of the conformal guarantee (l2rclip.evaluation.conformal).
With conformal.temperature a softmax temperature is fitted first on the validation split (not on
the calibration split, which would make its scores depend on themselves); the expected
calibration error (ECE) on the calibration split before and after tempering is recorded.

Output: `<out>` (calibration.json), the `Calibration` (sorted scores of both methods, the served
method, the levels, the temperature and the thresholds) plus `fold`, `calibrated` and the ECE;
`calibrated: false` and the reason when the fold has no calibration split (calib_fraction 0).
The ECE and the calibration file also go to the fold's MLflow run (ended by the train stage, so
its end time, and with it its duration, stays the training's).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from l2rclip.config import ConfigError, Params, load_params
from l2rclip.data.splits import CALIB, select
from l2rclip.data.store import open_store
from l2rclip.evaluation.conformal import Calibration, check_alpha, fit_temperature, temper
from l2rclip.evaluation.predictions import split_outputs
from l2rclip.metrics import expected_calibration_error
from l2rclip.models.checkpoint import load_model
from l2rclip.runtime import pick_device, seed_everything
from l2rclip.stages.common import read_prepared, run_main, stage_parser, write_json
from l2rclip.tracking.provenance import data_version
from l2rclip.tracking.runs import Tracker
from l2rclip.training.features import read_feature_cache, rows_of

log = logging.getLogger("l2rclip.stages.calibrate")  # not __main__ under python -m


def read_calibration(path: Path) -> Calibration | None:
    """The calibration a calibrate stage wrote, or None when the fold had no calibration split."""
    if not path.is_file():
        raise FileNotFoundError(f"expected the calibrate stage's output at {path}; run `dvc repro calibrate`")
    data = json.loads(path.read_text(encoding="utf-8"))
    return Calibration.from_dict(data, where=str(path)) if data.get("calibrated") else None


def _ece(probs: np.ndarray, ranks: np.ndarray, n_bins: int) -> float:
    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == ranks, n_bins)


def calibrate_fold(
    params: Params, fold: int, prepared: Path, model_dir: Path, out_file: Path, store_dir: Path | None = None
) -> dict[str, Any]:
    """Calibrate `model_dir` on fold `fold`'s calibration split; returns what was written.

    Images come from the preprocess stage's store at `store_dir` (None: from the image files).
    """
    seed_everything(params.seed)
    config = params.conformal
    if not config.alpha:
        raise ConfigError("conformal.alpha: expected a list of at least one level, e.g. [0.1], found []")
    for i, alpha in enumerate(config.alpha):
        check_alpha(alpha, where=f"conformal.alpha[{i}]")
    if config.temperature and params.split.val_fraction == 0:
        raise ConfigError(
            "conformal.temperature is true but split.val_fraction is 0: the temperature is "
            "fitted on the validation split; set a val_fraction or temperature: false"
        )
    _, splits = read_prepared(prepared)
    in_fold = splits[splits["fold"] == fold]
    if in_fold.empty:
        raise ValueError(
            f"fold {fold} is not in {prepared / 'splits.csv'}: expected one of "
            f"{sorted(splits['fold'].unique().tolist())}"
        )
    result: dict[str, Any]
    if not (in_fold["split"] == CALIB).any():
        result = {
            "fold": fold,
            "calibrated": False,
            "reason": f"fold {fold} has no {CALIB} split (split.calib_fraction is 0): no intervals",
        }
        write_json(out_file, result)
        log.warning("%s", result["reason"])
        return result
    calib = select(splits, fold, CALIB)
    device = pick_device(params.train.device)
    model, meta = load_model(model_dir, device=device)
    rank_space = meta["rank_space"]
    store = open_store(store_dir, meta["recipe"], params.preprocess.margin)
    images = read_prepared(prepared)[0]
    cached = read_feature_cache(  # (N_all, E) from a frozen tower's cache, or None: encode the images
        model, images, params.data.root, meta["preprocess"], params.train.feature_cache, store
    )

    def outputs(split: pd.DataFrame, name: str) -> np.ndarray:
        features = None if cached is None else rows_of(cached, images, split)  # (n, E)
        return split_outputs(
            model, meta["preprocess"], split, params, device, store, features, f"{name} fold {fold}"
        )[0]  # (n, M)

    probs = outputs(calib, "calibrating")
    ranks = calib["rank"].to_numpy()
    temperature = None
    if config.temperature:
        val = select(splits, fold, "val")
        temperature = fit_temperature(outputs(val, "temperature on val"), val["rank"].to_numpy())
    calibration = Calibration.fit(probs, ranks, rank_space.value_array, config.method, config.alpha, temperature)
    result = {
        **calibration.to_dict(),
        "fold": fold,
        "calibrated": True,
        "calib/ece": _ece(probs, ranks, params.eval.ece_bins),
        "calib/ece_tempered": _ece(temper(probs, temperature), ranks, params.eval.ece_bins),
    }
    write_json(out_file, result)
    tracker, ids = Tracker.from_handle(model_dir.parent)  # the fold's MLflow run, ended by the train stage
    if run_id := ids.get("run_id"):
        tracker.log_metrics(
            run_id,
            {
                "calib/n_images": float(calibration.n),
                "calib/ece": result["calib/ece"],
                "calib/ece_tempered": result["calib/ece_tempered"],
                **({"calib/temperature": temperature} if temperature else {}),
            },
        )
        tracker.log_datasets(
            run_id,
            {CALIB: calib},
            f"{params.data.source}-fold{fold}",
            data_version(prepared),
            prepared / "splits.csv",
        )
        tracker.log_artifact(run_id, out_file, "calibrate")
    log.info(
        "fold %d calibrated on %d images (temperature %s): %s",
        fold,
        calibration.n,
        temperature,
        ", ".join(
            f"{m} q{level} {q:.3f}" for m, levels in result["thresholds"].items() for level, q in levels.items()
        ),
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "calibrate",
        "Split conformal calibration of a fold's best model on the fold's calibration split "
        "(optionally after temperature scaling on validation).",
        per_fold=True,
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder (the train stage's best/)")
    parser.add_argument("--out", type=Path, required=True, help="calibration JSON file to write")
    args = parser.parse_args(argv)
    return run_main(
        lambda: (
            calibrate_fold(load_params(args.params), args.fold, args.prepared, args.model, args.out, args.store)
            and 0
        )
    )


if __name__ == "__main__":
    sys.exit(main())
