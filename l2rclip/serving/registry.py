"""The MLflow model registry: one registered model per dataset, the `champion` alias, and decisions.

Every registered version is an l2rclip pyfunc (`l2rclip.serving.pyfunc`) logged in the run that trained
it (a fold run of the pipeline), and registered from that logged model, so MLflow's links hold
both ways: the run lists the model among its outputs, the logged model names its source run and
its versions (`mlflow.modelVersions`), the version names the run and the logged model (its
source `models:/<model_id>`). A version's tags say only what identifies it (data version, params
hash, fold, validation score, promotion holdout, conformal level, backbone); everything else
(the fold's metrics, the cross-validated test means of its pipeline run) is on the runs, which
its description names. Whether a new version replaces the champion is a decision made elsewhere
(a Prefect flow comparing scores); here it is carried out and recorded on the new version, as
tags and in its description, with the reason, so the registry itself says why the champion is
the champion. Each version also carries its rank set (`l2rclip.ranks`): the labels it answers and
the `p_<label>` columns it serves, which the retrain gate compares before any score.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from l2rclip.models.checkpoint import ModelFileError, read_model_meta
from l2rclip.serving.predictor import mlflow_store
from l2rclip.serving.pyfunc import RequestLimits, log_pyfunc
from l2rclip.tracking.runs import PARENT_TAG, default_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
DECISION_TAG = "l2rclip.decision"
REASON_TAG = "l2rclip.decision_reason"
HOLDOUT_SPEC_TAG = "l2rclip.holdout_spec"  # the promotion holdout's definition (l2rclip.data.holdout)
RANKS_TAG = "l2rclip.ranks"  # the rank set (labels, values, names) as compact JSON: the model's output contract
PROMOTED = "promoted"
KEPT = "kept_champion"


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri or default_tracking_uri())


def register(
    model_dir: str | Path,
    name: str,
    run_id: str,
    tags: dict[str, Any],
    tracking_uri: str | None = None,
    set_champion_if_missing: bool = True,
    limits: RequestLimits | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log `model_dir` as a pyfunc of the run `run_id` and register that logged model as a version of `name`.

    Args:
        model_dir: the l2rclip model folder.
        name: registered model name (`l2rclip.config.model_name`).
        run_id: the run that trained the model (the fold's run); the version's run.
        tags: version tags (None values are left out); `l2rclip.is_clip` and `l2rclip.backbone`
            are added from the model's metadata unless given.
        tracking_uri: MLflow store, also the registry (default: `default_tracking_uri()`).
        set_champion_if_missing: make this version the champion when `name` has none yet.
        limits: request limits the served version applies (default: the params defaults).
        calibration: the fold's conformal calibration, stored in the model (interval columns).

    Returns:
        `name`, `version` (int), `model_uri` (`models:/<name>/<version>`), `run_id`, `model_id`
        (the logged model) and `champion` (whether this version is now the champion).
    """
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    meta = read_model_meta(model_dir)
    version_tags = {
        "l2rclip.is_clip": str(meta.get("is_clip")).lower(),
        "l2rclip.backbone": meta["model"]["arch"],
        RANKS_TAG: json.dumps(meta["ranks"], separators=(",", ":")),
        **tags,
    }
    logged_uri = log_pyfunc(model_dir, run_id, uri, limits=limits, calibration=calibration)  # models:/<model_id>
    try:
        client.create_registered_model(name, description="L2RCLIP ordinal classifier (l2rclip pyfunc)")
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # MLflow's registration of a logged model: the version's run is the model's source run, and the
    # logged model lists the version. It takes no store: it looks models:/<model_id> up in the global one.
    with mlflow_store(uri):
        version = mlflow.register_model(
            logged_uri, name, tags={key: str(value) for key, value in version_tags.items() if value is not None}
        )
    client.update_model_version(name, version.version, description=_origin(client, version))
    is_champion = set_champion_if_missing and champion(name, uri) is None
    if is_champion:
        promote(name, version.version, f"first version of {name}: there was no champion yet", uri)
    log.info(
        "registered %s version %s from run %s%s",
        name,
        version.version,
        run_id,
        " as champion" if is_champion else "",
    )
    return {
        "name": name,
        "version": int(version.version),
        "model_uri": f"models:/{name}/{version.version}",
        "run_id": run_id,
        "model_id": logged_uri.removeprefix("models:/"),
        "champion": is_champion,
    }


def _origin(client: MlflowClient, version: ModelVersion) -> str:
    """Where a version came from and where the rest of its numbers are: its run, and that run's parent."""
    try:
        parent = client.get_run(version.run_id).data.tags.get(PARENT_TAG) if version.run_id else None
    except MlflowException:  # the run was deleted since: the version still names it
        parent = None
    fold = version.tags.get("l2rclip.fold")
    trained = f"Trained in run {version.run_id}" + (f" (fold {fold})" if fold is not None else "")
    if parent is None:
        return f"{trained}: the run holds the model and the metrics logged with it."
    return (
        f"{trained} of pipeline run {parent}: the fold's metrics are on its run, the cross-validated "
        f"test means (`test/<metric>_mean`) on the pipeline run."
    )


LOGGED_MODEL_PREFIX = "m-"  # MLflow 3 names a logged model `m-<hex>`; `models:/m-<hex>` addresses it


def check_model_uri(uri: str, tracking_uri: str | None = None) -> str:
    """Check that `uri` names a model that exists, without downloading it; return where it points.

    `l2rclip serve` hands the URI to `mlflow models serve`, whose answer to a misspelt name is a
    50-line traceback; asking the registry first turns that into one line naming the store and the
    models it holds.

    Raises:
        ModelFileError: a malformed URI, an unknown model, alias, version or run, or a missing folder.
    """
    store = tracking_uri or default_tracking_uri()
    if not uri.startswith(("models:/", "runs:/")):
        if not Path(uri).exists():
            raise ModelFileError(
                f"{uri}: no such model folder (expected a folder, models:/<name>@<alias>, "
                "models:/<name>/<version> or runs:/<run_id>/model)"
            )
        return f"folder {uri}"
    rest = uri.split(":/", 1)[1]
    try:
        client = _client(store)
        if uri.startswith("runs:/"):
            return f"run {client.get_run(rest.split('/', 1)[0]).info.run_id}"
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in rest and rest.rsplit("/", 1)[1].isdigit():
            version = client.get_model_version(*rest.rsplit("/", 1))
        elif rest.startswith(LOGGED_MODEL_PREFIX) and "/" not in rest:  # MLflow 3: models:/<model_id>
            logged = client.get_logged_model(rest)
            return f"logged model {logged.model_id} ({logged.name}) of run {logged.source_run_id}"
        else:
            raise ModelFileError(
                f"{uri}: expected models:/<name>@<alias>, models:/<name>/<version> (a version number) "
                "or models:/m-<id> (a logged model)"
            )
    except MlflowException as error:
        raise ModelFileError(
            f"{uri}: not in the MLflow store {store} ({_first_line(error)}); "
            f"registered models there: {_registered_names(store)}"
        ) from None
    return f"version {version.version} of {version.name}"


def _first_line(error: MlflowException) -> str:
    return (str(error.message).strip().splitlines() or [str(error.error_code)])[0]


def _registered_names(store: str) -> str:
    """'a, b' (the first 50), 'none', or why the store cannot list them: for an error message."""
    try:
        names = sorted(m.name for m in _client(store).search_registered_models(max_results=50))
    except MlflowException as error:
        return f"cannot be listed ({_first_line(error)})"
    return ", ".join(names) or "none"


def champion(name: str, tracking_uri: str | None = None) -> ModelVersion | None:
    """The version of `name` that holds the `champion` alias, or None (no alias, or no such model)."""
    client = _client(tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None


def promote(name: str, version: str | int, reason: str, tracking_uri: str | None = None) -> ModelVersion:
    """Move the `champion` alias to `version` and record the decision and reason on it."""
    client = _client(tracking_uri)
    previous = champion(name, tracking_uri)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    replaced = f" (replacing version {previous.version})" if previous is not None else ""
    return _record(client, name, version, PROMOTED, reason, f"Promoted to {CHAMPION}{replaced}: {reason}")


def keep(name: str, version: str | int, reason: str, tracking_uri: str | None = None) -> ModelVersion:
    """Record on the new `version` that the champion was kept, and why; the alias does not move."""
    client = _client(tracking_uri)
    current = champion(name, tracking_uri)
    kept = f"version {current.version}" if current is not None else "no champion"
    return _record(client, name, version, KEPT, reason, f"Not promoted; {kept} stays {CHAMPION}: {reason}")


def _record(
    client: MlflowClient, name: str, version: str | int, decision: str, reason: str, description: str
) -> ModelVersion:
    """Write a decision as version tags and as the version's description (what the UI shows first)."""
    client.set_model_version_tag(name, str(version), DECISION_TAG, decision)
    client.set_model_version_tag(name, str(version), REASON_TAG, reason)
    log.info("%s version %s: %s", name, version, description)
    origin = _origin(client, client.get_model_version(name, str(version)))
    return client.update_model_version(name, str(version), description=f"{description}\n\n{origin}")
