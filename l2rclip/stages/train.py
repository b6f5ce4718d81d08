"""DVC stage `train@fold`: train one fold, keep the best (by validation) and the last checkpoint.

Outputs in `--out` (declared `persist: true` in dvc.yaml, so a killed run resumes):
    best/           model.safetensors + model.json of the best validation epoch
    last/           the last epoch's model, optimiser and scheduler state (for resuming)
    history.csv     one row per epoch: train loss terms, validation metrics (fixed column order)
    summary.json    best epoch and metrics, the backbone actually used (and its recipe), the device
                    it trained on (`l2rclip.runtime.device_report`)
    tracking.json   MLflow ids, so calibrate and evaluate log into the same run
Beside it, not DVC outputs: `<out>_timings.json` (seconds: they differ on every run, so they are
kept out of the files DVC hashes) and `<out>.lock` (held while the stage runs).

A run resumes from `last/` only when it is the same computation (`l2rclip.training.resume.run_identity`:
params, fold, data, package code, library versions); otherwise it starts fresh and says why.

With `train.devices` x `train.nodes` > 1 the stage relaunches itself under torchrun, one process
per device, which together compute what one process with the same `train.batch_size` computes
(`l2rclip.training.distributed`); rank 0 holds the lock and writes every output.

At start the stage prints the device it trains on (resolved device, autocast dtype, torch and CUDA
versions, GPU name) to stdout; the same goes to summary.json and to the fold run's `l2rclip.device.*`
tags.

MLflow (rank 0): the fold's child run under the pipeline's parent run gets the params that ran
(method preset and offline fallback applied; the requested ones as `params/requested.yaml`, and
tag `l2rclip.requested_differs` naming the keys), the train/val splits as dataset inputs, system
metrics while training, per-epoch metrics and `best/...` at the end; the stage then ends the run,
so its duration is the training's (calibrate and evaluate log into it afterwards). A resumed
training continues the run of the killed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from l2rclip.config import Params, load_params, to_dict, to_flat_dict
from l2rclip.data.splits import select
from l2rclip.data.store import open_store
from l2rclip.methods import UNTRAINED, resolve_method
from l2rclip.models.factory import build_model, image_tower_note, resolve_backbone, resolve_image_tower
from l2rclip.models.kinds import backbone_label
from l2rclip.ranks import RankSpace
from l2rclip.runtime import describe_device, device_report, pick_device, seed_everything
from l2rclip.stages.common import read_prepared, run_main, stage_parser, write_json
from l2rclip.tracking.provenance import data_version, pipeline_key, pipeline_run_name, source_tags
from l2rclip.tracking.runs import Tracker
from l2rclip.training.distributed import (
    SINGLE,
    World,
    launch,
    launched,
    main_process_lock,
    process_group,
    worker_device,
    world_size,
)
from l2rclip.training.fit_method import fit_method
from l2rclip.training.loop import FoldData, check_schedule
from l2rclip.training.resume import TrainState, find_state, identity_fingerprint, run_identity
from l2rclip.training.timings import Timings, timings_path

log = logging.getLogger("l2rclip.stages.train")  # not __main__ under python -m


def open_fold_run(
    requested: Params,
    resolved: Params,
    effective: Params,
    fold: int,
    out_dir: Path,
    version: str,
    resuming: bool,
    tags: dict[str, Any],
) -> tuple[Tracker, str | None]:
    """The MLflow child run of this fold under the pipeline's parent run (the same one when resuming).

    `requested`: the params file as read; `resolved`: with the method preset (its flat form is the
    pipeline key every stage recomputes to find the parent run, so it must not change);
    `effective`: what trains (the fallback backbone, its rate and epochs), logged as the params.
    """
    if resuming and (out_dir / "tracking.json").is_file():
        tracker, ids = Tracker.from_handle(out_dir)
        if ids.get("run_id"):
            return tracker, ids["run_id"]
    tracker = Tracker(experiment=resolved.tracking.experiment, enabled=resolved.tracking.enabled)
    flat, wanted = to_flat_dict(effective), to_flat_dict(requested)
    differs = sorted(key for key in flat if wanted.get(key) != flat[key])
    tags = {
        **tags,
        "l2rclip.requested_differs": str(bool(differs)).lower(),
        "l2rclip.requested_differs_keys": ", ".join(differs) or None,
    }
    name = pipeline_run_name(resolved.data.source, version)
    parent = tracker.parent_run(pipeline_key(to_flat_dict(resolved), version), name=name, params=flat, tags=tags)
    run_id = (
        tracker.child_run(parent, f"{name} fold {fold}", flat, {**tags, "l2rclip.fold": fold}) if parent else None
    )
    if run_id:
        for run in (parent, run_id):
            tracker.log_dict(run, to_dict(requested), "params/requested.yaml")
        tracker.write_handle(out_dir, run_id, parent)
    return tracker, run_id


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """The per-epoch history with a fixed column order (epoch, phase, then sorted), resumed or not."""
    frame = pd.DataFrame(history)
    first = [c for c in ("epoch", "phase") if c in frame.columns]
    return frame[first + sorted(c for c in frame.columns if c not in first)]


def check_inputs(params: Params, fold: int, prepared: Path) -> tuple[Params, pd.DataFrame, pd.DataFrame]:
    """The resolved params and the prepared tables, with the fold checked (before anything is written)."""
    params = resolve_method(params)
    world_size(params.train)
    images, splits = read_prepared(prepared)
    folds = sorted(splits["fold"].unique())
    if fold not in folds:
        raise ValueError(f"fold {fold} is not in {prepared / 'splits.csv'}: expected one of {folds}")
    return params, images, splits


def train_fold(
    params: Params, fold: int, prepared: Path, out_dir: Path, store_dir: Path | None = None, world: World = SINGLE
) -> dict[str, Any]:
    """Train fold `fold` from the prepared data into `out_dir`; returns the summary.

    `store_dir` is the preprocess stage's image store (None: decode the image files every epoch).

    Everything that can fail on the inputs (params, prepared data, fold, backbone) is checked
    before `out_dir` is touched, and `out_dir` is locked against a second trainer for the run.
    `world`: this process among torchrun's training processes (rank 0 locks and writes).
    """
    seed_everything(params.seed)
    requested = params
    params, images, splits = check_inputs(params, fold, prepared)
    if not world.is_main:
        logging.getLogger("l2rclip").setLevel(logging.WARNING)  # one log, rank 0's
    device = worker_device(params.train.device, world) if world.distributed else pick_device(params.train.device)
    with process_group(world, device), main_process_lock(out_dir, world):
        return _train_locked(requested, params, fold, images, splits, out_dir, prepared, store_dir, device, world)


def _train_locked(
    requested: Params,
    params: Params,
    fold: int,
    images: pd.DataFrame,
    splits: pd.DataFrame,
    out_dir: Path,
    prepared: Path,
    store_dir: Path | None,
    device: torch.device,
    world: World,
) -> dict[str, Any]:
    version = data_version(prepared)
    backbone, model_config = resolve_backbone(params.model, device=str(device))
    fell_back = model_config != params.model  # the offline fallback replaced the backbone
    model_config = resolve_image_tower(model_config, backbone.kind, str(device), params.train.schedule)
    store = open_store(store_dir, backbone.recipe, params.preprocess.margin)
    rank_space = RankSpace.from_config(params.ranks)
    model = build_model(backbone, rank_space, model_config).to(device)
    meta = {
        "method": model_config.method,
        "backbone": model_config.arch,
        "pretrained": model_config.pretrained,
        "is_clip": backbone.is_clip,
        "backbone_kind": backbone.kind,
        "fold": fold,
        "data_version": version,
    }
    device_info = device_report(device, params.train.amp)
    if world.is_main:
        print(
            f"train fold {fold}: {describe_device(device_info)}; {image_tower_note(params.model, model_config)}",
            flush=True,
        )
    tags = {
        **source_tags("l2rclip.stages.train"),
        "l2rclip.data_version": version,
        "l2rclip.backbone": model_config.arch,
        "l2rclip.backbone_kind": backbone.kind,
        "l2rclip.pipeline_check": str(backbone.kind == "random").lower(),
    }
    if backbone.kind != "clip":
        tags["mlflow.note.content"] = backbone_label(backbone.kind)
    used = params
    if fell_back and backbone.kind == "random":  # learns from scratch: own rate and length
        fallback = params.model.fallback
        used = dataclasses.replace(
            params, train=dataclasses.replace(params.train, lr_image=fallback.lr_image, epochs=fallback.epochs)
        )
    data = FoldData(
        images=images,
        train=select(splits, fold, "train"),
        val=select(splits, fold, "val"),
        root=Path(used.data.root),
        store=store,
    )
    check_schedule(model_config, used.train, used.loss, rank_space)  # before any output is touched
    identity = run_identity(to_flat_dict(used), fold, version)
    state = world.broadcast(_fold_state(out_dir, identity) if world.is_main else None)  # rank 0 decides
    resuming = state is not None
    state = state or TrainState(identity_fingerprint(identity), identity)
    timings, started = Timings.load(timings_path(out_dir), resuming), time.perf_counter()
    timings.start_process()
    effective = dataclasses.replace(used, model=model_config)  # what trains: logged as the run's params
    tracker, run_id = (
        open_fold_run(requested, params, effective, fold, out_dir, version, resuming, tags)
        if world.is_main
        else (Tracker(experiment=params.tracking.experiment, enabled=False), None)
    )
    params = used
    if run_id:  # on resumption too: the run records where it trained last
        tracker.set_tags(run_id, {f"l2rclip.device.{key}": value for key, value in device_info.items()})
    if resuming:  # the killed process may have saved its last epoch without logging it
        tracker.log_missing_epochs(run_id, state.history)
    else:
        tracker.log_datasets(
            run_id,
            {"train": data.train, "val": data.val},
            f"{params.data.source}-fold{fold}",
            version,
            prepared / "splits.csv",
        )
    monitor = (
        tracker.system_metrics(run_id, params.tracking.system_metrics_interval, resume=resuming)
        if params.tracking.system_metrics
        else contextlib.nullcontext()
    )

    def on_epoch(metrics: dict[str, float], epoch: int) -> None:
        if world.is_main:  # after every epoch: a killed process keeps its time
            timings.record(time.perf_counter() - started, epoch, metrics["epoch_seconds"])
            timings.save(timings_path(out_dir))
        tracker.log_metrics(run_id, metrics, step=epoch)

    with monitor:
        result = fit_method(
            model,
            backbone,
            effective,
            rank_space,
            data,
            out_dir,
            params.seed,
            device,
            state,
            meta,
            on_epoch=on_epoch,
            world=world,
        )
        if model_config.method in UNTRAINED:  # no epochs: its validation is logged once here
            tracker.log_metrics(run_id, {k: v for k, v in result.best_metrics.items() if k.startswith("val/")})
    history_frame(result.history).to_csv(out_dir / "history.csv", index=False, float_format="%.6g")
    summary = {
        **meta,
        "best_epoch": result.best_epoch,
        "best": result.best_metrics,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "label": backbone_label(backbone.kind) or None,
        "recipe": backbone.recipe.to_dict(),
        "device": device_info,
    }
    if not world.is_main:
        return summary
    write_json(out_dir / "summary.json", summary)
    timings.record(time.perf_counter() - started)
    timings.save(timings_path(out_dir))
    tracker.log_metrics(
        run_id,
        {
            "train_seconds": timings.seconds,
            "best/epoch": result.best_epoch,
            **{f"best/{k}": v for k, v in result.best_metrics.items()},
        },
    )
    tracker.log_artifact(run_id, out_dir / "history.csv")
    tracker.end_run(run_id)  # the run's duration is the training's; later stages log into it
    log.info(
        "fold %d trained in %.0f s (%.0f s in all processes): best epoch %d, %s",
        fold,
        result.seconds,
        timings.seconds,
        result.best_epoch,
        ", ".join(f"{k} {v:.3f}" for k, v in result.best_metrics.items() if k.startswith("val/mae")),
    )
    return summary


def _fold_state(out_dir: Path, identity: dict[str, Any]) -> TrainState | None:
    """The state to resume, or None after clearing `out_dir` for a fresh run (rank 0 only)."""
    state = find_state(out_dir / "last", identity, aside=out_dir.parent)
    if state is None and out_dir.exists():  # DVC keeps this folder (persist): clear another run's files
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "train",
        "Train one fold: validation-based model selection, best and last checkpoints, "
        "resuming from the last one after an interruption. With train.devices x train.nodes > 1 "
        "it relaunches itself under torchrun (multi-node: run the same command on every node).",
        per_fold=True,
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder of this fold's training")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def entry() -> int | dict[str, Any]:
        params = load_params(args.params)
        if launched():
            return (
                train_fold(params, args.fold, args.prepared, args.out, args.store, World.from_environment()) and 0
            )
        resolved, _, _ = check_inputs(params, args.fold, args.prepared)
        if world_size(resolved.train) > 1 and resolved.model.method not in UNTRAINED:
            return launch(resolved.train, "l2rclip.stages.train", list(sys.argv[1:] if argv is None else argv))
        return train_fold(params, args.fold, args.prepared, args.out, args.store) and 0

    return run_main(entry)


if __name__ == "__main__":
    sys.exit(main())
