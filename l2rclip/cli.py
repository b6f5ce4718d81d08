"""The `l2rclip` command."""

from __future__ import annotations

import argparse
import json
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
          "  models:   outputs/folds/<k>/train/best (safetensors + model.json)"
          f"{_registered_line()}\n"
          "  MLflow:   .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   then open http://127.0.0.1:5000")
    return 0


def _registered_line() -> str:
    """Where the registered model is, as a ready-to-run predict command (empty if none)."""
    file = Path("outputs/register/registered.json")
    info = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    if not info.get("registered"):
        return ""
    return (f"\n  registry: {info['name']} version {info['version']}; predict with:\n"
            f"            l2rclip predict models:/{info['name']}@champion data/demo --out predictions.csv")


def _results(args: argparse.Namespace) -> int:
    from l2rclip.results import collect, markdown_table, write_between_markers

    table = markdown_table(collect(".", args.prefix))
    if args.readme:
        write_between_markers(Path(args.readme), args.marker, table)
        print(f"wrote the table of experiments '{args.prefix}*' into {args.readme} ({args.marker})")
    else:
        print(table, end="")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from l2rclip.parity import BUNDLES, shell_words

    print(shell_words(BUNDLES[args.bundle]))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from l2rclip.stages import prepare

    return prepare.main(["--params", args.params, "--out", args.out])


def _predict(args: argparse.Namespace) -> int:
    from l2rclip.predict import Predictor, expand_inputs

    try:
        paths = expand_inputs(args.inputs)
        if not paths:
            raise ValueError(f"no images found in {', '.join(args.inputs)}")
        predictor = Predictor.load(args.model, device=args.device)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = predictor.predict_paths(paths, batch_size=args.batch_size, num_workers=args.num_workers,
                                    with_probabilities=args.probabilities)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.6g")
    errors = int((table["error"] != "").sum())
    print(f"predicted {len(table) - errors} of {len(table)} images ({errors} errors) -> {out}")
    return 0


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

    results = commands.add_parser(
        "results", help="tabulate DVC experiments (mean +- std of MAE and accuracy, training time)",
        description="Read `dvc exp show --json`, keep the experiments whose name starts with --prefix and "
                    "print a markdown table from their outputs/report/metrics.json, or write it into a file "
                    "between the markers <!-- MARKER:start --> and <!-- MARKER:end -->.")
    results.add_argument("--prefix", default="", help="experiment name prefix (default: all experiments)")
    results.add_argument("--readme", help="file to write the table into (default: print it)")
    results.add_argument("--marker", default="results", help="marker name in that file (default: results)")
    results.set_defaults(func=_results)

    parity = commands.add_parser(
        "parity", help="print the -S overrides of a parity bundle (reference: the authors' definitions)",
        description="Print, as `dvc exp run` arguments, the params that switch every definition our code "
                    "chose differently to the authors' code (l2rclip/parity.py lists them), e.g. "
                    "`dvc exp run $(l2rclip parity reference)`; a later -S on any key still wins.")
    parity.add_argument("bundle", choices=["reference"], help="the bundle to print")
    parity.set_defaults(func=_parity)

    prepare = commands.add_parser("prepare", help="read, validate and split the dataset (the DVC prepare stage)")
    prepare.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    prepare.add_argument("--out", default="outputs/prepare", help="output folder (default: outputs/prepare)")
    prepare.set_defaults(func=_prepare)

    predict = commands.add_parser(
        "predict", help="predict the rank of images with a saved or registered model, into a CSV",
        description="Predict images, folders (searched recursively for image files) and CSV lists (a `path` "
                    "column; relative paths start from the CSV's folder) with a model folder or an MLflow "
                    "URI (runs:/<run_id>/model, models:/<name>@champion, models:/<name>/<version>; the store "
                    "is MLFLOW_TRACKING_URI, else ./mlflow.db). Writes one row per image in input order; an "
                    "unreadable image gets its error in the `error` column and the others go on.")
    predict.add_argument("model", help="model folder or MLflow model URI")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image file, folder, or CSV with a path column")
    predict.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    predict.add_argument("--probabilities", action="store_true", help="add one p_<k> column per rank")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    predict.add_argument("--num-workers", type=int, default=0,
                         help="loader processes reading images (default: 0, in the main process)")
    predict.add_argument("--device", default="auto",
                         help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)")
    predict.set_defaults(func=_predict)
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
