"""DVC stage `pretrain`: the demo CLIP, pretrained on drawn captioned shapes, shipped with the package.

Its output is the weights file `l2rclip/models/weights/L2RCLIP-Demo.fp16.safetensors`, tracked by
git (`cache: false` in dvc.yaml), so that every clone and every installed package has the demo CLIP
without running this stage; rerun it only when the recipe (the `pretrain` params or the corpus
code) changes, since git keeps every version of a 7 MB file. It reads the `pretrain` section only.

Besides the weights it writes `metrics.json` (the zero-shot check of the fp16 file as shipped),
`history.csv` (the loss curve) and `checks.csv` (the zero-shot check every `eval_every` steps);
wall and CPU seconds go to the log and MLflow, not to DVC's files, which a rerun must reproduce.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from l2rclip.config import PretrainConfig, load_params, to_flat_dict
from l2rclip.models.kinds import demo_weights_file
from l2rclip.pretraining.pretrain import pretrain
from l2rclip.stages.common import run_main, stage_parser, write_json
from l2rclip.tracking.provenance import source_tags
from l2rclip.tracking.runs import Tracker

log = logging.getLogger(__name__)


def run_pretrain(config: PretrainConfig, weights: Path, out_dir: Path) -> dict[str, Any]:
    """Pretrain, write the weights and the stage's records, log the run to MLflow; returns metrics.json."""
    tracker = Tracker(experiment=config.experiment or "", enabled=config.experiment is not None)
    flat = to_flat_dict(config, "pretrain")
    key = hashlib.sha256(json.dumps([flat, time.time_ns()], default=str).encode()).hexdigest()[:16]
    run_id = tracker.parent_run(
        f"pretrain-{key}",
        f"pretrain {config.arch}",
        flat,
        {
            **source_tags("l2rclip.stages.pretrain"),
            "l2rclip.backbone": config.arch,
            "l2rclip.backbone_kind": "demo",
        },
    )
    try:
        result = pretrain(config, weights, lambda metrics, step: tracker.log_metrics(run_id, metrics, step=step))
    except BaseException:
        tracker.end_run(run_id, status="FAILED")
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    history = pd.DataFrame(result["history"])
    history.drop(columns=["seconds", "cpu_seconds"]).to_csv(
        out_dir / "history.csv", index=False, float_format="%.6g"
    )
    checks = pd.DataFrame([{"step": step, **metrics} for step, metrics in result["checks"].items()])
    checks.to_csv(out_dir / "checks.csv", index=False, float_format="%.6g")
    metrics = {
        **{f"zero_shot/{k}": v for k, v in result["final"].items()},
        "steps": config.steps,
        "file_bytes": result["file_bytes"],
        "eval_images": config.eval_per_count * 10,
    }
    write_json(out_dir / "metrics.json", metrics)
    cpu = float(history["cpu_seconds"].iloc[-1])
    tracker.log_metrics(run_id, {"wall_seconds": result["seconds"], "cpu_seconds": cpu})
    for path in (out_dir / "history.csv", out_dir / "checks.csv", out_dir / "metrics.json", weights):
        tracker.log_artifact(run_id, path)
    tracker.end_run(run_id)
    log.info(
        "pretrain stage: %.0f s wall, %.0f s CPU in the training process, %d steps; %s",
        result["seconds"],
        cpu,
        config.steps,
        json.dumps(metrics),
    )
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser("pretrain", "Pretrain the demo CLIP on drawn captioned shapes (the pretrain section).")
    parser.add_argument(
        "--out",
        type=Path,
        default=demo_weights_file(),
        help="weights file to write (default: the package's demo CLIP, %(default)s)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        default=Path("outputs/pretrain"),
        help="folder of metrics.json, history.csv, checks.csv (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    def run() -> int:
        params = load_params(args.params)
        run_pretrain(params.pretrain, args.out, args.records)
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
