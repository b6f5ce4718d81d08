"""DVC stage `evaluate@fold`: the best model of a fold on its test split, never seen before.

Outputs:
    <out>/predictions.csv       one row per test image: truth, both prediction rules, std,
                                entropy, confidence, per-rank probabilities
    <out>/figures/*.png         confusion matrix, error by rank, predicted vs true, prototype
                                similarity, calibration; conformal_<level> with --calibration
    <metrics>                   `test/...` metrics (JSON, a DVC metric), plus the MAE of always
                                predicting the training median, the baseline every model must beat;
                                MAEs in value units (`test/mae`) and rank-index units
                                (`test/mae_index`), ordinality in our and OrdinalCLIP's definition
MLflow: the metrics, predictions and figures go to the fold's run (from the train stage's
tracking.json) with the test split as a dataset input; the run stays as the train stage ended it,
so its duration is the training's.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from l2rclip.config import Params, load_params
from l2rclip.data.splits import select
from l2rclip.data.store import open_store
from l2rclip.evaluation.conformal import evaluate_intervals, level_name
from l2rclip.evaluation.plots import conformal_plot, evaluation_plots
from l2rclip.evaluation.predictions import predictions_table, split_outputs
from l2rclip.metrics import clap_epsilon_error, ordinal_metrics, prefix_metrics, prototype_ordinality_metrics
from l2rclip.models.checkpoint import load_model
from l2rclip.models.kinds import backbone_label, kind_of
from l2rclip.runtime import pick_device, seed_everything
from l2rclip.stages.calibrate import read_calibration
from l2rclip.stages.common import read_prepared, run_main, stage_parser, write_json
from l2rclip.tracking.provenance import data_version
from l2rclip.tracking.runs import Tracker
from l2rclip.training.features import read_feature_cache, rows_of

log = logging.getLogger("l2rclip.stages.evaluate")  # not __main__ under python -m


def median_baseline_mae(train_values: np.ndarray, test_values: np.ndarray) -> float:
    """MAE of always predicting the median training value: the floor any model must beat."""
    return float(np.abs(test_values - np.median(train_values)).mean())


def evaluate_fold(
    params: Params,
    fold: int,
    prepared: Path,
    model_dir: Path,
    out_dir: Path,
    metrics_file: Path,
    calibration_file: Path | None = None,
    store_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate `model_dir` on fold `fold`'s test split; returns the metrics written.

    Images come from the preprocess stage's store at `store_dir` (None: from the image files).
    With `calibration_file` (the calibrate stage's output) the conformal intervals are evaluated
    too: coverage and width per method and level, overall (metrics) and per rank (`conformal_by_rank`
    in the metrics file, and a figure per level); predictions.csv gets the served intervals.
    """
    seed_everything(params.seed)
    calibration = read_calibration(calibration_file) if calibration_file else None
    images, splits = read_prepared(prepared)
    test, train = select(splits, fold, "test"), select(splits, fold, "train")
    if test.empty:
        raise ValueError(f"fold {fold} has an empty test split in {prepared / 'splits.csv'}")
    device = pick_device(params.train.device)
    model, meta = load_model(model_dir, device=device)
    rank_space = meta["rank_space"]
    cached = model.cache_prototypes()  # (M, E) once for the whole test set; None for ordinal heads
    prototypes = None if cached is None else cached.cpu().numpy()
    store = open_store(store_dir, meta["recipe"], params.preprocess.margin)
    cached_features = read_feature_cache(  # (N_all, E) from a frozen tower's cache, or None: encode the images
        model, images, params.data.root, meta["preprocess"], params.train.feature_cache, store
    )
    features = None if cached_features is None else rows_of(cached_features, images, test)  # (N, E)
    probs, point = split_outputs(
        model, meta["preprocess"], test, params, device, store, features, f"evaluating fold {fold}"
    )  # (N, M), (N,) or None
    predictions = predictions_table(test, probs, rank_space, calibration=calibration, point=point)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out_dir / "predictions.csv", index=False, float_format="%.6g")

    metrics = ordinal_metrics(
        probs, test["rank"].to_numpy(), rank_space.value_array, params.eval.cs_theta, params.eval.ece_bins, point
    )
    if prototypes is not None:
        metrics.update(prototype_ordinality_metrics(prototypes))
    metrics["mae_median_baseline"] = median_baseline_mae(train["value"].to_numpy(), test["value"].to_numpy())
    metrics["mae_median_baseline_index"] = median_baseline_mae(train["rank"].to_numpy(), test["rank"].to_numpy())
    metrics["n_images"] = float(len(test))
    if "stdv" in test.columns and test["stdv"].notna().any():  # CLAP2015: the challenge's own score
        metrics["clap_epsilon"] = clap_epsilon_error(
            predictions["expected_value"].to_numpy(), test["value"].to_numpy(), test["stdv"].to_numpy()
        )
    by_rank: dict[str, Any] = {}
    if calibration is not None:
        interval_metrics, by_rank = evaluate_intervals(
            calibration, probs, test["rank"].to_numpy(), rank_space.value_array
        )
        metrics.update(interval_metrics, n_calib=float(calibration.n))
    result = {
        **prefix_metrics(metrics, "test"),
        "fold": fold,
        "method": meta.get("method", "l2rclip"),
        "backbone": meta["backbone"],
        "is_clip": meta["is_clip"],
        "backbone_kind": kind_of(meta),
        "best_epoch": meta["epoch"],
        "prediction_rule": "threshold" if point is not None else "argmax+expectation",
    }
    if by_rank:
        result["conformal_by_rank"] = by_rank
    write_json(metrics_file, result)
    suffix = backbone_label(meta)
    figures = evaluation_plots(
        predictions, prototypes, rank_space, out_dir / "figures", title_suffix=suffix, unit=params.ranks.unit
    )
    for alpha in calibration.alpha if calibration is not None else ():
        level = level_name(alpha)
        figures[f"conformal_{level}"] = conformal_plot(
            {m: by_rank[f"{m}_{level}"] for m in (calibration.scores if calibration is not None else ())},
            alpha,
            rank_space,
            out_dir / "figures" / f"conformal_{level}.png",
            title_suffix=suffix,
            unit=params.ranks.unit,
        )

    tracker, ids = Tracker.from_handle(model_dir.parent)
    run_id = ids.get("run_id")
    tracker.log_metrics(run_id, prefix_metrics(metrics, "test"))
    tracker.log_datasets(
        run_id, {"test": test}, f"{params.data.source}-fold{fold}", data_version(prepared), prepared / "splits.csv"
    )
    tracker.log_artifact(run_id, out_dir / "predictions.csv", "evaluate")
    for path in figures.values():
        tracker.log_artifact(run_id, path, "evaluate/figures")
    log.info(
        "fold %d test: MAE %.3f (median baseline %.3f), accuracy %.3f",
        fold,
        metrics["mae"],
        metrics["mae_median_baseline"],
        metrics["accuracy"],
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "evaluate",
        "Evaluate a fold's best model on that fold's test split: predictions, metrics "
        "(both prediction rules) and figures.",
        per_fold=True,
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder (the train stage's best/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for predictions.csv and figures/")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file for the test metrics")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="the calibrate stage's calibration.json: also evaluate conformal intervals",
    )
    args = parser.parse_args(argv)
    return run_main(
        lambda: (
            evaluate_fold(
                load_params(args.params),
                args.fold,
                args.prepared,
                args.model,
                args.out,
                args.metrics,
                args.calibration,
                args.store,
            )
            and 0
        )
    )


if __name__ == "__main__":
    sys.exit(main())
