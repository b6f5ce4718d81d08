"""Contrastive pretraining of the demo CLIP on drawn, captioned shapes.

Why: no CLIP weights can be had offline, and a random backbone has no language prior, so nothing
L2RCLIP is about (rank words that already lie in order, prompts that start from them) could be
seen or tested. A tiny open_clip model trained from scratch for a few minutes on the captioned
corpus (l2rclip.pretraining.corpus) learns a real, if narrow, prior: the number words line up
with the number of shapes.

The recipe is open_clip's own: `open_clip.create_model` of the architecture, `open_clip.ClipLoss`,
AdamW with open_clip_train's split (no weight decay on gains, biases and the logit scale) and its
warm-up + cosine schedule (`open_clip_train.scheduler.cosine_lr`), the logit scale clamped at 100.
Progress is a tqdm bar with an ETA; a zero-shot check on images of the project's demo generator
(`l2rclip.data.demo.demo_image` with `eval_seed`, never a corpus image) runs every `eval_every`
steps and at the end, and the loss curve and the checks go to MLflow.

The weights are written in fp16 safetensors (half the size, the same accuracy: the final check is
run on the fp16 file as loaded back), with metadata `l2rclip.kind = demo` so that every output
built on them says it came from the demo CLIP (l2rclip.models.backbone.backbone_kind).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch
from open_clip_train.scheduler import cosine_lr
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from l2rclip.config import PretrainConfig
from l2rclip.data.demo import COUNTS, demo_image
from l2rclip.metrics import ordinal_metrics, prototype_ordinality
from l2rclip.models.backbone import register_builtin_configs
from l2rclip.models.kinds import DEMO_KIND, METADATA_KEY
from l2rclip.pretraining.corpus import CORPUS_VERSION, CaptionedShapes
from l2rclip.ranks import RankSpace

if TYPE_CHECKING:
    from open_clip import CLIP  # untyped package: `Any` to mypy

log = logging.getLogger(__name__)

COUNT_SPACE = RankSpace(list(COUNTS))  # the demo task's ranks: labels 1..10, names "one".."ten"
MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP's clamp of the learned temperature


@dataclass
class ZeroShotSet:
    """Images of the project's demo generator, transformed for the model, with their rank indices.

    Attributes:
        images: (N, 3, H, W) model inputs.
        labels: (N,) rank indices 0..9 (count - 1).
    """

    images: torch.Tensor
    labels: np.ndarray


def zero_shot_set(
    seed: int, per_count: int, image_size: int, transform: Callable[[Any], torch.Tensor]
) -> ZeroShotSet:
    """`per_count` demo images of every count 1..10, drawn in memory by the demo generator.

    They are the images `generate_demo(root, per_count, image_size, seed)` would write (groups
    0..per_count-1), so with the project's seed they are the demo task's own images.
    """
    images, labels = [], []
    for count in COUNTS:
        for group in range(per_count):
            image, _ = demo_image(seed, group, count, image_size)
            images.append(transform(image))
            labels.append(COUNT_SPACE.index_of(count))
    return ZeroShotSet(images=torch.stack(images), labels=np.asarray(labels))  # (N, 3, H, W), (N,)


@torch.no_grad()
def text_prototypes(model: CLIP, tokenizer: Callable, sentences: list[str]) -> torch.Tensor:
    """L2-normalised text features of `sentences`: (M, E)."""
    device = next(model.parameters()).device
    return model.encode_text(tokenizer(sentences).to(device), normalize=True).float()


@torch.no_grad()
def zero_shot_metrics(
    model: CLIP, tokenizer: Callable, test: ZeroShotSet, template: str, batch_size: int = 250
) -> dict[str, float]:
    """Zero-shot counting with prompts `template.format(name)`, names "one".."ten".

    Returns:
        `accuracy`, `mae` (expectation rule), `mae_argmax`, `off_by_one_accuracy` (counts within
        one), `ordinality` of the ten prompt prototypes (l2rclip.metrics.prototype_ordinality).
    """
    was_training = model.training
    model.eval()
    prototypes = text_prototypes(model, tokenizer, [template.format(n) for n in COUNT_SPACE.names])  # (M, E)
    features = torch.cat(
        [
            model.encode_image(test.images[i : i + batch_size], normalize=True).float()
            for i in range(0, len(test.images), batch_size)
        ]
    )  # (N, E)
    logits = model.logit_scale.exp().float() * features @ prototypes.T  # (N, M)
    model.train(was_training)
    metrics = ordinal_metrics(logits.softmax(dim=1).numpy(), test.labels, COUNT_SPACE.value_array, cs_theta=1.0)
    keep = ("accuracy", "mae", "mae_argmax", "off_by_one_accuracy")
    return {**{k: metrics[k] for k in keep}, "ordinality": prototype_ordinality(prototypes.numpy())}


def create_demo_model(arch: str) -> tuple[CLIP, Callable, Callable]:
    """A randomly initialised open_clip model of `arch`, its evaluation transform and tokenizer."""
    register_builtin_configs()
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None, output_dict=True)
    return model, transform, open_clip.get_tokenizer(arch)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip_train's split: no weight decay on gains, biases, LayerNorms and the logit scale."""

    def exempt(name: str, param: nn.Parameter) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay},
    ]


def save_demo_weights(model: nn.Module, path: Path, metadata: dict[str, Any]) -> int:
    """Write the state dict in fp16 safetensors with l2rclip metadata; returns the file size in bytes.

    The metadata is one key, `l2rclip` (JSON with sorted keys, `kind: demo` among them): safetensors
    writes several metadata keys in a random order, which would make the same weights differ in
    bytes from run to run, and git keeps every version of the file.
    """
    tensors = {name: value.detach().to(torch.float16).contiguous() for name, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    save_file(
        tensors, str(staging), metadata={METADATA_KEY: json.dumps({"kind": DEMO_KIND, **metadata}, sort_keys=True)}
    )
    staging.replace(path)
    return path.stat().st_size


def pretrain(
    config: PretrainConfig, weights: Path, log_metrics: Callable[[dict[str, float], int], None] | None = None
) -> dict[str, Any]:
    """Pretrain the demo CLIP as `config` says and write its fp16 weights to `weights`.

    Args:
        config: the `pretrain` section of params.yaml.
        weights: output file (.safetensors).
        log_metrics: called with (metrics, step) for the loss curve and every zero-shot check
            (MLflow in the stage), or None.

    Returns:
        `history` (one row per logged step), `checks` (zero-shot checks by step), `final` (the check
        of the fp16 file as loaded back), `seconds`, `file_bytes`.
    """
    log_metrics = log_metrics or (lambda metrics, step: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model, transform, tokenizer = create_demo_model(config.arch)
    test = zero_shot_set(config.eval_seed, config.eval_per_count, config.image_size, transform)
    corpus = CaptionedShapes(config.seed, config.batch_size, config.steps, config.image_size, transform, tokenizer)
    loader = DataLoader(
        corpus, batch_size=None, num_workers=config.workers, prefetch_factor=4 if config.workers else None
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6
    )
    schedule = cosine_lr(optimizer, config.lr, config.warmup_steps, config.steps)
    criterion = open_clip.ClipLoss()

    history: list[dict[str, float]] = []
    checks: dict[int, dict[str, float]] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    bar = tqdm(loader, total=config.steps, desc=f"pretrain {config.arch}", unit="step", mininterval=5.0)
    for step, (images, texts) in enumerate(bar):  # (B, 3, H, W), (B, C)
        lr = schedule(step)
        out = model(images, texts)
        loss = criterion(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        row = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "lr": lr,
            "logit_scale": float(model.logit_scale.detach().exp()),
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
        }  # the trainer's own CPU time: load-independent
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if (step + 1) % config.log_every == 0:
            log_metrics(
                {"train/loss": row["loss"], "train/lr": lr, "train/logit_scale": row["logit_scale"]}, step + 1
            )
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            check = checks[step + 1] = zero_shot_metrics(model, tokenizer, test, config.eval_template)
            log_metrics({f"zero_shot/{k}": v for k, v in check.items()}, step + 1)
            bar.write(f"step {step + 1}: zero-shot " + ", ".join(f"{k} {v:.3f}" for k, v in check.items()))
    bar.close()
    seconds = time.perf_counter() - start

    # No timings in the file: the same recipe must give the same bytes (git keeps every version).
    metadata = {"arch": config.arch, "pretrain": asdict(config), "corpus_version": CORPUS_VERSION}
    size = save_demo_weights(model, weights, metadata)
    shipped, _, _ = open_clip.create_model_and_transforms(config.arch, pretrained=str(weights), output_dict=True)
    final = zero_shot_metrics(shipped, tokenizer, test, config.eval_template)
    log_metrics(
        {f"final/{k}": v for k, v in final.items()} | {"final/file_bytes": size, "final/seconds": seconds},
        config.steps,
    )
    log.info(
        "pretrained %s in %.0f s (%d steps); fp16 weights %s (%.1f MB): zero-shot %s",
        config.arch,
        seconds,
        config.steps,
        weights,
        size / 1e6,
        ", ".join(f"{k} {v:.3f}" for k, v in final.items()),
    )
    return {"history": history, "checks": checks, "final": final, "seconds": seconds, "file_bytes": size}
