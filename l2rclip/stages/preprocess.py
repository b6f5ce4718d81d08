"""DVC stage `preprocess`: decode every prepared image once into the uint8 image store.

Reads `outputs/prepare/images.csv` (the good rows) and writes the store described in
`l2rclip.data.store` to `--out`. The stored geometry is the evaluation preprocessing of the
backbone recipe training will use (the offline fallback included:
`l2rclip.models.factory.planned_recipe`), resolved from open_clip's configs without loading
weights; store.json records the recipe. The recipe is a function of `model.arch`,
`model.pretrained`, `model.fallback.{enabled,arch}` and the code in l2rclip/models, which are
exactly the stage's params and code deps besides the data and `preprocess.*`: a change of `train.*`
keeps the store, and another backbone or tag (another size, mean, interpolation...) rebuilds it.
With `preprocess.enabled: false` it writes only `store.json` saying so, and training decodes files.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from l2rclip.config import Params, load_params
from l2rclip.data.store import SPEC_FILE, spec_for, write_store
from l2rclip.models.factory import planned_recipe
from l2rclip.stages.common import read_prepared, run_main, stage_parser

log = logging.getLogger("l2rclip.stages.preprocess")  # not __main__ under python -m


def preprocess(params: Params, prepared: Path, out_dir: Path) -> dict[str, Any]:
    """Write the image store of the prepared images to `out_dir`; returns its description."""
    images, _ = read_prepared(prepared)
    recipe = planned_recipe(params.model)
    spec = spec_for(recipe, params.preprocess.margin)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if not params.preprocess.enabled:
        out_dir.mkdir(parents=True)
        content: dict[str, Any] = {"enabled": False, "spec": asdict(spec), "recipe": recipe.to_dict()}
        (out_dir / SPEC_FILE).write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
        log.info("preprocess.enabled is false: no store; train and evaluate decode the image files")
        return content
    content = write_store(
        sorted(images["path"]),
        params.data.root,
        spec,
        out_dir,
        params.preprocess.shard_size,
        params.preprocess.workers,
        recipe,
    )
    log.info(
        "preprocess: %d images as %dx%d uint8 for %s (input %d px) in %d shard(s) at %s",
        content["images"],
        spec.side,
        spec.side,
        spec.arch,
        spec.image_size,
        len(content["shards"]),
        out_dir,
    )
    return content


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser(
        "preprocess",
        "Decode every prepared image once, resize and crop it to the backbone's input geometry "
        "(plus preprocess.margin), and write a memory-mapped uint8 store read by train and evaluate.",
    )
    parser.add_argument(
        "--prepared",
        type=Path,
        default=Path("outputs/prepare"),
        help="the prepare stage's output folder (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/preprocess"), help="the store folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    return run_main(lambda: preprocess(load_params(args.params), args.prepared, args.out) and 0)


if __name__ == "__main__":
    sys.exit(main())
