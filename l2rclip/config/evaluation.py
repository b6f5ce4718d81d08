"""The sections of params.yaml about results: `eval`, `conformal`, `tracking` (MLflow) and `serving`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import field_validator

from l2rclip.config.fields import SECTION, Bool, Count, NonNegative, Positive, Probability, Str

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # safe in `models:/<name>@champion` and in shells


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings: the CS@theta threshold, calibration bins and the papers' MAE unit."""

    __pydantic_config__ = SECTION

    cs_theta: NonNegative = 5.0
    """CS@theta: share of predictions within theta rank-value units (ages: 5 years; counts: 1)."""
    ece_bins: Count = 15
    """Bins of the expected calibration error."""
    paper_mae: Literal["value", "index"] = "value"
    """The unit of the papers' MAE for this protocol (result tables): value (ages) | index (HCI, Adience)."""


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: experiment, system metrics and the model registry (MLFLOW_TRACKING_URI picks the store)."""

    __pydantic_config__ = SECTION

    enabled: Bool = True
    """false: record nothing in MLflow (the pipeline runs the same)."""
    experiment: Str = "l2rclip"
    """MLflow experiment name."""
    system_metrics: Bool = True
    """MLflow's system-metrics monitor (CPU, memory, disk, network, GPU with pynvml) on the fold run."""
    system_metrics_interval: Positive = 10.0
    """Seconds between system-metrics samples."""
    register: Bool = True
    """false: train, evaluate and report but register no model version (ablation variants)."""
    model_name: Str | None = None
    """Registered model (null or empty: l2rclip-<folder name of data.root>)."""

    @field_validator("model_name")
    @classmethod
    def _usable_in_uris(cls, name: str | None) -> str | None:
        if name and not MODEL_NAME.fullmatch(name):
            raise ValueError(
                "expected letters, digits, '_', '.' and '-', starting with a letter or digit (it is "
                f"part of models:/<name>@champion URIs), or null for the default; found {name!r}"
            )
        return name


@dataclass(frozen=True)
class ServingConfig:
    """Limits of one request to the served model, stored in the registered model's config.

    `mlflow models serve` reads a whole request body before the model sees it and has no size
    limit of its own: put a proxy with a body cap in front of it (docs: serving).
    """

    __pydantic_config__ = SECTION

    max_rows: Count = 64
    """Images per request; more is refused with a 400."""
    max_request_bytes: Count = 64 * 1024 * 1024
    """Base64 image text per request, in all (64 MiB)."""


@dataclass(frozen=True)
class ConformalConfig:
    """Split conformal prediction intervals, calibrated on each fold's `calib` split."""

    __pydantic_config__ = SECTION

    method: Literal["ordinal", "residual"] = "ordinal"
    """Served interval: ordinal (ranks grown around the argmax by probability) | residual (E[v] +- q)."""
    alpha: tuple[Probability, ...] = (0.1,)
    """Miscoverage levels (intervals aim at coverage 1 - alpha); the first is served."""
    temperature: Bool = False
    """Fit a softmax temperature on the validation split before calibrating."""
