"""One fold fitted with whichever method the model config names.

The train stage and the method study both fit every method in `l2rclip.methods`: the trained ones
by gradient descent (`l2rclip.training.loop.fit`), zero-shot CLIP and the linear probe without it
(`l2rclip.training.baselines.fit_untrained`). This is the one place that chooses between the two,
so a new untrained baseline or a new argument reaches both callers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from l2rclip.config import Params
from l2rclip.methods import UNTRAINED
from l2rclip.models.backbone import Backbone
from l2rclip.models.heads import OrdinalHeadModel
from l2rclip.models.l2rclip import L2RCLIP
from l2rclip.ranks import RankSpace
from l2rclip.training.baselines import fit_untrained
from l2rclip.training.distributed import SINGLE, World
from l2rclip.training.loop import FoldData, TrainResult, fit
from l2rclip.training.resume import TrainState


def fit_method(
    model: L2RCLIP | OrdinalHeadModel,
    backbone: Backbone,
    params: Params,
    rank_space: RankSpace,
    data: FoldData,
    out_dir: Path,
    seed: int,
    device: torch.device,
    state: TrainState,
    meta: dict,
    on_epoch: Callable[[dict, int], None] = lambda metrics, epoch: None,
    world: World = SINGLE,
) -> TrainResult:
    """Fit `model` on `data` with `params.model.method`, writing `out_dir/best/` either way.

    `params.model` is the resolved model section (backbone and image tower as they train). An
    untrained method has no epochs: `state`, `on_epoch` and `world` apply to the trained ones only.
    """
    config = params.model
    if config.method in UNTRAINED:
        return fit_untrained(
            config.method,
            model,
            backbone,
            rank_space,
            data,
            config,
            params.train,
            params.eval,
            backbone.preprocess_eval,
            out_dir,
            seed,
            device,
            meta,
        )
    return fit(
        model,
        rank_space,
        data,
        config,
        params.train,
        params.loss,
        params.eval,
        (backbone.preprocess_train, backbone.preprocess_eval),
        out_dir,
        seed,
        device,
        state,
        on_epoch=on_epoch,
        meta=meta,
        world=world,
    )
