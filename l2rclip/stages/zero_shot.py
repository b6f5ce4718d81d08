"""DVC stage `zero-shot@k`: the backbone's own zero-shot score on fold k's test split.

A trained number means little without the number the backbone gives untrained: CLIP with the
hand-written prompt `model.prompt_template` for every rank ("a photo of {} shapes."), no training
at all. This stage scores exactly that on the same test images as `evaluate@k`, with the backbone
training resolved (the offline fallback included), so the report and `l2rclip demo` print the
zero-shot accuracy and MAE beside the trained model's, labelled with the backbone they came from.
It reads the test split's labels only to score, like the evaluate stage; it chooses nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from l2rclip.config import Params, load_params
from l2rclip.data.splits import select
from l2rclip.data.store import open_store
from l2rclip.evaluation.predictions import split_outputs
from l2rclip.metrics import ordinal_metrics, prefix_metrics
from l2rclip.models.factory import build_model, resolve_backbone
from l2rclip.models.kinds import backbone_label
from l2rclip.ranks import RankSpace
from l2rclip.runtime import pick_device, seed_everything
from l2rclip.stages.common import read_prepared, run_main, stage_parser, write_json
from l2rclip.training.baselines import zero_shot_prototypes
from l2rclip.training.features import read_feature_cache, rows_of

log = logging.getLogger("l2rclip.stages.zero_shot")  # not __main__ under python -m

PREFIX = "zero_shot"  # metric keys: zero_shot/accuracy, zero_shot/mae, ...


def zero_shot_fold(
    params: Params, fold: int, prepared: Path, metrics_file: Path, store_dir: Path | None = None
) -> dict[str, Any]:
    """Score `model.prompt_template` zero-shot on fold `fold`'s test split; returns what it writes."""
    seed_everything(params.seed)
    images, splits = read_prepared(prepared)
    test = select(splits, fold, "test")
    if test.empty:
        raise ValueError(f"fold {fold} has an empty test split in {prepared / 'splits.csv'}")
    device = pick_device(params.train.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train stage has announced a fallback already
        backbone, config = resolve_backbone(params.model, device=str(device))
    config = dataclasses.replace(config, method="zero_shot", image_tower="frozen")
    rank_space = RankSpace.from_config(params.ranks)
    model = build_model(backbone, rank_space, config).to(device).eval()
    model.cached_prototypes = zero_shot_prototypes(backbone, rank_space, config.prompt_template)  # (M, E)
    store = open_store(store_dir, backbone.recipe, params.preprocess.margin)
    transform = backbone.preprocess_eval
    cached = read_feature_cache(  # (N_all, E) when a frozen run cached this tower's features
        model, images, params.data.root, transform, params.train.feature_cache, store
    )
    features = None if cached is None else rows_of(cached, images, test)  # (N, E)
    probs, point = split_outputs(model, transform, test, params, device, store, features, f"zero-shot fold {fold}")
    metrics = ordinal_metrics(
        probs, test["rank"].to_numpy(), rank_space.value_array, params.eval.cs_theta, params.eval.ece_bins, point
    )
    result = {
        **prefix_metrics(metrics, PREFIX),
        "fold": fold,
        "prompt_template": config.prompt_template,
        "backbone": config.arch,
        "pretrained": config.pretrained,
        "backbone_kind": backbone.kind,
    }
    write_json(metrics_file, result)
    log.info(
        "fold %d zero-shot (%r, %s): MAE %.3f, accuracy %.3f",
        fold,
        config.prompt_template,
        backbone_label(backbone.kind),
        metrics["mae"],
        metrics["accuracy"],
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "zero_shot",
        "Score the backbone zero-shot (model.prompt_template for every rank, no training) on a fold's "
        "test split, for the report to print beside the trained model.",
        per_fold=True,
    )
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file for the zero-shot test metrics")
    args = parser.parse_args(argv)
    return run_main(
        lambda: zero_shot_fold(load_params(args.params), args.fold, args.prepared, args.metrics, args.store)
    )


if __name__ == "__main__":
    sys.exit(main())
