"""DVC stage `demo`: generate the embedded demo set (images of 1..10 shapes; the count is the rank).

A stage of its own so that `data/demo` is a DVC output that `prepare` depends on, like any
dataset folder; for other datasets it costs half a second and is otherwise unused.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from l2rclip.config import load_params
from l2rclip.data.demo import generate_demo
from l2rclip.stages.common import run_main, stage_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the stage (see `--help`)."""
    parser = stage_parser("demo_data", "Generate the demo set (data.demo settings and seed from the params file).")
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)

    def run() -> int:
        params = load_params(args.params)
        generate_demo(args.out, params.data.demo.n_per_rank, params.data.demo.image_size, params.seed)
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
