"""The `l2rclip` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from l2rclip import __version__
from l2rclip.config import ConfigError, DataConfig
from l2rclip.data.formats import DATA_FORMATS, PREPARE_DESCRIPTION
from l2rclip.venv_path import interpreter_first_on_path

if TYPE_CHECKING:
    from l2rclip.data.store import ImageStore
    from l2rclip.serving.predictor import Predictor


def _check(args: argparse.Namespace) -> int:
    from l2rclip.config import load_params
    from l2rclip.data.sources import SourceError
    from l2rclip.training.check import run_check

    try:
        result = run_check(load_params(args.params), steps=args.steps)
    except SourceError as error:  # e.g. data.root holds a demo set of other settings (never rewritten)
        print(f"l2rclip check: error: {error}", file=sys.stderr)
        return 2
    first, last = result.losses[0]["loss"], result.losses[-1]["loss"]
    from l2rclip.models.kinds import backbone_label

    kind = backbone_label(result.kind) or "CLIP weights"
    print(f"l2rclip library check passed in {result.seconds:.1f}s")
    print(f"  backbone: {result.arch} ({kind})")
    print(
        f"  loss over {len(result.losses)} steps: {first:.4f} -> {last:.4f}; terms: "
        + ", ".join(k for k in result.losses[-1] if k != "loss")
    )
    print(f"  truncated vs full-length prototypes: max difference {result.truncation_error:.1e}")
    print(
        f"  on the training batch (a smoke test, not a result): MAE {result.metrics['mae']:.2f}, "
        f"accuracy {result.metrics['accuracy']:.2f}; prototype ordinality {result.ordinality:.2f}"
    )
    if Path(".dvc").is_dir():  # a checkout of the project: can it fetch the committed results?
        from l2rclip.dvc_remote import remote_status

        print(f"  results: {remote_status('.').message}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from l2rclip.config import load_params
    from l2rclip.models.backbone import weights_unavailable_reason

    params = load_params("params.yaml")  # what dvc.yaml reads
    reason = weights_unavailable_reason(params.model.arch, params.model.pretrained)
    if reason and params.model.fallback.enabled:
        from l2rclip.models.factory import fallback_config
        from l2rclip.models.kinds import backbone_kind, backbone_label

        used = fallback_config(params.model)
        label = backbone_label(backbone_kind(used.arch, used.pretrained))
        print(
            f"{reason}\n\n==> CLIP weights are not available here: the pipeline runs on the offline fallback "
            f"{used.arch} (pretrained={used.pretrained}). Every output and MLflow run is labelled {label}.\n",
            flush=True,
        )
    beside = Path(sys.executable).with_name("dvc")
    dvc = str(beside) if beside.exists() else "dvc"
    env = interpreter_first_on_path(os.environ)  # the stages' `python` is this one, activated or not
    result = subprocess.run([dvc, "repro"], check=False, env=env)
    if result.returncode:
        print(f"dvc repro failed (exit {result.returncode}); see the messages above", file=sys.stderr)
        return result.returncode
    if args.push:  # so that any clone can `dvc pull` these results instead of recomputing them
        pushed = subprocess.run([dvc, "push"], check=False, env=env)
        if pushed.returncode:
            print(
                f"dvc push failed (exit {pushed.returncode}): the results are here but not on the DVC "
                "remote; see `dvc remote list`, fix the remote (docs/mlops.md, Team set-up) and run `dvc push`",
                file=sys.stderr,
            )
            return pushed.returncode
    report = Path("outputs/report/report.md")
    print("\n" + report.read_text(encoding="utf-8"))
    print(
        "Results:\n"
        f"  report:   {report}  (figures in outputs/report/figures, per fold in outputs/folds/<k>/evaluate)\n"
        "  metrics:  dvc metrics show   |   dvc metrics diff (against the last commit)\n"
        "  models:   outputs/folds/<k>/train/best (safetensors + model.json)"
        f"{_registered_line()}\n"
        "  MLflow:   .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   then open http://127.0.0.1:5000"
    )
    return 0


def _registered_line() -> str:
    """Where the registered model is, as a ready-to-run predict command (empty if none)."""
    file = Path("outputs/register/registered.json")
    info = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    if not info.get("registered"):
        return ""
    return (
        f"\n  registry: {info['name']} version {info['version']}; predict with:\n"
        f"            l2rclip predict models:/{info['name']}@champion data/demo --out predictions.csv"
    )


def _results(args: argparse.Namespace) -> int:
    from l2rclip.evaluation.results import collect, markdown_table, write_between_markers

    table = markdown_table(collect(".", args.prefix))
    if args.readme:
        write_between_markers(Path(args.readme), args.marker, table)
        print(f"wrote the table of experiments '{args.prefix}*' into {args.readme} ({args.marker})")
    else:
        print(table, end="")
    return 0


def _tag_commits(args: argparse.Namespace) -> int:
    from l2rclip.tracking.runs import tag_experiment_commits

    tagged = tag_experiment_commits(".", args.tracking_uri)
    print(f"tagged {tagged} MLflow runs with their DVC experiment's commit")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from l2rclip.evaluation.reproduce import find_preset, overrides, reproduce

    try:
        preset = find_preset(args.protocol, args.protocols)
        folds = [int(f) for f in args.folds.split(",")] if args.folds else None
        settings = overrides(preset, args.data, args.lists, epochs=args.epochs, folds=folds)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return reproduce(preset, settings, name=args.name, dry_run=args.dry_run)


def _config(args: argparse.Namespace) -> int:
    from l2rclip.config import json_schema, load_params
    from l2rclip.config.reference import MARKER, markdown_reference

    if args.action == "schema":
        print(json.dumps(json_schema(), indent=2))
    elif args.action == "reference" and args.write:
        from l2rclip.evaluation.results import write_between_markers

        write_between_markers(Path(args.write), MARKER, markdown_reference())
        print(f"wrote the params.yaml reference into {args.write} ({MARKER})")
    elif args.action == "reference":
        print(markdown_reference(), end="")
    else:
        load_params(args.params)  # a problem is a ConfigError: one line and exit 2 (main)
        print(f"{args.params}: valid")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from l2rclip.parity import BUNDLES, shell_words

    print(shell_words(BUNDLES[args.bundle]))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from l2rclip.stages import prepare

    return prepare.main(["--params", args.params, "--out", args.out])


# Exit statuses of `l2rclip predict` (documented in its --help and docs/serving.md).
EXIT_BAD_REQUEST = 2  # bad arguments, inputs, model or --out: nothing was predicted or written
EXIT_SOME_FAILED = 3  # the CSV was written, but some inputs could not be read (its `error` column)
EXIT_NONE_PREDICTED = 4  # the CSV was written, but no input could be read
EXIT_INTERRUPTED = 130  # Ctrl+C (128 + SIGINT, as shells report it): nothing was written


REGISTERED_FILE = Path("outputs/register/registered.json")  # written by the register stage


def serve_invocation(
    model: str, host: str, port: int, environ: Mapping[str, str], executable: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """The `mlflow models serve` command line for `model` and the environment to run it in.

    MLflow's scoring server starts `uvicorn` by name, so it fails with "uvicorn: not found" unless
    the interpreter's folder (a `.venv/bin` that need not be activated) is on PATH: it goes first.
    The store is the pipeline's (`MLFLOW_TRACKING_URI`, else ./mlflow.db), as for `l2rclip predict`.
    """
    from l2rclip.tracking.runs import default_tracking_uri

    env = interpreter_first_on_path(environ, executable)
    env["MLFLOW_TRACKING_URI"] = environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    command = [
        executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
    ]
    return command, env


LOOPBACK_HOSTS = ("localhost", "127.", "::1")


def exposure_warning(host: str, port: int) -> str:
    """A warning when `host` is reachable from other machines ('' on loopback).

    The MLflow scoring server has no authentication: on 0.0.0.0 (or any non-loopback address)
    anyone who reaches the port can send images and read predictions. It still starts, since
    that is sometimes what is wanted (a container behind a proxy), but never without saying so.
    """
    if host.startswith(LOOPBACK_HOSTS) or host == "[::1]":
        return ""
    return (
        f"warning: --host {host} exposes an UNAUTHENTICATED endpoint: anyone who can reach port {port} "
        "can use the model. Prefer the default 127.0.0.1 behind a reverse proxy that authenticates "
        f"(e.g. nginx with auth_basic or an OAuth proxy, forwarding to http://127.0.0.1:{port}), or an SSH "
        f"tunnel (ssh -L {port}:127.0.0.1:{port} this-host); see docs/operations.md"
    )


def _serve(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        info = json.loads(REGISTERED_FILE.read_text(encoding="utf-8")) if REGISTERED_FILE.is_file() else {}
        if not info.get("registered"):
            print(
                f"l2rclip serve: error: no model given and no registered model in {REGISTERED_FILE} "
                "(run `dvc repro`, whose register stage writes it, or name one: models:/<name>@champion, "
                "models:/<name>/<version>, runs:/<run_id>/model)",
                file=sys.stderr,
            )
            return 2
        model = f"models:/{info['name']}@champion"
    command, env = serve_invocation(model, args.host, args.port, os.environ)
    from l2rclip.models.checkpoint import ModelFileError
    from l2rclip.serving.registry import check_model_uri

    try:
        check_model_uri(model, env["MLFLOW_TRACKING_URI"])
    except ModelFileError as error:
        print(f"l2rclip serve: error: {error}", file=sys.stderr)
        return 2
    exposure = exposure_warning(args.host, args.port)
    if exposure:
        print(exposure, file=sys.stderr, flush=True)
    print(
        f"serving {model} at http://{args.host}:{args.port}/invocations (store {env['MLFLOW_TRACKING_URI']}); "
        "Ctrl+C stops it",
        file=sys.stderr,
        flush=True,
    )
    os.execve(command[0], command, env)  # the server takes over this process (and its Ctrl+C)


DEFAULT_STORE = "outputs/preprocess"  # where dvc.yaml's preprocess stage writes the image store


def _predict(args: argparse.Namespace) -> int:
    from contextlib import closing

    from l2rclip.serving.predictor import Predictor, check_output_file, expand_inputs, write_rows

    try:
        paths = expand_inputs(args.inputs)
        if not paths:
            raise ValueError(f"no images found in {', '.join(args.inputs)}")
        out = check_output_file(args.out, [*args.inputs, *paths])
        predictor = Predictor.load(
            args.model,
            device=args.device,
            max_pixels=args.max_image_pixels,
            alpha=args.alpha,
            calibration=args.calibration,
        )
        store = _prediction_store(predictor, args.store)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    try:  # rows go to a temporary file batch by batch; it replaces --out only when complete
        stream = predictor.stream_paths(
            paths,
            batch_size=args.batch_size,
            num_workers=args.workers,
            with_probabilities=args.probabilities,
            store=store,
        )
        with closing(stream):
            written = write_rows(stream, out)
    except KeyboardInterrupt:  # Ctrl+C: the old --out (if any) is intact, the temporary file gone; no traceback
        print(f"interrupted, nothing written ({out} unchanged)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:  # checked before the work; still possible (disk full, a folder removed meanwhile)
        print(f"error: cannot write the predictions to {out}: {error}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    print(f"predicted {written.rows - written.failed} of {written.rows} images ({written.failed} errors) -> {out}")
    if written.example is None:
        return 0
    path, reason = written.example
    example = f"e.g. {path}: {reason} (every reason: the error column of {out})"
    if written.failed == written.rows:
        print(f"error: no input could be predicted; {example}", file=sys.stderr)
        return EXIT_NONE_PREDICTED
    print(f"warning: {written.failed} of {written.rows} inputs could not be read; {example}", file=sys.stderr)
    return EXIT_SOME_FAILED


def _prediction_store(predictor: Predictor, store: str | None) -> ImageStore | None:
    """The image store `predict` reads pixels from: `--store`, else `outputs/preprocess` when usable; or None.

    A store named with `--store` must be usable (else the error names why); the default one is
    skipped, with a line that says why, when it is missing, stale in format, or made for another
    preprocessing. `--store none` decodes every file.
    """
    if store is not None:
        return None if store == "none" else predictor.open_store(store)
    if not Path(DEFAULT_STORE).is_dir():
        return None
    try:
        return predictor.open_store(DEFAULT_STORE)
    except (ValueError, OSError) as error:  # StoreError, or a damaged store
        logging.getLogger("l2rclip.cli").info("decoding the image files, not reading %s: %s", DEFAULT_STORE, error)
        return None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(prog="l2rclip", description="Ordinal classification with CLIP (L2RCLIP).")
    parser.add_argument("--version", action="version", version=f"l2rclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "check",
        help="run the method end to end on a demo batch (a few training steps, then evaluation)",
        description="Load params.yaml and the configured backbone (falling back to a small random one, "
        "said plainly, when CLIP weights cannot be had offline), generate the demo set if "
        "needed, train a few steps on one batch with every configured loss and evaluate it.",
    )
    check.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    check.add_argument("--steps", type=int, default=3, help="optimisation steps (default: 3)")
    check.set_defaults(func=_check)

    demo = commands.add_parser(
        "demo",
        help="run the whole DVC pipeline (dvc repro), push the outputs (dvc push), say where results are",
        description="Run `dvc repro` on params.yaml (by default the embedded demo set), `dvc push` the outputs "
        "to the default DVC remote (.dvc/config) and print the "
        "cross-validated report. Offline, without CLIP weights, says so and runs on the "
        "offline fallback (model.fallback: the demo CLIP shipped with l2rclip, pretrained on "
        "drawn shapes only), every number labelled so.",
    )
    demo.add_argument(
        "--no-push",
        dest="push",
        action="store_false",
        help="do not `dvc push` the outputs to the default DVC remote afterwards",
    )
    demo.set_defaults(func=_demo)

    results = commands.add_parser(
        "results",
        help="tabulate DVC experiments (mean +- std of MAE and accuracy)",
        description="Read `dvc exp show --json`, keep the experiments whose name starts with --prefix and "
        "print a markdown table from their outputs/report/metrics.json, or write it into a file "
        "between the markers <!-- MARKER:start --> and <!-- MARKER:end -->.",
    )
    results.add_argument("--prefix", default="", help="experiment name prefix (default: all experiments)")
    results.add_argument("--readme", help="file to write the table into (default: print it)")
    results.add_argument("--marker", default="results", help="marker name in that file (default: results)")
    results.set_defaults(func=_results)

    tag_commits = commands.add_parser(
        "tag-commits",
        help="tag MLflow runs with the commit of the DVC experiment that made them",
        description="A stage inside `dvc exp run` knows its experiment's name and baseline, not the commit "
        "DVC makes when the run ends. This reads `dvc exp show --json` and sets "
        "`l2rclip.dvc_exp_commit` on the runs of each finished experiment (the ablation and "
        "fold flows do it themselves; run it after a plain `dvc exp run`).",
    )
    tag_commits.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    tag_commits.set_defaults(func=_tag_commits)

    reproduce = commands.add_parser(
        "reproduce",
        help="run a published protocol (protocols/<name>.yaml) as a DVC experiment",
        description="Turn the protocol preset into `dvc exp run --name <protocol> -S ...` on your copy of the "
        "images, run it, and print the paper's table row (mean +- std over the protocol's folds "
        "or repeats) beside the published numbers. --epochs and --folds give a reduced budget.",
    )
    reproduce.add_argument("protocol", help="preset name, e.g. morph-a, adience, hci, fgnet-lopo")
    reproduce.add_argument("--data", required=True, help="your image folder (data.root)")
    reproduce.add_argument(
        "--lists",
        default="../shared/data/l2rclip-datalists",
        help="folder of the authors' split lists (default: %(default)s)",
    )
    reproduce.add_argument("--epochs", type=int, help="reduced budget: train.epochs and model.fallback.epochs")
    reproduce.add_argument("--folds", help="comma-separated subset of the protocol's folds, e.g. 0,1,2")
    reproduce.add_argument("--name", help="experiment name (default: the protocol's name)")
    reproduce.add_argument("--protocols", default="protocols", help="preset folder (default: %(default)s)")
    reproduce.add_argument("--dry-run", action="store_true", help="print the command and the published rows only")
    reproduce.set_defaults(func=_reproduce)

    config = commands.add_parser(
        "config",
        help="print the JSON Schema or key reference of params.yaml, or validate a params file",
        description="`schema` prints the JSON Schema of params.yaml written from l2rclip.config (committed as "
        "params.schema.json, which params.yaml names for editors); `reference` prints its keys as "
        "markdown tables (docs/configuration.md); `validate` loads a params file as every stage does "
        "and says what is wrong, in one line.",
    )
    config_actions = config.add_subparsers(dest="action", required=True)
    config_actions.add_parser("schema", help="print the JSON Schema of params.yaml")
    reference = config_actions.add_parser("reference", help="print the key reference of params.yaml (markdown)")
    reference.add_argument(
        "--write",
        metavar="FILE",
        help="write it between the <!-- params-reference:start/end --> markers of FILE instead of printing it",
    )
    validate = config_actions.add_parser("validate", help="check a params file against the schema")
    validate.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    config.set_defaults(func=_config)

    parity = commands.add_parser(
        "parity",
        help="print the -S overrides of a parity bundle (reference: the authors' definitions)",
        description="Print, as `dvc exp run` arguments, the params that switch every definition our code "
        "chose differently to the authors' code (l2rclip/parity.py lists them), e.g. "
        "`dvc exp run $(l2rclip parity reference)`; a later -S on any key still wins.",
    )
    parity.add_argument("bundle", choices=["reference"], help="the bundle to print")
    parity.set_defaults(func=_parity)

    prepare = commands.add_parser(
        "prepare",
        help="read, validate and split the dataset (the DVC prepare stage)",
        description=PREPARE_DESCRIPTION,
        epilog=DATA_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    prepare.add_argument("--out", default="outputs/prepare", help="output folder (default: outputs/prepare)")
    prepare.set_defaults(func=_prepare)

    predict = commands.add_parser(
        "predict",
        help="predict the rank of images with a saved or registered model, into a CSV",
        description="Predict images, folders (searched recursively for image files) and CSV lists (a `path` "
        "column; relative paths start from the CSV's folder) with a model folder or an MLflow "
        "URI (runs:/<run_id>/model, models:/<name>@champion, models:/<name>/<version>; the store "
        "is MLFLOW_TRACKING_URI, else ./mlflow.db). Writes one row per image in input order; an "
        "unreadable image gets its error in the `error` column and the others go on. A model with a "
        "conformal calibration adds interval_low, interval_high (labels), interval_low_value, "
        "interval_high_value and interval_level. --out is checked before any work; rows are written "
        "as batches finish to a temporary file beside it, which replaces --out only when complete.",
        epilog=f"exit status: 0 every input predicted; {EXIT_SOME_FAILED} the CSV was written but some inputs "
        f"could not be read (see its error column); {EXIT_NONE_PREDICTED} the CSV was written but no "
        f"input could be read; {EXIT_BAD_REQUEST} bad arguments, inputs, model or --out (nothing written); "
        f"{EXIT_INTERRUPTED} interrupted by Ctrl+C (nothing written).",
    )
    predict.add_argument("model", help="model folder or MLflow model URI")
    predict.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image file, folder, or CSV with a path column"
    )
    predict.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    predict.add_argument(
        "--probabilities",
        action="store_true",
        help="add one probability column per rank, named by its label: p_<label> (p_20: age 20)",
    )
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    predict.add_argument(
        "--workers",
        "--num-workers",
        type=int,
        default=DataConfig.decode_workers,
        help="threads decoding images while the model predicts, as data.decode_workers "
        "(default: one per CPU; 0: decode in the main thread, between batches)",
    )
    predict.add_argument(
        "--store",
        default=None,
        help="the preprocess stage's image store: files it holds unchanged are read from it, not "
        f"decoded, with the same predictions (default: {DEFAULT_STORE} when it exists and was "
        "made for the model's preprocessing with preprocess.margin 0; none: decode every file)",
    )
    predict.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="miscoverage of the interval columns (default: the calibration's first level); "
        "the model's calibration must support it (alpha >= 1/(n+1))",
    )
    predict.add_argument(
        "--calibration",
        default=None,
        help="a calibrate stage's calibration.json, for a model folder without its own "
        "(registered models carry theirs)",
    )
    predict.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)",
    )
    predict.add_argument(
        "--max-image-pixels",
        type=int,
        default=DataConfig.max_image_pixels,
        help="refuse images with more pixels (decompression bombs), as data.max_image_pixels "
        "does in prepare and serving (default: %(default)s)",
    )
    predict.set_defaults(func=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve a registered model over REST (mlflow models serve, with .venv/bin on PATH)",
        description="Run `mlflow models serve --env-manager local` on MODEL (default: the champion of the model "
        f"the register stage recorded in {REGISTERED_FILE}), with this interpreter's folder first on "
        "PATH so that MLflow finds uvicorn without an activated .venv. The store is "
        "MLFLOW_TRACKING_URI, else ./mlflow.db. POST images to /invocations (docs/serving.md).",
    )
    serve.add_argument(
        "model",
        nargs="?",
        help="models:/<name>@champion, models:/<name>/<version> or "
        "runs:/<run_id>/model (default: the registered champion)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s); another address, e.g. 0.0.0.0, exposes "
        "an unauthenticated endpoint: put an authenticating proxy in front "
        "(docs/operations.md)",
    )
    serve.add_argument("--port", type=int, default=5001, help="port (default: %(default)s)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `l2rclip` console script."""
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; dependencies (open_clip logs on the root logger) only when verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("l2rclip").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except ConfigError as error:  # a params file or setting the schema refuses: one line, never a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
