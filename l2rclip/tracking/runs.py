"""MLflow helpers: one parent run per pipeline run, one child run per fold, never fatal.

DVC runs `train@fold`, `evaluate@fold` and `report` as separate processes, so there is no shared
"active run": every call names its run id through `MlflowClient`, and the train stage writes the
ids to `tracking.json` in its output folder so later stages log into the same runs. Tracking records
what happened but is not needed for it to happen: any MLflow error (an unreachable server, a deleted
run) logs one warning and makes the tracker a no-op; it never owns local files, so nothing is lost.

Conventions a user of MLflow expects (docs/mlops.md, "MLflow: what ran"): runs carry MLflow's standard source tags
(`source_tags`) and are named after the DVC experiment they belong to (`pipeline_run_name`); the
experiment is a model-training one with a description (`EXPERIMENT_TAGS`); datasets are run
inputs whose digest is the DVC data version (`Tracker.log_datasets`); system metrics come from
MLflow's own monitor (`Tracker.system_metrics`). A DVC experiment's commit exists only after
`dvc exp run` has finished: `tag_experiment_commits` adds it to the runs afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils import validation as limits

from l2rclip.tracking.datasets import DATASET_CONTEXTS, DvcDatasetSource
from l2rclip.tracking.provenance import DVC_BASELINE_TAG, DVC_EXP_COMMIT_TAG, DVC_EXP_TAG

logger = logging.getLogger(__name__)

PIPELINE_KEY_TAG = "l2rclip.pipeline_key"
PARENT_TAG = "mlflow.parentRunId"
HANDLE_FILE = "tracking.json"
EXPERIMENT_DESCRIPTION = (
    "L2RCLIP ordinal regression (NeurIPS 2023 reference implementation). One parent run per pipeline "
    "run, named after its DVC experiment, with one child run per fold (train, calibrate, evaluate). "
    "Params are the configuration that ran (after method presets and the offline fallback backbone); "
    "the requested one is the artifact params/requested.yaml. Runs tagged l2rclip.pipeline_check=true "
    "used a randomly initialised backbone: their numbers are NOT CLIP results."
)
# mlflow.experimentKind makes the UI open the training-runs view instead of GenAI traces
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": EXPERIMENT_DESCRIPTION,
}
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow accepts only these in param/metric keys
T = TypeVar("T")


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute `sqlite:///` URI of mlflow.db in the project.

    The project is `DVC_ROOT` under DVC (inside `dvc exp run --temp` or a queued experiment that is
    the user's repository, not the temporary copy), else the current folder. Absolute, so that
    stages started from other folders (DVC, Prefect workers) share one store.
    """
    root = Path(os.environ.get("DVC_ROOT") or ".")
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _safe_key(key: str) -> str:
    """Replace characters MLflow rejects (e.g. `@` in `test/cs@5`) so one key cannot stop tracking."""
    return _BAD_KEY_CHARS.sub("_", str(key))


def _text(value: Any, limit: int) -> str:
    text = json.dumps(list(value), default=str) if isinstance(value, (list, tuple)) else str(value)
    if len(text) > limit:
        logger.debug("MLflow value of %d chars truncated to %d", len(text), limit)
    return text[:limit]


def _local_store_dir(uri: str) -> Path | None:
    """The folder that holds a sqlite or file store (where `mlartifacts/` goes), None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve().parent
    if uri.startswith("file:") or "://" not in uri:  # a file store: a folder of runs
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path)).resolve().parent
    return None


def _unreachable(uri: str) -> str | None:
    """Why an http(s) server cannot be used, or None; a short probe instead of minutes of retries."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=3):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (perhaps 401 behind a proxy): reachable
    except (OSError, ValueError) as error:
        return f"the server does not answer ({error})"


class Tracker:
    """Logs to MLflow by explicit run ids; turns itself off with one warning on the first failure.

    Every public method returns None (and does nothing) once the tracker is disabled, so callers
    never need to check `enabled` or catch MLflow errors.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "l2rclip", enabled: bool = True):
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.experiment = experiment
        self._enabled = enabled
        self._experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self.failure: str | None = None  # why MLflow turned the tracker off (None: it did not)
        if not enabled:
            return
        if self.tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
            reason = _unreachable(self.tracking_uri)
            if reason is not None:
                self._disable("connect", reason)
                return
        self._client = self._guard("connect", lambda: MlflowClient(self.tracking_uri))

    @property
    def enabled(self) -> bool:
        """False when constructed disabled or after the first MLflow failure."""
        return self._enabled

    def _disable(self, operation: str, error: Any) -> None:
        if self._enabled:
            self.failure = f"{operation} failed on {self.tracking_uri}: {error}"
            logger.warning(
                "MLflow tracking disabled: %s failed on %s: %s. Training goes on; local outputs are unaffected.",
                operation,
                self.tracking_uri,
                error,
            )
        self._enabled = False

    def _guard(self, operation: str, call: Callable[[], T]) -> T | None:
        if not self._enabled:
            return None
        try:
            return call()
        except Exception as error:  # any failure: tracking must never stop training
            self._disable(operation, error)
            return None

    def _guard_run(self, operation: str, run_id: str | None, call: Callable[[str], T]) -> T | None:
        """`_guard` of `call(run_id)`; a None run id (tracking was off when the run was due) does nothing."""
        return None if run_id is None else self._guard(operation, lambda: call(run_id))

    @property
    def _mlflow(self) -> MlflowClient:
        """The client. Only guarded calls use it, and a tracker without one is disabled, so they never run."""
        if self._client is None:
            raise RuntimeError(f"MLflow tracking on {self.tracking_uri} is off: there is no client")
        return self._client

    @property
    def _exp_id(self) -> str:
        """Experiment id by name (cached), creating the experiment on first use.

        The experiment gets `EXPERIMENT_TAGS` (model training kind, description) where it lacks
        them, so experiments made before, or by hand, are set up too; a user's own note stays.
        """
        if self._experiment_id is None:
            found = self._mlflow.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else self._create_experiment()
            present = found.tags if found else {}
            for key, value in EXPERIMENT_TAGS.items():
                if key not in present:
                    self._mlflow.set_experiment_tag(self._experiment_id, key, value)
        return self._experiment_id

    def _create_experiment(self) -> str:
        """Create the experiment; on a local store its artifacts go to `mlartifacts/` beside the store."""
        store = _local_store_dir(self.tracking_uri)
        folder = re.sub(r"[^\w.\-]", "_", self.experiment)
        location = (store / "mlartifacts" / folder).as_uri() if store else None
        try:
            return self._mlflow.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # another stage process may have created it meanwhile
            found = self._mlflow.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _find_parents(self, key: str) -> list:
        return list(
            self._mlflow.search_runs(
                [self._exp_id],
                filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'",
                order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
            )
        )

    def parent_run(self, key: str, name: str, params: dict, tags: dict) -> str | None:
        """Find the pipeline run tagged with `key`, or create it with `params` and `tags`.

        Fold processes may race to create it; each then keeps the oldest run with the key and a
        loser deletes its own, so all folds end up under one parent.
        """

        def find_or_create() -> str:
            found = self._find_parents(key)
            if found:
                return found[0].info.run_id
            run_id = self._create(name, params, {**tags, PIPELINE_KEY_TAG: key})
            oldest = self._find_parents(key)[0].info.run_id
            if oldest != run_id:
                self._mlflow.delete_run(run_id)
            return oldest

        return self._guard("parent_run", find_or_create)

    def child_run(self, parent_id: str, name: str, params: dict, tags: dict) -> str | None:
        """Create a run nested under `parent_id` (pass the fold as tag `l2rclip.fold`)."""
        return self._guard("child_run", lambda: self._create(name, params, {**tags, PARENT_TAG: parent_id}))

    def _create(self, name: str, params: dict, tags: dict) -> str:
        run_id = self._mlflow.create_run(self._exp_id, run_name=name).info.run_id
        self._log_params(run_id, params)
        self._set_tags(run_id, tags)
        return run_id

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics at `step` in one batch; NaN, infinite or non-numeric values are skipped."""

        def log(run_id: str) -> None:
            stamp = int(time.time() * 1000)
            batch = []
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    number = math.nan
                if not math.isfinite(number):
                    logger.debug("metric %s=%r is not a finite number; not logged", key, value)
                    continue
                batch.append(Metric(_safe_key(key), number, stamp, step or 0))
            self._log_batch(run_id, "metrics", batch, limits.MAX_METRICS_PER_BATCH)

        self._guard_run("log_metrics", run_id, log)

    def log_missing_epochs(self, run_id: str | None, history: list[dict[str, Any]]) -> None:
        """Log the records of `history` (one per epoch, `epoch` the step) whose step the run lacks.

        A training killed after saving an epoch but before logging it resumes from that epoch: this
        fills the gap, without logging an epoch twice.
        """

        def missing(run_id: str) -> list[dict[str, Any]]:
            shared = set.intersection(*(set(record) - {"epoch", "phase"} for record in history)) if history else ()
            if not shared:  # no key every epoch has: nothing tells logged epochs apart
                return []
            logged = {m.step for m in self._mlflow.get_metric_history(run_id, _safe_key(min(shared)))}
            return [record for record in history if record["epoch"] not in logged]

        for record in self._guard_run("log_missing_epochs", run_id, missing) or ():
            self.log_metrics(
                run_id, {k: v for k, v in record.items() if k not in ("epoch", "phase")}, step=record["epoch"]
            )

    def _log_batch(self, run_id: str, kind: str, items: list, size: int) -> None:
        """Send `items` as `log_batch(kind=...)` calls of at most `size` (MLflow's per-request limits)."""
        for start in range(0, len(items), size):
            chunk: dict[str, Any] = {kind: items[start : start + size]}  # metrics=, params= or tags=
            self._mlflow.log_batch(run_id, **chunk)

    def log_params(self, run_id: str | None, params: dict) -> None:
        """Log (nested) params under dotted keys, stringified and cut to MLflow's length limit."""
        self._guard_run("log_params", run_id, lambda run: self._log_params(run, params))

    def _log_params(self, run_id: str, params: dict) -> None:
        batch = [Param(_safe_key(k), _text(v, limits.MAX_PARAM_VAL_LENGTH)) for k, v in _flatten(params)]
        self._log_batch(run_id, "params", batch, limits.MAX_PARAMS_TAGS_PER_BATCH)

    def set_tags(self, run_id: str | None, tags: dict) -> None:
        """Set tags; None values are left out (an absent tag is more honest than "None")."""
        self._guard_run("set_tags", run_id, lambda run: self._set_tags(run, tags))

    def _set_tags(self, run_id: str, tags: dict) -> None:
        batch = [RunTag(str(k), _text(v, limits.MAX_TAG_VAL_LENGTH)) for k, v in tags.items() if v is not None]
        self._log_batch(run_id, "tags", batch, limits.MAX_PARAMS_TAGS_PER_BATCH)

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy one local file into the run's artifacts (the local file stays where it is)."""
        self._guard_run(
            "log_artifact", run_id, lambda run: self._mlflow.log_artifact(run, str(path), artifact_path)
        )

    def log_artifacts(self, run_id: str | None, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local folder's contents into the run's artifacts."""
        self._guard_run(
            "log_artifacts", run_id, lambda run: self._mlflow.log_artifacts(run, str(directory), artifact_path)
        )

    def log_dict(self, run_id: str | None, obj: dict, artifact_file: str) -> None:
        """Store `obj` as a JSON or YAML artifact (format from the extension of `artifact_file`)."""
        self._guard_run("log_dict", run_id, lambda run: self._mlflow.log_dict(run, obj, artifact_file))

    def log_datasets(
        self, run_id: str | None, splits: Mapping[str, pd.DataFrame], name: str, digest: str, source: str | Path
    ) -> None:
        """Log each split's rows as a dataset input of the run: `<name>-<split>`, digest `digest`.

        `splits` maps split names (train, val, calib, test) to their rows; the dataset context tag
        says train, validation, calibration or test. `digest` is the DVC data version and `source`
        the file the rows come from, so MLflow's dataset view names what DVC versions.
        """

        def log(run_id: str) -> None:
            # Imported on use: it loads MLflow's dataset machinery. (The module that defines it: the
            # package `mlflow.data` adds it at import time, which a type checker cannot see.)
            from mlflow.data.pandas_dataset import from_pandas

            inputs = []
            for split, rows in splits.items():
                with warnings.catch_warnings():  # MLflow's hint on integer columns concerns model schemas
                    warnings.simplefilter("ignore", UserWarning)
                    entity = from_pandas(
                        rows, source=DvcDatasetSource(str(source), digest), name=f"{name}-{split}", digest=digest
                    )._to_mlflow_entity()
                context = InputTag("mlflow.data.context", DATASET_CONTEXTS.get(split, split))
                inputs.append(DatasetInput(entity, [context]))
            self._mlflow.log_inputs(run_id, datasets=inputs)

        self._guard_run("log_datasets", run_id, log)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str | None, interval: float, resume: bool = False) -> Iterator[None]:
        """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU with pynvml) on `run_id`.

        Samples every `interval` seconds in a thread while the block runs, as `system/...` metrics;
        `resume` continues the step count of an earlier process of the same run. Without a run (or
        with the tracker off) the block just runs.
        """

        def start() -> Any:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=self.tracking_uri
            )
            monitor.start()
            return monitor

        monitor = self._guard("system_metrics", start) if run_id else None
        try:
            yield
        finally:
            if monitor is not None:
                self._guard("system_metrics", monitor.finish)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        """Mark the run terminated with `status` (FINISHED, FAILED or KILLED).

        Later stages may still log into a terminated run (MLflow allows it); its end time stays.
        """
        self._guard_run("end_run", run_id, lambda run: self._mlflow.set_terminated(run, status))

    def write_handle(self, folder: str | Path, run_id: str | None, parent_id: str | None) -> Path:
        """Write `folder/tracking.json` so later stage processes log into the same runs.

        Written even when tracking is off (ids are then null), so the file is always there as a stage
        output; errors writing it are local errors and are raised.
        """
        path = Path(folder) / HANDLE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self._experiment_id,
            "parent_run_id": parent_id,
            "run_id": run_id,
        }
        path.write_text(json.dumps(handle, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_handle(cls, folder: str | Path) -> tuple[Tracker, dict]:
        """A tracker on the store and experiment in `folder/tracking.json`, and the ids it holds.

        A missing or unreadable file gives a disabled tracker and `{}` (with a warning); a handle
        written while tracking was off gives a disabled tracker without a new warning.
        """
        path = Path(folder) / HANDLE_FILE
        try:
            handle = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("MLflow tracking disabled: cannot read run handle %s (%s)", path, error)
            return cls(enabled=False), {}
        if not handle.get("run_id"):
            logger.info("%s has no run id (tracking was off when it was written); not tracking", path)
            return cls(handle.get("tracking_uri"), enabled=False), handle
        tracker = cls(handle["tracking_uri"])
        tracker._experiment_id = handle.get("experiment_id")
        return tracker, handle


def tag_experiment_commits(repo: str | Path = ".", tracking_uri: str | None = None) -> int:
    """Tag runs of finished DVC experiments with the experiment's commit; returns how many runs.

    A stage inside `dvc exp run` knows its experiment's name and baseline (`source_tags`) but not
    its commit, which DVC makes when the run ends. This reads `dvc exp show --json` in `repo` and
    sets `l2rclip.dvc_exp_commit` on every run (any experiment of the store at `tracking_uri`)
    tagged with that experiment's name and baseline. Never fatal: DVC or MLflow failures log one
    warning and tag nothing more.
    """
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        shown = json.loads(done.stdout) if done.returncode == 0 else None
    except ValueError:
        shown = None
    if shown is None:
        logger.warning(
            "cannot read DVC experiments in %s (`dvc exp show --json` exited %d: %s); no commits tagged",
            repo,
            done.returncode,
            done.stderr.strip()[-500:],
        )
        return 0
    commits = {(baseline, name): rev for baseline, name, rev in _experiment_revs(shown)}
    tracker = Tracker(tracking_uri)

    def tag() -> int:
        experiments = [e.experiment_id for e in tracker._mlflow.search_experiments()]
        tagged = 0
        for (baseline, name), rev in commits.items():
            runs = tracker._mlflow.search_runs(
                experiments,
                filter_string=(f"tags.`{DVC_EXP_TAG}` = '{name}' and tags.`{DVC_BASELINE_TAG}` = '{baseline}'"),
            )
            for run in runs:
                tracker._mlflow.set_tag(run.info.run_id, DVC_EXP_COMMIT_TAG, rev)
            tagged += len(runs)
        return tagged

    return tracker._guard("tag_experiment_commits", tag) or 0


def _experiment_revs(shown: list[dict]) -> Iterator[tuple[str, str, str]]:
    """(baseline commit, experiment name, experiment commit) from `dvc exp show --json` (DVC 3)."""
    for baseline in shown:
        for group in baseline.get("experiments") or ():
            for rev in group.get("revs") or ():
                if rev.get("name") and rev.get("rev"):
                    yield baseline["rev"], rev["name"], rev["rev"]
