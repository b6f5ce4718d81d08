"""The whole of params.yaml (`Params`) and the name of the registered model it implies."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import model_validator

from l2rclip.config.data import DataConfig, PreprocessConfig, RanksConfig, SplitConfig
from l2rclip.config.evaluation import ConformalConfig, EvalConfig, ServingConfig, TrackingConfig
from l2rclip.config.fields import SECTION, NonNegativeInt
from l2rclip.config.model import LossConfig, ModelConfig, TrainConfig
from l2rclip.config.pretraining import PretrainConfig


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml: the project's only configuration (docs/configuration.md)."""

    __pydantic_config__ = SECTION

    seed: NonNegativeInt = 0
    """Seeds every stage; same params -> same numbers on CPU (numpy seed sequences need >= 0)."""
    folds: tuple[NonNegativeInt, ...] = (0, 1, 2, 3, 4)
    """The folds the pipeline trains and evaluates (train@k, evaluate@k)."""
    ranks: RanksConfig = field(default_factory=RanksConfig)
    """The ordered classes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Images, labels and what to do with bad rows."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Train / val / calib / test per fold."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """The decoded image store."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone, method, prompts and RankFormer."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss term weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking and registry."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Request limits of the served model."""
    conformal: ConformalConfig = field(default_factory=ConformalConfig)
    """Conformal prediction intervals."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The demo CLIP's pretraining stage."""

    @model_validator(mode="after")
    def _folds_exist(self) -> Params:
        """The folds the pipeline runs must exist where the protocol fixes their number."""
        if len(set(self.folds)) != len(self.folds):
            raise ValueError(f"'folds': expected distinct fold numbers, found {list(self.folds)}")
        count = {
            "kfold": ("split.n_folds", self.split.n_folds),
            "repeats": ("split.n_repeats", self.split.n_repeats),
        }.get(self.split.protocol)
        absent = [fold for fold in self.folds if count is not None and fold >= count[1]]
        if count is not None and absent:  # given / logo: the folds come from the data (train checks)
            raise ValueError(
                f"'folds': expected fold numbers in 0..{count[1] - 1} ({count[0]} is {count[1]} "
                f"for protocol {self.split.protocol}), found {absent}"
            )
        return self


def model_name(params: Params) -> str:
    """The registered model of this project's dataset: `tracking.model_name`, else from `data.root`.

    The default is `l2rclip-<name of the data root folder>` (`data/demo` -> `l2rclip-demo`,
    `data/my_faces` -> `l2rclip-my_faces`, `../shared/data/fgnet` -> `l2rclip-fgnet`), other
    characters than letters, digits, `_`, `.` and `-` replaced by `_`: one lineage per dataset,
    so two CSV datasets never share one, and the retrain gate never compares models of two
    datasets. A root without a name of its own (`.`, `..`) gives `l2rclip-<data.source>`: the
    name must not depend on where a clone of the project lies.
    """
    if params.tracking.model_name:
        return params.tracking.model_name
    folder = Path(os.path.normpath(params.data.root)).name
    stem = folder if folder not in ("", ".", "..") else params.data.source
    return f"l2rclip-{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}"
