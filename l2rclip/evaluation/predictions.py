"""Running a model over images or cached features, and turning probabilities into a table.

Used by validation during training, by the evaluate stage and by prediction, so that every
place reports the same numbers from the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from l2rclip.config import Params
from l2rclip.data.batch_transforms import store_eval_batches
from l2rclip.data.dataset import RankImageDataset, make_loader
from l2rclip.data.store import ImageStore
from l2rclip.evaluation.conformal import Calibration
from l2rclip.metrics import rank_distribution_summary
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.progress import progress
from l2rclip.ranks import RankSpace
from l2rclip.runtime import autocast

log = logging.getLogger(__name__)


@torch.no_grad()
def batch_outputs(
    model: L2RCLIP | OrdinalHeadModel,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    amp: bool,
    text_features: torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rank probabilities of one batch, and the model's own hard rule (see `predict_outputs`).

    One batch at a time, so that a caller streaming its results (`l2rclip predict`) never holds
    more than the batch; `text_features` are the prototypes, computed once by the caller.
    """
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast(device, amp):
        logits = model(**inputs, text_features=text_features)["logits"]  # (B, M) or (B, M-1)
    probs = model.rank_probabilities(logits.float()).cpu().double().numpy()  # (B, M)
    point = None  # (B,) under the model's published hard rule, if it has one
    if isinstance(model, OrdinalHeadModel) and model.has_point_rule:
        point = model.predict_ranks(logits.float()).cpu().numpy()
    return probs, point


@torch.no_grad()
def predict_outputs(
    model: L2RCLIP | OrdinalHeadModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rank probabilities for every batch of inputs, in order, and the model's own hard rule.

    Args:
        model: the model; its prototypes (if it has any) computed or taken from cache once.
        batches: dicts with `images` (B, 3, H, W) or `image_features` (B, E).
        device: where to run.
        amp: mixed precision on CUDA.

    Returns:
        (N, M) float64 probabilities, and (N,) rank indices of the model's published hard rule
        (CORAL/CORN threshold count) or None when its hard prediction is the argmax of p.
    """
    was_training = model.training
    model.eval()
    text_features = model.prototypes()  # (M, E): once for the whole pass
    chunks, points = [], []
    for batch in batches:
        probs, point = batch_outputs(model, batch, device, amp, text_features)
        chunks.append(probs)
        points.append(point)
    model.train(was_training)
    if not chunks:
        raise ValueError("predict_probabilities: expected at least one batch, found none (empty split?)")
    rules = [point for point in points if point is not None]
    return np.concatenate(chunks), (np.concatenate(rules) if rules else None)  # (N, M), (N,)


def predict_probabilities(
    model: L2RCLIP | OrdinalHeadModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """The (N, M) float64 rank probabilities of :func:`predict_outputs`."""
    return predict_outputs(model, batches, device, amp)[0]


def predictions_table(
    table: pd.DataFrame,
    probs: np.ndarray,
    rank_space: RankSpace,
    with_probabilities: bool = True,
    calibration: Calibration | None = None,
    alpha: float | None = None,
    point: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per image: true rank/value (when known), both prediction rules, uncertainty.

    Args:
        table: rows in the order of `probs`, with `path` and optionally `rank` and `value`.
        probs: (N, M) rank probabilities.
        rank_space: the ranks.
        with_probabilities: add one probability column per rank, in rank order, named by its
            label: `p_<label>` (`RankSpace.probability_columns`: `p_20` for age 20, `p_0_2` for
            Adience "(0, 2)").
        calibration: add the conformal interval of its served method: `interval_low` and
            `interval_high` (labels), `interval_low_value`, `interval_high_value` and
            `interval_level` (1 - alpha).
        alpha: the interval's level (default: the calibration's first).
        point: (N,) the model's own hard rule (CORAL/CORN threshold), used as `pred_rank` instead
            of the argmax of p; None for argmax.
    """
    if len(table) != len(probs):
        raise ValueError(f"predictions_table: {len(table)} rows but {len(probs)} probability rows")
    summary = rank_distribution_summary(probs, rank_space.value_array)
    if point is not None:
        summary["argmax"] = np.asarray(point, dtype=np.int64)
        summary["argmax_value"] = rank_space.value_array[summary["argmax"]]
    out = pd.DataFrame({"path": table["path"].astype(str).to_numpy()})
    for column in ("label", "rank", "value"):
        if column in table:
            out[column] = table[column].to_numpy()
    out["pred_rank"] = summary["argmax"]
    out["pred_label"] = [rank_space.label_of(int(k)) for k in summary["argmax"]]
    out["pred_name"] = [rank_space.names[int(k)] for k in summary["argmax"]]
    out["pred_value"] = summary["argmax_value"]
    out["expected_value"] = summary["expected_value"]
    out["std"] = summary["std"]
    out["entropy"] = summary["entropy"]
    out["confidence"] = probs.max(axis=1)
    if calibration is not None:
        alpha = calibration.resolve_alpha(alpha)
        low, high = calibration.intervals(probs, rank_space.value_array, alpha)  # (N,) each
        out["interval_low"] = [rank_space.label_of(int(k)) for k in low]
        out["interval_high"] = [rank_space.label_of(int(k)) for k in high]
        out["interval_low_value"] = rank_space.value_array[low]
        out["interval_high_value"] = rank_space.value_array[high]
        out["interval_level"] = 1.0 - alpha
    if with_probabilities:
        out = pd.concat([out, pd.DataFrame(probs, columns=rank_space.probability_columns())], axis=1)
    return out


def probabilities_of(predictions: pd.DataFrame, rank_space: RankSpace) -> np.ndarray:
    """The (N, M) probability block, in rank order, of a predictions table written with probabilities."""
    columns = list(rank_space.probability_columns())
    missing = [c for c in columns if c not in predictions.columns]
    if missing:
        raise ValueError(
            f"predictions lack {len(missing)} probability columns, e.g. {missing[:5]}, of the ranks "
            f"{rank_space.describe()}: expected a table written with probabilities (p_<label> "
            f"per rank), found columns {list(predictions.columns)[:12]}"
        )
    return predictions[columns].to_numpy(dtype=np.float64)


def split_outputs(
    model: L2RCLIP | OrdinalHeadModel,
    preprocess: Callable,
    table: pd.DataFrame,
    params: Params,
    device: torch.device,
    store: ImageStore | None = None,
    features: torch.Tensor | None = None,
    desc: str = "predicting",
) -> tuple[np.ndarray, np.ndarray | None]:
    """`predict_outputs` on a split's images, in table order, as evaluation computes them.

    The inputs are `features` (n, E) of the split's rows when given (a frozen tower's cache,
    `l2rclip.training.features.read_feature_cache`), else the images from the preprocess stage's
    `store`, else from the files. Shows progress with an ETA (`desc`) on image batches.
    """
    size = params.train.eval_batch_size
    if features is not None:
        inputs = ({"image_features": chunk} for chunk in features.split(size))
        return predict_outputs(model, inputs, device, params.train.amp)
    if store is not None:
        batches = store_eval_batches(table, store, size, params.train.num_workers, device)
    else:
        loader = make_loader(
            RankImageDataset(table, params.data.root, preprocess),
            size,
            shuffle=False,
            num_workers=params.train.num_workers,
            device=device,
        )
        batches = (images for images, _ in loader)
    shown = progress(batches, desc, -(-len(table) // size), "batch", log)
    return predict_outputs(model, ({"images": images} for images in shown), device, params.train.amp)
