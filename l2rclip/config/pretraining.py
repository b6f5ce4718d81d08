"""The `pretrain` section: the demo CLIP, trained from scratch on drawn, captioned shapes."""

from __future__ import annotations

from dataclasses import dataclass

from l2rclip.config.fields import SECTION, Count, NonNegative, NonNegativeInt, Positive, Str


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain` stage (docs/demo-clip.md).

    Its own `seed` (corpus and initialisation; the corpus's seed space is apart from the demo set's
    whatever the seeds), so that the project's `seed` does not retrain the shipped weights.
    """

    __pydantic_config__ = SECTION

    arch: Str = "L2RCLIP-Demo"
    """open_clip architecture trained from scratch (l2rclip/models/configs)."""
    seed: NonNegativeInt = 0
    """Corpus and initialisation; the corpus never draws a demo-set image, whatever the seeds."""
    steps: Count = 2400
    """Batches of the captioned corpus, drawn on the fly."""
    batch_size: Count = 256
    """Images (and captions) per contrastive batch."""
    lr: Positive = 2e-3
    """AdamW learning rate, open_clip_train's warm-up + cosine schedule."""
    weight_decay: NonNegative = 0.1
    """Not on gains, biases, LayerNorms and the logit scale (open_clip_train's split)."""
    warmup_steps: NonNegativeInt = 150
    """Linear warm-up steps."""
    image_size: Count = 96
    """Side of the drawn images (the demo set's data.demo.image_size)."""
    workers: NonNegativeInt = 1
    """Processes drawing the corpus (0: in the training process)."""
    threads: Count | None = None
    """torch threads: fixed, so the weights do not depend on the machine's core count (null: torch's default)."""
    log_every: Count = 10
    """Steps between loss points in MLflow."""
    eval_every: Count = 400
    """Steps between zero-shot checks (and at the end)."""
    eval_seed: NonNegativeInt = 0
    """Demo generator seed of the check images."""
    eval_per_count: Count = 100
    """Check images per count 1..10."""
    eval_template: Str = "a photo of {} shapes."
    """The zero-shot prompt of the check."""
    experiment: Str | None = "l2rclip-pretrain"
    """MLflow experiment; null: no tracking."""
