"""One training step: prototypes truncated at EOT (ours) against full 77-token prompts, side by side.

A step is what `l2rclip.training.loop` does per batch in the prompt-tuning setting of CoOp/OrdinalCLIP:
B images through the (by default frozen, under no_grad) image tower, all M prototypes computed
once, logits, the one-stage loss `ce + kl_t2i + cop` (`phase_loss`), backward, gradient clipping
and an Adam step over the library's parameter groups. The two variants differ only in
`model.compute_prototypes(truncate=...)`:

- ours:      the text tower runs the first EOT+1 = N+T+3 positions (causal, so exact);
- reference: the prompts are padded to the full 77-token context every step (CoOp/OrdinalCLIP).

Both start from the same state (the model is built once, its state_dict restored before every
timed step, with a fresh optimiser), see the same batch, and are alternated within one run so
that machine noise hits both. The loss difference is taken on those first steps from identical
states. Peak memory: on CPU each variant runs one step in a fresh subprocess (built before the
big model exists in this process), reporting the high-water mark of its resident set over the
step minus its resident set after construction (Linux: VmHWM reset through /proc/self/clear_refs;
elsewhere ru_maxrss deltas); on CUDA, torch.cuda.max_memory_allocated over the step.
Weights do not change the cost, so the backbone is randomly initialised (no download).

    python benchmarks/train_step.py                     # M = 10, 62, 101 (about 3.5 min on 2 quiet CPU cores)
    python benchmarks/train_step.py --ranks 62          # the MORPH setting alone (about 1.5 min)
    python benchmarks/train_step.py --train-image-tower # one-stage with a trainable image tower
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch
from benchmark_utils import machine_line

from l2rclip.config import LossConfig, ModelConfig, PromptConfig, TrainConfig
from l2rclip.models.backbone import load_backbone
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace
from l2rclip.runtime import autocast
from l2rclip.training.loop import IMAGE_TERMS, optimisation_step, phase_loss
from l2rclip.training.optim import build_optimizer

VARIANTS = {"ours": True, "reference": False}  # name -> truncate


class Setup:
    """Model, loss, batch and initial state for M ranks; everything drawn from fixed seeds."""

    def __init__(self, args: argparse.Namespace, n_ranks: int, device: torch.device):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = load_backbone(args.arch, "none")
        config = ModelConfig(
            arch=args.arch,
            pretrained="none",
            image_tower="train" if args.train_image_tower else "frozen",
            prompt=PromptConfig(context_init="random", n_context=args.context),
        )
        self.rank_space = RankSpace(range(16, 16 + n_ranks))  # ages 16.. (MORPH: 62 ranks)
        self.model = build_l2rclip(backbone, self.rank_space, config).to(device)
        self.model.train()
        self.train_image_tower = args.train_image_tower
        self.train_config = TrainConfig()
        self.criterion = phase_loss(LossConfig(), self.rank_space, IMAGE_TERMS).to(device)  # ce + kl_t2i + cop
        size = self.model.image_encoder.image_size
        size = size[0] if isinstance(size, tuple | list) else size
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(args.batch, 3, size, size, generator=generator).to(device)  # (B, 3, H, W)
        self.labels = torch.randint(0, n_ranks, (args.batch,), generator=generator).to(device)  # (B,)
        self.device, self.amp = device, args.amp
        self.initial = copy.deepcopy(self.model.state_dict())
        self.optimizer = None

    def reset(self) -> None:
        """Back to the initial weights, with a fresh optimiser (as at the start of training)."""
        self.model.load_state_dict(self.initial)
        train = self.train_config
        self.optimizer = build_optimizer(
            self.model.param_groups(train.lr_prompt, train.lr_rankformer, train.lr_image, train.weight_decay),
            train.optimizer,
        )

    def step(self, truncate: bool) -> float:
        """One optimisation step; returns the loss."""
        model, optimizer = self.model, self.optimizer
        with autocast(self.device, self.amp):
            if self.train_image_tower:
                image_features = model.encode_images(self.images)  # (B, E)
            else:
                with torch.no_grad():  # frozen tower: encoded afresh each step, no graph
                    image_features = model.encode_images(self.images)
            text_features = model.compute_prototypes(truncate=truncate)  # (M, E), once per step
            outputs = model(image_features=image_features, text_features=text_features)
            terms = self.criterion(outputs, self.labels)
        optimisation_step(optimizer, terms["loss"], self.train_config.grad_clip)
        return float(terms["loss"].detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: build, then one step of one variant; print its extra peak memory as JSON."""
    n_ranks, variant = args.memory_child.split(":")
    setup = Setup(args, int(n_ranks), torch.device("cpu"))
    setup.reset()
    gc.collect()
    baseline_rss = rss_kib("VmRSS")
    exact = baseline_rss is not None and reset_peak_rss()
    baseline_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    loss = setup.step(VARIANTS[variant])
    if exact:
        peak = rss_kib("VmHWM") - baseline_rss
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_maxrss
    print(json.dumps({"peak_mb": peak / 1024, "loss": loss, "method": "VmHWM" if exact else "ru_maxrss"}))


def cpu_peak_memory(args: argparse.Namespace, n_ranks: int, variant: str) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        f"{n_ranks}:{variant}",
        "--arch",
        args.arch,
        "--batch",
        str(args.batch),
        "--context",
        str(args.context),
        "--threads",
        str(args.threads),
    ]
    if args.train_image_tower:
        command.append("--train-image-tower")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child for M={n_ranks} {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip architecture (default ViT-B-16)")
    parser.add_argument(
        "--ranks", default="10,62,101", help="comma-separated numbers of ranks M (default 10,62,101)"
    )
    parser.add_argument("--batch", type=int, default=8, help="images per step B (default 8)")
    parser.add_argument("--context", type=int, default=8, help="context tokens N (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant and M (default 3)")
    parser.add_argument(
        "--train-image-tower",
        action="store_true",
        help="image tower trainable (one-stage); default frozen under no_grad (prompt tuning)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision on CUDA, as train.amp (default on; ignored on CPU)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    device = torch.device(args.device)
    rank_counts = [int(m) for m in args.ranks.split(",")]
    start = time.perf_counter()

    memory: dict[tuple[int, str], dict] = {}
    if not args.no_memory and device.type == "cpu":  # before the big model exists in this process
        for n_ranks in rank_counts:
            for variant in VARIANTS:
                memory[n_ranks, variant] = cpu_peak_memory(args, n_ranks, variant)

    rows = []
    for n_ranks in rank_counts:
        setup = Setup(args, n_ranks, device)
        times = {name: [] for name in VARIANTS}
        losses = {name: [] for name in VARIANTS}
        cuda_peak = {name: [] for name in VARIANTS}
        setup.reset()
        for truncate in VARIANTS.values():  # warm-up (first-call allocations, kernel selection)
            setup.step(truncate)
        for repeat in range(args.repeats):
            order = list(VARIANTS) if repeat % 2 == 0 else list(reversed(VARIANTS))  # alternate
            for name in order:
                setup.reset()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    baseline = torch.cuda.memory_allocated(device)
                sync(device)
                tick = time.perf_counter()
                losses[name].append(setup.step(VARIANTS[name]))
                sync(device)
                times[name].append(time.perf_counter() - tick)
                if device.type == "cuda":
                    cuda_peak[name].append((torch.cuda.max_memory_allocated(device) - baseline) / 2**20)
        if device.type == "cuda":
            for name in VARIANTS:
                memory[n_ranks, name] = {
                    "peak_mb": statistics.median(cuda_peak[name]),
                    "method": "max_memory_allocated",
                }
        loss_diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["reference"], strict=True))
        rows.append(
            (
                n_ranks,
                statistics.median(times["ours"]),
                statistics.median(times["reference"]),
                memory.get((n_ranks, "ours")),
                memory.get((n_ranks, "reference")),
                loss_diff,
                losses["ours"][0],
                setup.model.prompt_learner.length + 3,
            )
        )
        del setup
        gc.collect()

    context_length = 77
    tower = "trainable image tower" if args.train_image_tower else "frozen image tower (no_grad)"
    print(
        f"# {args.arch}, batch {args.batch}, N={args.context} context tokens, {tower}; "
        f"loss ce + kl_t2i + cop; Adam; device {device}"
    )
    print(
        f"# {machine_line(device)}; median of {args.repeats} alternated steps; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    methods = {m["method"] for m in memory.values()}
    if methods:
        print(f"# peak MB: extra memory over one step above the state after construction ({', '.join(methods)})")
    print(
        "| ranks | ours step (s) | reference step (s) | speed-up | ours peak MB | reference peak MB | loss diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for n_ranks, ours, ref, mem_ours, mem_ref, diff, _, length in rows:

        def fmt(m):
            return "n/a" if m is None else f"{m['peak_mb']:.0f}"

        print(
            f"| {n_ranks} (seq {length} vs {context_length}) | {ours:.2f} | {ref:.2f} | {ref / ours:.2f}x "
            f"| {fmt(mem_ours)} | {fmt(mem_ref)} | {diff:.1e} |"
        )
    print(
        "loss diff: max |loss(ours) - loss(reference)| over the first steps from the identical state; "
        "first-step losses: " + ", ".join(f"M={r[0]}: {r[6]:.4f}" for r in rows)
    )


if __name__ == "__main__":
    main()
