"""The baselines that are not trained by gradient descent: zero-shot CLIP and the linear probe.

Both produce an ordinary saved model (the same `best/` folder the trained methods write), so the
evaluate and report stages, prediction and serving treat every method alike:
- zero-shot CLIP: an L2RCLIP model whose cached prototypes are the text features of
  hand-written sentences (`model.prompt_template` with each rank name); its learnable prompts
  are never used;
- linear probe: scikit-learn's logistic regression on frozen, cached image features, with the
  inverse regularisation C chosen on the validation split (never test), stored as the weights
  of a linear head.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from l2rclip.config import EvalConfig, ModelConfig, TrainConfig
from l2rclip.metrics import ordinal_metrics
from l2rclip.models.backbone import Backbone
from l2rclip.models.checkpoint import save_model
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.ranks import RankSpace
from l2rclip.training.features import cached_image_features, rows_of
from l2rclip.training.loop import FoldData, TrainResult, validate

log = logging.getLogger(__name__)

ABSENT_RANK_BIAS = -1e4  # a rank without training images gets (practically) zero probability


@torch.no_grad()
def zero_shot_prototypes(backbone: Backbone, rank_space: RankSpace, template: str) -> torch.Tensor:
    """Text features of `template.format(name)` for every rank: (M, E), L2-normalised."""
    if "{}" not in template:
        raise ValueError(f"model.prompt_template: expected a '{{}}' where the rank name goes, found {template!r}")
    sentences = [template.format(name) for name in rank_space.names]
    device = next(backbone.model.parameters()).device
    return backbone.model.encode_text(backbone.tokenizer(sentences).to(device), normalize=True).float()


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    rank_values: np.ndarray,
    c_grid: tuple[float, ...],
    seed: int,
    eval_config: EvalConfig,
) -> tuple[np.ndarray, np.ndarray, float, dict[str, float]]:
    """Logistic regression on features; C picked by validation MAE (the training fit when no val).

    Returns:
        weight (M, E), bias (M,), the chosen C, and the validation metrics of the chosen fit.
    """
    n_ranks = len(rank_values)
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(train_x, train_y)
        weight = np.zeros((n_ranks, train_x.shape[1]))
        bias = np.full(n_ranks, ABSENT_RANK_BIAS)
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
        x, y = (val_x, val_y) if len(val_y) else (train_x, train_y)
        logits = x @ weight.T + bias  # (N, M)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        metrics = ordinal_metrics(probs, y, rank_values, eval_config.cs_theta, eval_config.ece_bins)
        log.info("linear probe C=%g: %s MAE %.4f", c, "val" if len(val_y) else "train", metrics["mae"])
        if best is None or metrics["mae"] < best[3]["mae"]:
            best = (weight, bias, c, metrics)
    if best is None:
        raise ValueError(f"model.probe_c: expected at least one C for the linear probe, found {list(c_grid)}")
    return best


def fit_untrained(
    method: str,
    model: L2RCLIP | OrdinalHeadModel,
    backbone: Backbone,
    rank_space: RankSpace,
    data: FoldData,
    model_config: ModelConfig,
    train: TrainConfig,
    eval_config: EvalConfig,
    eval_transform: Callable,
    out_dir: Path,
    seed: int,
    device: torch.device,
    meta: dict,
) -> TrainResult:
    """Zero-shot CLIP or the linear probe for one fold: writes `best/` like `training.fit` does."""
    start = time.perf_counter()
    extra: dict = {}
    if method == "zero_shot":
        model.eval()
        model.cached_prototypes = zero_shot_prototypes(backbone, rank_space, model_config.prompt_template)
    else:
        features = cached_image_features(
            model,
            data.images,
            data.root,
            eval_transform,
            train.feature_cache,
            device,
            train.eval_batch_size,
            train.num_workers,
            train.amp,
            store=data.store,
        )  # (N, E)
        x = {name: rows_of(features, data.images, table).numpy() for name, table in data.fitting_splits()}
        weight, bias, c, _ = fit_linear_probe(
            x["train"],
            data.train["rank"].to_numpy(),
            x["val"],
            data.val["rank"].to_numpy(),
            rank_space.value_array,
            model_config.probe_c,
            seed,
            eval_config,
        )
        if not isinstance(model, OrdinalHeadModel):  # build_model gives linear_probe a linear head
            raise TypeError(f"linear_probe: expected an OrdinalHeadModel, found {type(model).__name__}")
        with torch.no_grad():
            model.head.weight.copy_(torch.as_tensor(weight))
            model.head.bias.copy_(torch.as_tensor(bias))
        extra["probe_c"] = c
    val = validate(model, data, None, eval_transform, train, eval_config, rank_space, device)
    save_model(model, out_dir / "best", model_config, rank_space, extra={**meta, **extra, "epoch": 0, "val": val})
    record = {"epoch": 0, "phase": method, **val, **extra}
    return TrainResult(best_epoch=0, best_metrics=record, history=[record], seconds=time.perf_counter() - start)
