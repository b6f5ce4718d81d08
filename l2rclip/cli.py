"""The `l2rclip` command."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from l2rclip import __version__


def _check(args: argparse.Namespace) -> int:
    from l2rclip.check import run_check
    from l2rclip.config import load_params

    result = run_check(load_params(args.params), steps=args.steps)
    first, last = result.losses[0]["loss"], result.losses[-1]["loss"]
    kind = "CLIP weights" if result.is_clip else "RANDOM weights: a pipeline check, NOT CLIP results"
    print(f"l2rclip library check passed in {result.seconds:.1f}s")
    print(f"  backbone: {result.arch} ({kind})")
    print(f"  loss over {len(result.losses)} steps: {first:.4f} -> {last:.4f}; terms: "
          + ", ".join(k for k in result.losses[-1] if k != "loss"))
    print(f"  truncated vs full-length prototypes: max difference {result.truncation_error:.1e}")
    print(f"  on the training batch (a smoke test, not a result): MAE {result.metrics['mae']:.2f}, "
          f"accuracy {result.metrics['accuracy']:.2f}; prototype ordinality {result.ordinality:.2f}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from l2rclip.config import load_params
    from l2rclip.models.backbone import weights_unavailable_reason

    params = load_params("params.yaml")  # what dvc.yaml reads
    reason = weights_unavailable_reason(params.model.arch, params.model.pretrained)
    if reason and params.model.fallback.enabled:
        print(f"{reason}\n\n==> CLIP weights are not available here: the pipeline runs on the small randomly "
              f"initialised backbone {params.model.fallback.arch}. Every output and MLflow run is labelled "
              "a PIPELINE CHECK: its numbers are NOT CLIP results.\n", flush=True)
    dvc = Path(sys.executable).with_name("dvc")
    result = subprocess.run([str(dvc) if dvc.exists() else "dvc", "repro"], check=False)
    if result.returncode:
        print(f"dvc repro failed (exit {result.returncode}); see the messages above", file=sys.stderr)
        return result.returncode
    report = Path("outputs/report/report.md")
    print("\n" + report.read_text(encoding="utf-8"))
    print("Results:\n"
          f"  report:   {report}  (figures in outputs/report/figures, per fold in outputs/folds/<k>/evaluate)\n"
          "  metrics:  dvc metrics show   |   dvc metrics diff (against the last commit)\n"
          "  models:   outputs/folds/<k>/train/best (safetensors + model.json)\n"
          "  MLflow:   .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   then open http://127.0.0.1:5000")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from l2rclip.stages import prepare

    return prepare.main(["--params", args.params, "--out", args.out])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(prog="l2rclip", description="Ordinal classification with CLIP (L2RCLIP).")
    parser.add_argument("--version", action="version", version=f"l2rclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "check", help="run the method end to end on a demo batch (a few training steps, then evaluation)",
        description="Load params.yaml and the configured backbone (falling back to a small random one, "
                    "said plainly, when CLIP weights cannot be had offline), generate the demo set if "
                    "needed, train a few steps on one batch with every configured loss and evaluate it.")
    check.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    check.add_argument("--steps", type=int, default=3, help="optimisation steps (default: 3)")
    check.set_defaults(func=_check)

    demo = commands.add_parser(
        "demo", help="run the whole DVC pipeline (dvc repro) and say where the results are",
        description="Run `dvc repro` on params.yaml (by default the embedded demo set) and print the "
                    "cross-validated report. Offline, without CLIP weights, says so and runs on the "
                    "small random fallback backbone (model.fallback), labelled a pipeline check.")
    demo.set_defaults(func=_demo)

    prepare = commands.add_parser("prepare", help="read, validate and split the dataset (the DVC prepare stage)")
    prepare.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    prepare.add_argument("--out", default="outputs/prepare", help="output folder (default: outputs/prepare)")
    prepare.set_defaults(func=_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `l2rclip` console script."""
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; dependencies (open_clip logs on the root logger) only when verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("l2rclip").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
