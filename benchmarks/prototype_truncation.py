"""Prototype computation: truncated at EOT (ours) against full 77-token length, side by side.

Times computing all M prototypes through the ViT-B-16 text tower (forward, and forward +
backward as in a training step), alternating the two variants within one run so that machine
noise hits both alike. Weights do not change the cost, so the backbone is randomly initialised
(no download); the script also checks both variants give the same prototypes.

    python benchmarks/prototype_truncation.py --arch ViT-B-16 --ranks 62 --context 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch

from l2rclip.config import ModelConfig, PromptConfig
from l2rclip.models.backbone import load_backbone
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace


def time_call(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16", help="open_clip architecture (default ViT-B-16)")
    parser.add_argument("--ranks", type=int, default=62, help="number of ranks M (default 62, MORPH ages)")
    parser.add_argument("--context", type=int, default=8, help="context tokens N (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (default 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(args.arch, "none")
    config = ModelConfig(
        arch=args.arch, pretrained="none", prompt=PromptConfig(context_init="random", n_context=args.context)
    )
    model = build_l2rclip(backbone, RankSpace(range(16, 16 + args.ranks)), config)

    def forward(truncate: bool):
        with torch.no_grad():
            return model.compute_prototypes(truncate=truncate)

    def step(truncate: bool):
        model.zero_grad(set_to_none=True)
        model.compute_prototypes(truncate=truncate).sum().backward()

    difference = (forward(True) - forward(False)).abs().max().item()
    rows = []
    for name, fn in (("forward", forward), ("forward+backward", step)):
        fn(True), fn(False)  # warm-up
        ours, full = [], []
        for _ in range(args.repeats):  # alternate so noise hits both
            ours += time_call(lambda fn=fn: fn(True), 1)
            full += time_call(lambda fn=fn: fn(False), 1)
        rows.append((name, statistics.median(ours), statistics.median(full)))

    length = model.prompt_learner.length + 3
    print(
        f"# {args.arch} text tower, M={args.ranks} ranks, N={args.context} context tokens; "
        f"sequence {length} (truncated) vs {model.text_encoder.context_length} (full)"
    )
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"max |truncated - full| over prototypes: {difference:.2e}")
    print("| pass | truncated (s) | full length (s) | speed-up |")
    print("|---|---|---|---|")
    for name, ours, full in rows:
        print(f"| {name} | {ours:.3f} | {full:.3f} | {full / ours:.2f}x |")


if __name__ == "__main__":
    main()
