"""The model and training sections of params.yaml: `model` (`prompt`, `rankformer`, `fallback`), `loss`, `train`.

Choices marked [ours] are not fixed by the paper and are switches so that they can be ablated;
the reference-parity switches (l2rclip/parity.py) select the authors' definitions instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Interval
from pydantic import Strict

from l2rclip.config.fields import SECTION, Bool, Count, Float, NonNegative, NonNegativeInt, Positive, Str

METHODS = ("l2rclip", "ordinalclip", "coop", "zero_shot", "linear_probe", "coral", "corn")


@dataclass(frozen=True)
class PromptConfig:
    """Rank prompts `[SOT] c_1..c_N r_k^1..r_k^T . [EOT]` (docs: method)."""

    __pydantic_config__ = SECTION

    context_init: Str = "a photo of a person aged"
    """Phrase whose token embeddings initialise the context (N = its token count), or `random`."""
    n_context: Count = 8
    """N when context_init is `random` (drawn from N(0, 0.02^2))."""
    context_shared: Bool = True
    """One context for all ranks (false: rank-specific context)."""
    rank_tokens: Count = 1
    """T, learnable tokens per rank."""
    rank_init: Literal["names", "random"] = "names"
    """names (token embeddings of the rank names) | random."""
    interpolation: Literal["linear", "inverse_distance", "gaussian", "plain"] = "linear"
    """Rank embeddings mixed from `n_base` learnable base embeddings, or plain (CoOp: one free one per rank)."""
    n_base: Annotated[int, Strict(), Interval(ge=2)] = 2
    """B base embeddings interpolated into the M rank embeddings."""
    rank_offsets: Bool = True
    """Interpolate learnable offsets added to each rank's own name embedding, which start at zero, so training
    starts at the rank-name prompts [ours; docs/demo-clip.md shows why]; false: interpolate the base embeddings
    themselves (OrdinalCLIP: every rank starts as a mix of the first and last rank names)."""
    gaussian_sigma: Positive = 1.0
    """Width of the gaussian weights, in units of `gaussian_unit`."""
    inverse_distance_eps: Float = 1e-3
    """inverse_distance weights 1/(d + eps): ours 1e-3 | OrdinalCLIP 1e-5."""
    gaussian_unit: Literal["base_spacing", "rank"] = "base_spacing"
    """Unit of gaussian_sigma: base_spacing [ours] | rank (OrdinalCLIP: exp(-d^2), sigma 0.7071)."""


@dataclass(frozen=True)
class RankFormerConfig:
    """RankFormer: attention across ranks on the learnable prompt block, before the text encoder."""

    __pydantic_config__ = SECTION

    enabled: Bool = True
    """false: OrdinalCLIP prompts (no rank interaction)."""
    attention: Literal["token", "full"] = "token"
    """token: across ranks per token slot [ours] | full: over all M*L tokens."""
    layers: Count = 1
    """Transformer layers."""
    heads: Count = 8
    """Attention heads."""
    mlp_ratio: Positive = 4.0
    """Hidden size of the MLP over the embedding size."""
    rank_position: Bool = False
    """Add a learnable rank-position embedding before attention."""
    alpha_init: Float = 0.1
    """R' = R + alpha * delta(R), alpha learnable [ours: initial 0.1]."""
    dropout: Annotated[float, Strict(), Interval(ge=0, lt=1)] = 0.0
    """Dropout inside the RankFormer layers."""


@dataclass(frozen=True)
class FallbackConfig:
    """What training uses when the CLIP weights cannot be had (offline): NOT CLIP results, labelled so.

    `pretrained: auto` takes the demo CLIP shipped for `arch` (`L2RCLIP-Demo`: pretrained on drawn
    shapes, labelled as such) and random weights for an arch without one (`L2RCLIP-Tiny`: a pipeline
    check); `demo`, `none` or a file choose explicitly. A random backbone's image tower learns from
    scratch: it trains with `lr_image` and `epochs` instead of train.lr_image and train.epochs (a
    pretrained one, the demo CLIP included, keeps the train settings).
    """

    __pydantic_config__ = SECTION

    enabled: Bool = True
    """false: fail instead."""
    arch: Str = "L2RCLIP-Demo"
    """The demo CLIP shipped with l2rclip (pretrained on drawn shapes); L2RCLIP-Tiny: random."""
    pretrained: Str = "auto"
    """auto: the arch's shipped demo weights, else none | demo | none (random) | a weights file."""
    lr_image: Positive = 1e-3
    """Replaces train.lr_image for random weights only."""
    epochs: Count = 40
    """Replaces train.epochs for random weights only."""


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, method and prompt model, trained in the same harness whatever the method."""

    __pydantic_config__ = SECTION

    arch: Str = "ViT-B-16"
    """An open_clip architecture (paper: ViT-B-16)."""
    pretrained: Str = "openai"
    """open_clip tag | path to a weights file | none (random init: NOT CLIP)."""
    method: Literal[METHODS] = "l2rclip"  # type: ignore[valid-type]
    """l2rclip | presets ordinalclip (RankFormer and cop off), coop (plain prompts, CE only) | zero_shot |
    linear_probe (logistic regression on frozen features) | coral, corn (ordinal heads on the image tower)."""
    prompt_template: Str = "a photo of {}."
    """zero_shot: the hand-written prompt, {} = rank name."""
    probe_c: tuple[Positive, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    """linear_probe: inverse regularisation C values, chosen on validation."""
    image_tower: Literal["auto", "train", "frozen"] = "auto"
    """auto: train on a GPU, frozen on a CPU with a real CLIP (the small demo and random backbones train) |
    train (small lr) | frozen (features computed once and cached)."""
    head_rule: Literal["threshold", "mode"] = "threshold"
    """coral/corn: threshold (published: count of P(y > k) > 0.5) | mode (argmax and expectation)."""
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    """When the CLIP weights cannot be had (offline)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Rank prompts."""
    rankformer: RankFormerConfig = field(default_factory=RankFormerConfig)
    """Attention across ranks."""


@dataclass(frozen=True)
class LossConfig:
    """Weights of the named loss terms (0 switches a term off) and the `cop` inner weights."""

    __pydantic_config__ = SECTION

    ce: NonNegative = 1.0
    """Cross-entropy on image->rank logits (one-stage; two-stage stage 2)."""
    kl_t2i: NonNegative = 1.0
    """OrdinalCLIP text->image KL (one-stage; two-stage stage 2)."""
    cop: NonNegative = 1.0
    """lambda: cross-modal ordinal pairwise loss of L2RCLIP (one-stage; stage 2)."""
    cop_batch: NonNegative = 1.0
    """In-batch variant on cached features (two-stage stage 1 only)."""
    supcon: NonNegative = 1.0
    """Supervised contrastive (two-stage stage 1 only)."""
    cop_tightness: NonNegative = 1.0
    """w_t inside cop."""
    cop_diversity: NonNegative = 1.0
    """w_d inside cop."""
    supcon_temperature: Positive = 0.07
    """supcon_form ours: logits / temperature."""
    supcon_form: Literal["ours", "reference"] = "ours"
    """ours: /temperature, mean of i2t and t2i | reference: the authors' code (exp(logit_scale), i2t + t2i)."""
    cop_batch_weights: Literal["matrix", "pairs"] = "matrix"
    """Normalise pair weights over the BxB gap matrix [ours] | pairs: over pairs i<j (authors' code)."""
    kl_t2i_target: Literal["uniform", "softmax10"] = "uniform"
    """uniform over the rank's images [ours] | softmax10: softmax(10 * one_hot) (OrdinalCLIP)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; learning rates per parameter group."""

    __pydantic_config__ = SECTION

    schedule: Literal["one_stage", "two_stage"] = "one_stage"
    """two_stage: stage 1 trains prompts on cached features, stage 2 the image tower."""
    epochs: Count = 10
    """One-stage epochs, or stage-2 epochs of two-stage."""
    stage1_epochs: NonNegativeInt = 5
    """two_stage: stage-1 epochs."""
    batch_size: Count = 32
    """The global batch (each of devices x nodes processes loads its share)."""
    optimizer: Literal["adam", "radam", "adamw"] = "adam"
    """The optimiser of every parameter group."""
    lr_prompt: Positive = 1e-4
    """Context and rank embeddings."""
    lr_rankformer: Positive = 1e-4
    """RankFormer."""
    lr_image: Positive = 1e-5
    """Image tower (when model.image_tower is train)."""
    lr_head: Positive = 1e-3
    """coral / corn heads."""
    weight_decay: NonNegative = 5e-4
    """Weight decay of every group."""
    warmup_epochs: NonNegativeInt = 1
    """Linear warm-up before the cosine schedule."""
    grad_clip: Positive | None = 1.0
    """Max gradient norm, null for none."""
    num_workers: NonNegativeInt | Literal["auto"] = "auto"
    """Loader processes: auto (half the CPUs, at most 8) | an integer (0: the main process)."""
    device: Str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    amp: Bool = True
    """Mixed precision on CUDA (bfloat16 where supported); ignored on CPU."""
    select_metric: Str = "mae"
    """Validation metric choosing the best epoch (mae, accuracy, qwk, ...)."""
    eval_batch_size: Count = 64
    """Batch size of validation, evaluation and feature caching."""
    feature_cache: Str = "outputs/cache"
    """Where frozen image features are kept between runs."""
    devices: Count = 1
    """Processes (GPUs) per node; > 1 relaunches the stage under torchrun (DDP)."""
    nodes: Count = 1
    """Machines; > 1 needs rdzv_endpoint and the same stage command on every node."""
    rdzv_endpoint: Str | None = None
    """host:port of the torchrun c10d rendezvous (multi-node only), e.g. node0:29400."""
