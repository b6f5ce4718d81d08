"""The methods one harness trains: L2RCLIP, its prompt-learning ancestors, and the baselines.

`ordinalclip` and `coop` are presets of the L2RCLIP model: they switch parts off rather than
being separate code, so every method shares the data, the loop, the metrics and the reports.
`resolve_method` writes the preset into the params, so what ran is what the saved config says.
"""

from __future__ import annotations

import dataclasses

from l2rclip.config import Params

HEAD_KINDS = {"linear_probe": "linear", "coral": "coral", "corn": "corn"}
UNTRAINED = ("zero_shot", "linear_probe")  # fitted in closed form or not at all: no epochs


def resolve_method(params: Params) -> Params:
    """Params with the method's preset applied.

    - `ordinalclip`: interpolated rank prompts (linear if `plain` was set), RankFormer off, `cop` off.
    - `coop`: plain prompts (one free embedding per rank), RankFormer off, CE only.
    - every other method: the params as written.
    """
    model, loss = params.model, params.loss
    if model.method == "ordinalclip":
        prompt = (
            model.prompt
            if model.prompt.interpolation != "plain"
            else dataclasses.replace(model.prompt, interpolation="linear")
        )
        model = dataclasses.replace(
            model, prompt=prompt, rankformer=dataclasses.replace(model.rankformer, enabled=False)
        )
        loss = dataclasses.replace(loss, cop=0.0, cop_batch=0.0)
    elif model.method == "coop":
        model = dataclasses.replace(
            model,
            prompt=dataclasses.replace(model.prompt, interpolation="plain"),
            rankformer=dataclasses.replace(model.rankformer, enabled=False),
        )
        loss = dataclasses.replace(loss, kl_t2i=0.0, cop=0.0, cop_batch=0.0)
    return dataclasses.replace(params, model=model, loss=loss)
