"""Datasets as MLflow run inputs: the splits of a fold, identified by the DVC data version."""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.data.dataset_source import DatasetSource

DATASET_CONTEXTS = {"train": "train", "val": "validation", "calib": "calibration", "test": "test"}


class DvcDatasetSource(DatasetSource):
    """Where a logged dataset's rows come from: a file of the DVC pipeline at a data version.

    MLflow shows it as source type `dvc` with the file's path and `data_version` (the DVC data
    version, also the dataset's digest); `load()` reads the file as it is now.
    """

    def __init__(self, path: str, data_version: str):
        self.path, self.data_version = path, data_version

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> pd.DataFrame:
        """The file's rows as a table."""
        return pd.read_csv(self.path, keep_default_na=False)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # made explicitly, never guessed from a string

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcDatasetSource:
        """Never reached through MLflow (`_can_resolve` is False); a direct call is a caller's error."""
        raise ValueError(
            f"a DVC dataset source is built from its file and data version, "
            f"DvcDatasetSource(path, data_version); found a raw source {raw_source!r}"
        )

    def to_dict(self) -> dict[str, Any]:
        """What MLflow stores as the dataset's source."""
        return {"path": self.path, "data_version": self.data_version}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcDatasetSource:
        """The source `to_dict` stored."""
        return cls(source_dict["path"], source_dict["data_version"])
