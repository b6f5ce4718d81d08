"""DVC stage `register`: register the best fold's model in the MLflow model registry.

The fold is chosen by its best VALIDATION score (`val/<train.select_metric>` in each fold's
`summary.json`; lower is better unless the metric is in `HIGHER_IS_BETTER`), never by its test
score: the test split is for reporting, and choosing on it would make the reported numbers
optimistic. The chosen `best/` model is logged as an l2rclip pyfunc in the FOLD run that trained
it (its `tracking.json`) and that logged model is registered as a new version of
`l2rclip.config.model_name(params)` (`tracking.model_name`, default `l2rclip-<folder name of
data.root>`), so the run, the logged model and the version link to each other (`l2rclip.serving.registry`).
The version's tags identify it: data source and version, a params hash, the fold, its
validation score, the promotion holdout, the conformal method and level, the backbone; the
cross-validated test means are metrics of the pipeline run (the report stage logs them), which
the version's description names. The fold's conformal calibration
(`<fold>/calibrate/calibration.json`, when there) is stored in the model, so predictions and the
served model carry the intervals. It becomes the `champion` only when there is none yet;
replacing a champion is the promotion flow's decision. Both runs get the tag
`l2rclip.registered_model` (`models:/<name>/<version>`).

With `tracking.enabled: false` or `tracking.register: false` (what `pipelines.ablation` sets for
its variants: only the pipeline's own runs register) the stage writes `"registered": false` with
that reason and exits 0: not registering is then the setting, and the stage is done. With both
on, a model that could not be registered is not done: the stage says why (the store's URI and
MLflow's error, e.g. the connection refused) and exits 1 without writing `registered.json`, so
DVC does not record it and a later `dvc repro` (or the retrain flow) runs this stage alone, and
registers, once MLflow is back. Nothing else is lost: the upstream stages' outputs are recorded
as they finished. (DVC's `always_changed: true` would instead rerun the stage, a new model
version, on every `dvc repro`, and `dvc status` would never be clean.) When training could not
reach MLflow, its run handle holds no run: there is no fold run, and the model is logged in the
parent run, found or created now by the same pipeline key in the current store
(`MLFLOW_TRACKING_URI`, else ./mlflow.db).

Output: `<out>/registered.json`.

Expected dvc.yaml entry (after `report`):

    register:
      cmd: python -m l2rclip.stages.register --params params.yaml --out outputs/register
      deps:
        - outputs/report/metrics.json
        - outputs/metrics
        - l2rclip/evaluation/conformal.py
        - l2rclip/stages/register.py
        - l2rclip/serving/registry.py
        - l2rclip/serving/pyfunc.py
        - l2rclip/serving/served_model.py
        - l2rclip/serving/predictor.py
      params:
        - folds
        - data.source
        - data.root
        - data.max_image_pixels
        - train.select_metric
        - tracking
        - serving
      outs:
        - outputs/register/registered.json:
            cache: false

It also reads `outputs/folds/<k>/train/{summary.json,tracking.json,best/}`, which are outputs of
`train@k` upstream of the metrics it depends on (a dependency on the folder `outputs/folds` would
also see DVC's own `.gitignore` files there).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from l2rclip.config import Params, load_params, model_name, to_flat_dict
from l2rclip.data.holdout import holdout_spec
from l2rclip.evaluation.conformal import Calibration
from l2rclip.methods import resolve_method
from l2rclip.metrics import HIGHER_IS_BETTER
from l2rclip.models.checkpoint import read_model_meta
from l2rclip.serving.pyfunc import RequestLimits
from l2rclip.serving.registry import HOLDOUT_SPEC_TAG, register
from l2rclip.stages.calibrate import read_calibration
from l2rclip.stages.common import run_main, stage_parser, write_json
from l2rclip.tracking.provenance import fingerprint, pipeline_key, pipeline_run_name, source_tags
from l2rclip.tracking.runs import HANDLE_FILE, Tracker

log = logging.getLogger("l2rclip.stages.register")  # not __main__ under python -m


class RegistrationError(RuntimeError):
    """Tracking is on but the model could not be registered (MLflow unreachable or failing)."""


def choose_fold(params: Params, folds_dir: Path) -> tuple[int, float | None, dict[str, Any]]:
    """The fold with the best validation score; returns (fold, score, its summary).

    Folds without the score (no validation split) are skipped; when none has it, the first fold
    is chosen and the score is None.

    Raises:
        FileNotFoundError: a fold's `summary.json` is missing.
    """
    metric = params.train.select_metric
    key, sign = f"val/{metric}", (1.0 if metric in HIGHER_IS_BETTER else -1.0)
    summaries, scored = {}, []
    for fold in params.folds:
        path = folds_dir / str(fold) / "train" / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"expected the train stage's summary of fold {fold} at {path}; run `dvc repro train@{fold}` first"
            )
        summaries[fold] = json.loads(path.read_text(encoding="utf-8"))
        score = (summaries[fold].get("best") or {}).get(key)
        if isinstance(score, (int, float)) and math.isfinite(score):
            scored.append((sign * score, -params.folds.index(fold), fold, float(score)))
        else:
            log.warning(
                "%s has no finite %s in `best` (no validation split?); fold %d not considered", path, key, fold
            )
    if not scored:
        fold = params.folds[0]
        log.warning("no fold has a validation %s: registering fold %d, the first", key, fold)
        return fold, None, summaries[fold]
    _, _, fold, score = max(scored)  # ties: the earlier fold in params.folds
    return fold, score, summaries[fold]


def fold_calibration(folds_dir: Path, fold: int) -> Calibration | None:
    """The fold's conformal calibration (calibrate stage), None when it has none or never ran."""
    path = folds_dir / str(fold) / "calibrate" / "calibration.json"
    if not path.is_file():
        log.warning("no calibration at %s: the model is registered without intervals", path)
        return None
    return read_calibration(path)


def register_best(params: Params, folds_dir: Path, report_file: Path, out_dir: Path) -> dict[str, Any]:
    """Choose the fold, register its best model, and write `registered.json`; returns its content."""
    fold, score, summary = choose_fold(params, folds_dir)
    metric = params.train.select_metric
    model_dir = folds_dir / str(fold) / "train" / "best"
    if not report_file.is_file():  # the report logs the CV test means on the pipeline run the version names
        raise FileNotFoundError(f"expected the report stage's metrics at {report_file}; run `dvc repro report`")
    name = model_name(params)
    result: dict[str, Any] = {
        "name": name,
        "fold": fold,
        "select_metric": metric,
        f"val/{metric}": score,
        "model_dir": model_dir.as_posix(),
        "registered": False,
    }
    tags = {
        "l2rclip.source": params.data.source,
        "l2rclip.data_version": summary.get("data_version"),
        "l2rclip.params_hash": fingerprint(params),
        "l2rclip.fold": fold,
        "l2rclip.select_metric": metric,
        f"l2rclip.val/{metric}": score,
        HOLDOUT_SPEC_TAG: holdout_spec(params.split.holdout_fraction, params.split.holdout_salt),
    }
    limits = RequestLimits(params.serving.max_rows, params.serving.max_request_bytes, params.data.max_image_pixels)
    read_model_meta(model_dir)  # a broken model folder is a local error, not MLflow's
    calibration = fold_calibration(folds_dir, fold)
    if calibration is not None:
        tags.update(
            {"l2rclip.conformal_method": calibration.method, "l2rclip.conformal_level": 1 - calibration.alpha[0]}
        )
    result["calibrated"] = calibration is not None
    if not params.tracking.enabled:
        result["reason"] = "tracking.enabled is false"
    elif not params.tracking.register:
        result["reason"] = (
            "tracking.register is false (an ablation variant, or set by hand): trained, evaluated "
            "and reported, but no model version"
        )
    else:
        tracker, run_id, parent = training_run(params, model_dir.parent, summary.get("data_version"))
        try:
            result.update(
                register(
                    model_dir,
                    name,
                    run_id,
                    tags,
                    tracker.tracking_uri,
                    limits=limits,
                    calibration=calibration.to_dict() if calibration else None,
                ),
                registered=True,
            )
        except Exception as error:  # noqa: BLE001 - any MLflow failure: say which store and why
            raise RegistrationError(
                f"MLflow failed on {tracker.tracking_uri}: {type(error).__name__}: {error}"
            ) from error
        for run in {run_id, parent}:
            tracker.set_tags(run, {"l2rclip.registered_model": result["model_uri"]})
    write_json(out_dir / "registered.json", result)
    log.info(
        "fold %d (val/%s %s): %s",
        fold,
        metric,
        score,
        result["model_uri"] if result["registered"] else f"not registered: {result['reason']}",
    )
    return result


def training_run(params: Params, train_dir: Path, version: str | None) -> tuple[Tracker, str, str]:
    """The tracker, the run that trained the fold's model, and its pipeline parent run.

    The fold run named by the fold's run handle when training was tracked: the model is logged
    there, beside the training it came from. Otherwise (training could not reach MLflow, so the
    handle is missing or holds no run) there is no fold run to log into: the model goes to the
    parent run with this pipeline's key in the current store, created if there is none (as the
    train stage does), which is then both runs returned (and is ended once the model is logged).

    Raises:
        RegistrationError: the store cannot be used; the message names it and MLflow's error.
    """
    handle = train_dir / HANDLE_FILE
    if handle.is_file():
        tracker, ids = Tracker.from_handle(train_dir)
        if ids.get("run_id") and tracker.enabled:
            return tracker, ids["run_id"], ids.get("parent_run_id") or ids["run_id"]
        if ids.get("run_id"):
            raise RegistrationError(
                f"the training's MLflow run {ids['run_id']} (in {handle}) cannot be reached: {tracker.failure}"
            )
    tracker = Tracker(experiment=params.tracking.experiment)
    flat = to_flat_dict(resolve_method(params))
    name = pipeline_run_name(params.data.source, version or "")
    tags = {**source_tags("l2rclip.stages.register"), "l2rclip.data_version": version}
    parent = tracker.parent_run(pipeline_key(flat, version), name=name, params=flat, tags=tags)
    if parent is None:
        raise RegistrationError(tracker.failure or f"MLflow at {tracker.tracking_uri} gave no parent run")
    log.warning(
        "training was not tracked (%s holds no MLflow run): the model is logged in parent run %s in %s",
        handle,
        parent,
        tracker.tracking_uri,
    )
    return tracker, parent, parent


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "register",
        "Log the model of the fold with the best validation score in that fold's MLflow run and register it "
        "(champion when there is none yet); with tracking.enabled or tracking.register false, record why not "
        "and exit 0.",
    )
    parser.add_argument(
        "--folds-dir",
        type=Path,
        default=Path("outputs/folds"),
        help="folder of the per-fold training outputs (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("outputs/report/metrics.json"),
        help="the report stage's metrics: registration comes after the report, which logs "
        "the CV test means on the pipeline run (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/register"),
        help="output folder for registered.json (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    return run_main(lambda: _register_or_explain(load_params(args.params), args.folds_dir, args.report, args.out))


def _register_or_explain(params: Params, folds_dir: Path, report_file: Path, out_dir: Path) -> int:
    """Run `register_best`; a registration MLflow refused is one message and exit 1 (the stage is not done)."""
    try:
        register_best(params, folds_dir, report_file, out_dir)
    except RegistrationError as error:
        print(
            f"error: the model was NOT registered: {error}\n"
            f"Nothing else is lost: the other stages' outputs are kept. This stage fails so that DVC does not "
            f"record it as done; once MLflow is reachable, `dvc repro` (or the retrain flow) runs it again "
            f"and registers.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
