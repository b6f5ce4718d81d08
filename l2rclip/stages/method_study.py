"""The method study (issue 20): every method of the harness on a shifted demo task, by shots and under label shift.

`make methods` runs `dvc repro studies/methods/dvc.yaml`, a pipeline of its own (the root `dvc repro`
never runs it), whose stages call the subcommands here:

    data     draw the study set with the demo generator: a labelled pool in a narrow style (circles
             in red-to-yellow hues, sizes that fall with the count, as in the demo set) and test images
             in every style (all kinds, all hues, sizes free of the count), listed with their split
             in labels.csv for the `csv` source; the project's `prepare` stage then validates it
    run      one setting (all data, k shots per rank, label shift): every method x seed in this one
             process, through the project's own training (`training.fit_method`) on the frozen image
             tower's cached features; writes one JSON of test metrics (and prototypes) per setting
    report   the table (markdown), the figures and a summary JSON from every setting's results
             (`l2rclip.evaluation.method_table`)

Protocol, per setting and seed: `make_splits` (protocol `given`) carves validation from the pool
(`split.val_fraction`, group-disjoint) and thins the rest with `split.few_shot` or
`split.shift_keep`; the seed draws the shots, the validation images and the initialisation. Model
selection reads validation only: with k shots per rank validation is thinned to k images per rank
too, so selection never sees more labelled images than the shots allow (a labelled budget of 2k
per rank). Test images (another style) are never seen before the selected model is scored.

The study's settings live in `studies/methods/study.yaml` (`MethodStudy`); the harness's own
settings (backbone, learning rates, losses) in the study's params.yaml, read by `load_params`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from annotated_types import Interval
from pydantic import Strict

from l2rclip.config import Params, from_dict, load_params, read_yaml
from l2rclip.config.fields import SECTION, Count, NonNegativeInt, Str
from l2rclip.data.demo import DemoStyle, generate_demo
from l2rclip.data.splits import make_splits, select
from l2rclip.evaluation.method_table import write_report
from l2rclip.evaluation.predictions import predict_outputs, split_outputs
from l2rclip.methods import resolve_method
from l2rclip.metrics import ordinal_metrics, prefix_metrics, prototype_ordinality
from l2rclip.models.checkpoint import load_model
from l2rclip.models.factory import build_model, resolve_backbone
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.kinds import backbone_label, least_clip
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.ranks import RankSpace
from l2rclip.runtime import seed_everything
from l2rclip.stages.common import read_prepared, run_main, write_json
from l2rclip.training.features import cached_image_features, rows_of
from l2rclip.training.fit_method import fit_method
from l2rclip.training.loop import FoldData, check_schedule
from l2rclip.training.resume import TrainState

log = logging.getLogger("l2rclip.stages.method_study")

# The study's method names: model.method, plus the two-stage schedule of L2RCLIP as its own entry
# (stage 1 learns prompts on cached features, stage 2 trains the image tower: it cannot stay frozen).
STUDY_METHODS: dict[str, dict[str, Any]] = {  # values: ModelConfig/TrainConfig literals
    "zero_shot": {"method": "zero_shot"},
    "linear_probe": {"method": "linear_probe"},
    "coop": {"method": "coop"},
    "ordinalclip": {"method": "ordinalclip"},
    "l2rclip": {"method": "l2rclip"},
    "l2rclip_two_stage": {"method": "l2rclip", "schedule": "two_stage", "image_tower": "train"},
    "coral": {"method": "coral"},
    "corn": {"method": "corn"},
}
METHOD_NAMES = {
    "zero_shot": "zero-shot",
    "linear_probe": "linear probe",
    "coop": "CoOp",
    "ordinalclip": "OrdinalCLIP",
    "l2rclip": "L2RCLIP (one-stage)",
    "l2rclip_two_stage": "L2RCLIP (two-stage)",
    "coral": "CORAL",
    "corn": "CORN",
}
VAL_STREAM = 0x56414C  # the generator stream that thins validation to the shots ("VAL")


@dataclass(frozen=True)
class StudySetting:
    """One training regime: all of the pool, k shots per rank, or a label shift (split overrides)."""

    __pydantic_config__ = SECTION

    epochs: Count
    """Training epochs (one-stage; stage 1 of two-stage). Few shots make short epochs: give them more."""
    few_shot: Count | None = None
    """k training images per rank (`split.few_shot`); validation is thinned to k per rank too."""
    shift_keep: Annotated[float, Strict(), Interval(gt=0, le=1)] | None = None
    """Label shift (`split.shift_keep`): keep this share of the `shift_ranks` most frequent ranks."""
    shift_ranks: Count | None = None
    """How many ranks `shift_keep` thins (`split.shift_ranks`; ties go to the lower ranks)."""


@dataclass(frozen=True)
class StudyData:
    """The study set: a labelled pool in one style, test images in another (`DemoStyle` as a mapping)."""

    __pydantic_config__ = SECTION

    seed: NonNegativeInt = 20
    """Demo generator seed of the pool; the test images use seed + 1 (the demo set uses `seed`: 0)."""
    pool_per_rank: Count = 40
    """Labelled images per count in the pool (train and validation are drawn from it)."""
    test_per_rank: Count = 50
    """Test images per count."""
    image_size: Count = 96
    """Side of the drawn images, pixels."""
    pool_style: dict[str, Any] = field(default_factory=dict)
    """`DemoStyle` of the pool (kinds, hues, sizes); empty: the demo set's own style."""
    test_style: dict[str, Any] = field(default_factory=dict)
    """`DemoStyle` of the test images."""


@dataclass(frozen=True)
class MethodStudy:
    """studies/methods/study.yaml: what the study runs."""

    __pydantic_config__ = SECTION

    methods: tuple[Str, ...]
    """Study method names (STUDY_METHODS), in table order."""
    seeds: tuple[NonNegativeInt, ...]
    """Seeds per method and setting: the shots, the validation images and the initialisation."""
    settings: dict[str, StudySetting]
    """Name -> setting, in table order."""
    data: StudyData = field(default_factory=StudyData)
    stage2_epochs: Count = 3
    """Stage-2 epochs of l2rclip_two_stage (the image tower trains: the costly part on a CPU)."""
    qualitative: tuple[Str, ...] = ("ordinalclip", "l2rclip")
    """Methods whose prototypes (before and after training) are kept for the similarity figure."""


def load_study(path: Path) -> MethodStudy:
    """Read and check the study file; errors name the file and the key."""
    study = from_dict(MethodStudy, read_yaml(path), prefix=f"{path}: ")
    unknown = [m for m in study.methods + study.qualitative if m not in STUDY_METHODS]
    if unknown:
        raise ValueError(f"{path}: unknown method(s) {unknown}; expected names from {', '.join(STUDY_METHODS)}")
    for name, setting in study.settings.items():
        if setting.few_shot is not None and setting.shift_keep is not None:
            raise ValueError(f"{path}: settings.{name} sets both few_shot and shift_keep; choose one")
    if not study.seeds or not study.settings or not study.methods:
        raise ValueError(f"{path}: expected at least one method, seed and setting")
    for key in ("pool_style", "test_style"):
        DemoStyle.from_dict(getattr(study.data, key))  # raises naming the bad key or value
    return study


# --- data ----------------------------------------------------------------------------------------


def draw_study_set(data: StudyData, root: Path) -> pd.DataFrame:
    """Write the pool (`pool/`) and test (`test/`) demo sets under `root` and `labels.csv` listing both.

    `labels.csv`: path, label, group (`pool-g0000`: a group's images share a background and stay on
    one side of the validation split), split (`train` for the pool, `test`). Returns that table.
    """
    parts = []
    for name, split, seed, per_rank, style in (
        ("pool", "train", data.seed, data.pool_per_rank, data.pool_style),
        ("test", "test", data.seed + 1, data.test_per_rank, data.test_style),
    ):
        table = generate_demo(root / name, per_rank, data.image_size, seed, DemoStyle.from_dict(style))
        parts.append(table.assign(path=name + "/" + table["path"], group=name + "-" + table["group"], split=split))
    listed = pd.concat(parts, ignore_index=True)
    listed.to_csv(root / "labels.csv", index=False, lineterminator="\n")
    log.info("study set: %d pool and %d test images in %s", *(len(p) for p in parts), root)
    return listed


# --- one setting -----------------------------------------------------------------------------------


def run_params(base: Params, method: str, setting: StudySetting, seed: int, stage2_epochs: int) -> Params:
    """The params of one run: the study's base params with the method, the setting's split and the seed."""
    spec = STUDY_METHODS[method]
    two_stage = spec.get("schedule") == "two_stage"
    params = dataclasses.replace(
        base,
        seed=seed,
        split=dataclasses.replace(
            base.split, few_shot=setting.few_shot, shift_keep=setting.shift_keep, shift_ranks=setting.shift_ranks
        ),
        model=dataclasses.replace(
            base.model, method=spec["method"], image_tower=spec.get("image_tower", base.model.image_tower)
        ),
        train=dataclasses.replace(
            base.train,
            schedule=spec.get("schedule", "one_stage"),
            epochs=stage2_epochs if two_stage else setting.epochs,
            stage1_epochs=setting.epochs,
        ),
    )
    return resolve_method(params)


def thin_validation(val: pd.DataFrame, per_rank: int, seed: int) -> pd.DataFrame:
    """At most `per_rank` validation images per rank, drawn with the seed: selection within the shots' budget."""
    rng = np.random.default_rng([seed, VAL_STREAM])
    ranks = val["rank"].to_numpy()
    kept = [
        rng.choice(np.flatnonzero(ranks == rank), size=min(per_rank, int((ranks == rank).sum())), replace=False)
        for rank in np.unique(ranks)
    ]
    return val.iloc[np.sort(np.concatenate(kept))].reset_index(drop=True)


def run_one(
    base: Params,
    study: MethodStudy,
    setting_name: str,
    method: str,
    seed: int,
    images: pd.DataFrame,
    work: Path,
) -> dict[str, Any]:
    """Train and score one method with one seed in one setting; returns its record (test metrics etc.)."""
    setting = study.settings[setting_name]
    params = run_params(base, method, setting, seed, study.stage2_epochs)
    seed_everything(seed)
    rank_space = RankSpace.from_config(params.ranks)
    splits = make_splits(images, params.split, seed, rank_space)
    train, val, test = (select(splits, 0, name) for name in ("train", "val", "test"))
    if setting.few_shot is not None:
        val = thin_validation(val, setting.few_shot, seed)
    device = torch.device("cpu")
    backbone, model_config = resolve_backbone(params.model)  # fresh weights: two-stage trains the tower
    model = build_model(backbone, rank_space, model_config)
    before = model.compute_prototypes().detach().numpy() if isinstance(model, L2RCLIP) else None  # (M, E)
    data = FoldData(images=images, train=train, val=val, root=Path(params.data.root))
    out = work / f"{setting_name}-{method}-{seed}"
    meta = {"method": model_config.method, "backbone_kind": backbone.kind}
    start = time.perf_counter()
    check_schedule(model_config, params.train, params.loss, rank_space)
    result = fit_method(
        model,
        backbone,
        dataclasses.replace(params, model=model_config),
        rank_space,
        data,
        out,
        seed,
        device,
        TrainState(fingerprint=out.name),
        meta,
    )
    best, best_meta = load_model(out / "best", device)
    probs, point = _test_outputs(best, best_meta, test, images, params, device)
    metrics = ordinal_metrics(
        probs, test["rank"].to_numpy(), rank_space.value_array, params.eval.cs_theta, params.eval.ece_bins, point
    )
    record: dict[str, Any] = {
        "setting": setting_name,
        "method": method,
        "seed": seed,
        **prefix_metrics(metrics, "test"),
        **{k: v for k, v in result.best_metrics.items() if k.startswith("val/")},
        "best_epoch": result.best_epoch,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "seconds": round(time.perf_counter() - start, 2),
        "backbone_kind": backbone.kind,
    }
    if before is not None and isinstance(best, L2RCLIP):
        after = best.cache_prototypes().numpy()  # (M, E)
        record["ordinality_before"] = prototype_ordinality(before)
        record["ordinality_after"] = prototype_ordinality(after)
        if method in study.qualitative:
            record["prototypes"] = {"before": before.tolist(), "after": after.tolist()}
    shutil.rmtree(out)  # checkpoints of a run are not kept: the record is the result
    log.info(
        "%s %s seed %d: test accuracy %.3f, MAE %.3f (%.1f s)",
        setting_name,
        method,
        seed,
        metrics["accuracy"],
        metrics["mae"],
        record["seconds"],
    )
    return record


def _test_outputs(
    model: L2RCLIP | OrdinalHeadModel,
    meta: dict[str, Any],
    test: pd.DataFrame,
    images: pd.DataFrame,
    params: Params,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Test probabilities: from the cached features while the image tower is the frozen one, else from images."""
    if params.model.image_tower == "train":
        return split_outputs(model, meta["preprocess"], test, params, device)
    features = cached_image_features(
        model,
        images,
        params.data.root,
        meta["preprocess"],
        params.train.feature_cache,
        device,
        params.train.eval_batch_size,
        params.train.num_workers,
    )  # (N_all, E): the file fit wrote (same tower weights, same key)
    test_features = rows_of(features, images, test)  # (N_test, E)
    batches = ({"image_features": chunk} for chunk in test_features.split(params.train.eval_batch_size))
    return predict_outputs(model, batches, device, params.train.amp)


def run_setting(
    base: Params, study: MethodStudy, setting: str, prepared: Path, out_file: Path, methods: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Every method (or `methods`) x seed of one setting, in this process; writes and returns the records."""
    if setting not in study.settings:
        raise ValueError(f"setting {setting!r} is not in the study: expected one of {', '.join(study.settings)}")
    images, _ = read_prepared(prepared)
    chosen = list(methods) or list(study.methods)
    records = []
    with tempfile.TemporaryDirectory(prefix="method-study-") as work:
        for method in chosen:
            for seed in study.seeds:
                records.append(run_one(base, study, setting, method, seed, images, Path(work)))
    spec = study.settings[setting]
    write_json(
        out_file,
        {
            "setting": setting,
            "spec": {"few_shot": spec.few_shot, "shift_keep": spec.shift_keep, "shift_ranks": spec.shift_ranks},
            "ranks": RankSpace.from_config(base.ranks).to_dict(),
            "label": backbone_label(least_clip(record["backbone_kind"] for record in records)),
            "records": records,
        },
    )
    return records


# --- command line ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the study's stages (see `--help`)."""
    parser = argparse.ArgumentParser(
        prog="python -m l2rclip.stages.method_study",
        description="The method study (studies/methods/dvc.yaml): draw the set, run a setting, report.",
    )
    parser.add_argument("--study", type=Path, default=Path("study.yaml"), help="study file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="draw the study set (pool and test images, labels.csv)")
    data.add_argument("--out", type=Path, required=True, help="folder of the study set")
    run = commands.add_parser("run", help="every method x seed of one setting")
    run.add_argument("--params", type=Path, default=Path("params.yaml"), help="the harness's params file")
    run.add_argument("--setting", required=True, help="a setting of the study file")
    run.add_argument("--prepared", type=Path, required=True, help="the prepare stage's output folder")
    run.add_argument("--out", type=Path, required=True, help="JSON file of the setting's records")
    run.add_argument("--methods", nargs="*", default=(), help="only these methods (default: the study's)")
    report = commands.add_parser("report", help="table, figures and summary from every setting's records")
    report.add_argument("--runs", type=Path, required=True, help="folder of the settings' JSON files")
    report.add_argument("--out", type=Path, required=True, help="folder of methods.md, summary.json, figures/")
    args = parser.parse_args(argv)

    def entry() -> int:
        study = load_study(args.study)
        if args.command == "data":
            draw_study_set(study.data, args.out)
        elif args.command == "run":
            run_setting(load_params(args.params), study, args.setting, args.prepared, args.out, args.methods)
        else:
            write_report(study_runs(args.runs, study), list(study.methods), args.out, METHOD_NAMES)
        return 0

    return run_main(entry)


def study_runs(runs: Path, study: MethodStudy) -> list[dict[str, Any]]:
    """Every setting's JSON file of `runs`, in the study's order; a missing one is an error naming it."""
    missing = [name for name in study.settings if not (runs / f"{name}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{runs}: no results for setting(s) {', '.join(missing)}; expected <setting>.json from the run stage"
        )
    return [json.loads((runs / f"{name}.json").read_text(encoding="utf-8")) for name in study.settings]


if __name__ == "__main__":
    sys.exit(main())
