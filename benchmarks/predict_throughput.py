"""Prediction throughput: `Predictor.predict_paths` (ours) against bare open_clip image encoding.

Both read the SAME image files with the same architecture, eval transform, batch size and loader
workers; the bare side only decodes (`PIL.Image.open(...).convert("RGB")`) and runs
`model.encode_image` under no_grad, so the ratio ours/bare is what everything l2rclip adds costs:
robust per-image reading with error rows, logits against the cached prototypes, the rank
distribution summary and the output table. The goal is a ratio of at least 0.9. The two variants
alternate within one run so that machine noise hits both alike; weights do not change the cost,
so the model is randomly initialised (no download) and saved/loaded like a trained one.

    python benchmarks/predict_throughput.py                      # L2RCLIP-Tiny, 256 demo images
    python benchmarks/predict_throughput.py --arch ViT-B-16 --images 64 --repeats 3

Wall-clock rates follow whatever else the machine runs; images per CPU-second of this process
(all its threads) are steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from l2rclip.config import ModelConfig, PromptConfig
from l2rclip.data.demo import generate_demo
from l2rclip.models.backbone import load_backbone, register_builtin_configs
from l2rclip.models.checkpoint import save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace
from l2rclip.runtime import pick_device
from l2rclip.serving.predictor import Predictor


class Files(Dataset):
    """What a user of bare open_clip writes: open, convert, transform."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="L2RCLIP-Tiny", help="open_clip architecture (default L2RCLIP-Tiny)")
    parser.add_argument("--images", type=int, default=256, help="demo images to predict (default 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=0, help="loader processes (default 0)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per variant (default 9)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the random-weights warnings, once per load, are expected here
    torch.manual_seed(0)
    device = pick_device(args.device)

    with tempfile.TemporaryDirectory(prefix="l2rclip-bench-") as tmp:
        generate_demo(Path(tmp) / "demo", n_per_rank=-(-args.images // 10), image_size=96)
        paths = sorted((Path(tmp) / "demo" / "images").rglob("*.png"))[: args.images]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backbone = load_backbone(args.arch, "none")
            config = ModelConfig(
                arch=args.arch, pretrained="none", prompt=PromptConfig(context_init="the number of shapes is")
            )
            space = RankSpace(list(range(1, 11)))
            folder = save_model(build_l2rclip(backbone, space, config), Path(tmp) / "model", config, space)
            predictor = Predictor.load(folder, device=str(device))
            register_builtin_configs()
            bare, _, transform = open_clip.create_model_and_transforms(args.arch, pretrained=None, device=device)
        bare.eval()
        loader = DataLoader(Files(paths, transform), batch_size=args.batch_size, num_workers=args.num_workers)

        def ours() -> None:
            predictor.predict_paths(
                paths, batch_size=args.batch_size, num_workers=args.num_workers, progress=False
            )

        def plain() -> None:
            with torch.no_grad():
                for images in loader:
                    bare.encode_image(images.to(device))  # (B, E)

        rates: dict[str, list[float]] = {"ours": [], "bare": []}
        cpu_rates: dict[str, list[float]] = {"ours": [], "bare": []}
        for round_ in range(args.repeats + 1):  # round 0 warms up (allocator, first-call costs)
            for name, run in (("ours", ours), ("bare", plain)):
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                if round_:
                    rates[name].append(len(paths) / (time.perf_counter() - start))
                    cpu_rates[name].append(len(paths) / (time.process_time() - cpu_start))

    print(
        f"{args.arch}, {len(paths)} images, batch {args.batch_size}, workers {args.num_workers}, "
        f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"{args.repeats} alternating rounds"
    )
    print("| variant | images/s (median) | images/s (best) | images per CPU-second (median) |")
    print("|---|---|---|---|")
    labels = {"ours": "Predictor.predict_paths (ours)", "bare": "bare open_clip encode_image"}
    for name, label in labels.items():
        print(
            f"| {label} | {statistics.median(rates[name]):.1f} | {max(rates[name]):.1f} | "
            f"{statistics.median(cpu_rates[name]):.1f} |"
        )
    ratios = {
        "median": [statistics.median(rates[n]) for n in labels],
        "best": [max(rates[n]) for n in labels],
        "per CPU-second": [statistics.median(cpu_rates[n]) for n in labels],
    }
    print("ratio ours/bare: " + ", ".join(f"{k} {o / b:.3f}" for k, (o, b) in ratios.items()) + " (goal >= 0.9)")


if __name__ == "__main__":
    main()
