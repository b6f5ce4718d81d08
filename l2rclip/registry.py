"""The MLflow model registry: one registered model per dataset, the `champion` alias, and decisions.

Every registered version is an l2rclip pyfunc (`l2rclip.serving`) tagged with what produced it
(data version, params hash, fold, validation score, CV test means, whether the backbone was
CLIP). Whether a new version replaces the champion is a decision made elsewhere (a Prefect flow
comparing scores); here it is carried out and recorded on the new version, as tags and in its
description, with the reason, so the registry itself says why the champion is the champion.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from l2rclip.models.checkpoint import read_model_meta
from l2rclip.serving import RequestLimits, log_pyfunc
from l2rclip.tracking import default_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
DECISION_TAG = "l2rclip.decision"
REASON_TAG = "l2rclip.decision_reason"
HOLDOUT_SPEC_TAG = "l2rclip.holdout_spec"  # the promotion holdout's definition (l2rclip.data.holdout)
PROMOTED = "promoted"
KEPT = "kept_champion"


def default_model_name(source: str) -> str:
    """The registered model of a dataset source: `l2rclip-<source>` (one lineage per dataset)."""
    return f"l2rclip-{source}"


def _client(tracking_uri: str | None) -> MlflowClient:
    return MlflowClient(tracking_uri or default_tracking_uri())


def register(model_dir: str | Path, name: str, run_id: str, tags: dict[str, Any],
             tracking_uri: str | None = None, set_champion_if_missing: bool = True,
             limits: RequestLimits | None = None,
             calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log `model_dir` as a pyfunc under `run_id` and register it as a new version of `name`.

    Args:
        model_dir: the l2rclip model folder.
        name: registered model name (see `default_model_name`).
        run_id: the run that produced the model (the pipeline's parent run).
        tags: version tags (None values are left out); `l2rclip.is_clip` and `l2rclip.backbone`
            are added from the model's metadata unless given.
        tracking_uri: MLflow store, also the registry (default: `default_tracking_uri()`).
        set_champion_if_missing: make this version the champion when `name` has none yet.
        limits: request limits the served version applies (default: the params defaults).
        calibration: the fold's conformal calibration, stored in the model (interval columns).

    Returns:
        `name`, `version` (int), `model_uri` (`models:/<name>/<version>`), `run_id`, and
        `champion` (whether this version is now the champion).
    """
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    meta = read_model_meta(model_dir)
    version_tags = {"l2rclip.is_clip": str(meta.get("is_clip")).lower(), "l2rclip.backbone": meta["model"]["arch"],
                    **tags}
    logged_uri = log_pyfunc(model_dir, run_id, uri, limits=limits, calibration=calibration)  # models:/<model_id>
    try:
        client.create_registered_model(name, description="L2RCLIP ordinal classifier (l2rclip pyfunc)")
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    # The logged model's storage location, not its models:/ URI: the registry store would look that
    # URI up in MLflow's global tracking store, not necessarily this one.
    logged = client.get_logged_model(logged_uri.removeprefix("models:/"))
    version = client.create_model_version(
        name, source=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
        tags={key: str(value) for key, value in version_tags.items() if value is not None})
    is_champion = set_champion_if_missing and champion(name, uri) is None
    if is_champion:
        promote(name, version.version, f"first version of {name}: there was no champion yet", uri)
    log.info("registered %s version %s from run %s%s", name, version.version, run_id,
             " as champion" if is_champion else "")
    return {"name": name, "version": int(version.version), "model_uri": f"models:/{name}/{version.version}",
            "run_id": run_id, "champion": is_champion}


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


def _record(client: MlflowClient, name: str, version: str | int, decision: str, reason: str,
            description: str) -> ModelVersion:
    """Write a decision as version tags and as the version's description (what the UI shows first)."""
    client.set_model_version_tag(name, str(version), DECISION_TAG, decision)
    client.set_model_version_tag(name, str(version), REASON_TAG, reason)
    log.info("%s version %s: %s", name, version, description)
    return client.update_model_version(name, str(version), description=description)
