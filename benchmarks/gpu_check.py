"""GPU check: what L2RCLIP costs on one GPU, side by side with bare open_clip (issue 12, item 5).

Five parts, each written to `<out>/gpu_check.json` and `<out>/gpu_check.md` as soon as it is done
(so a run stopped by the 8-minute limit of gpu_check.sh keeps what it measured):

(a) train step: one-stage L2RCLIP (image tower trainable, `ce + kl_t2i + cop`, Adam, gradient
    clipping, autocast as `train.amp`: bfloat16 on CUDA) against a bare open_clip image-text
    fine-tune (both towers, open_clip's `ClipLoss` between each image and its rank's prompt, AdamW)
    on the same images and M prompts, same batch; alternated; images/s and the ratio ours/bare.
(b) loader: images/s of the training data path (`training_batches`, with `--workers` loader
    processes) against the step's images/s from (a): above 1 the GPU is never starved.
(c) peak GPU memory (`max_memory_allocated`) of the L2RCLIP step at M = 10, 62 and 101 ranks.
(d) prediction: `Predictor.predict_paths` images/s against bare `encode_image` on the same files.
(e) one fp32 step (TF32 off) on the device and on the CPU from the same state: loss difference and
    the largest gradient difference (absolute and relative to the gradient norm).

Weights: the architecture at random initialisation, saved to a local file and loaded through
`model.pretrained` (the path a user's own weights take); cost does not depend on the weights, and
these are NOT CLIP weights. Images: generated demo PNGs at `--image-size` pixels.

    benchmarks/gpu_check.sh outputs/gpu_check                        # one GPU: ViT-B-16, < 8 minutes
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu-check  # smoke: L2RCLIP-Tiny, a few steps
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import open_clip
import pandas as pd
import torch
from benchmark_utils import machine_line
from predict_throughput import Files
from torch.utils.data import DataLoader
from train_step import sync

from l2rclip.config import LossConfig, ModelConfig, PromptConfig, TrainConfig
from l2rclip.data.dataset import resolve_workers
from l2rclip.data.demo import generate_demo
from l2rclip.models.backbone import load_backbone, register_builtin_configs
from l2rclip.models.checkpoint import save_model
from l2rclip.models.factory import build_l2rclip
from l2rclip.ranks import RankSpace
from l2rclip.runtime import autocast
from l2rclip.serving.predictor import Predictor
from l2rclip.training.loop import IMAGE_TERMS, _image_batches, optimisation_step, parameter_groups, phase_loss
from l2rclip.training.optim import build_optimizer

# Per mode: the full check on a GPU, and a smoke run that exercises every part on the CPU in seconds.
MODES = {
    "cuda": {
        "arch": "ViT-B-16",
        "batch": 64,
        "steps": 10,
        "warmup": 3,
        "images": 640,
        "image_size": 256,
        "fp32_batch": 16,
        "loader_batches": 10,
    },
    "cpu": {
        "arch": "L2RCLIP-Tiny",
        "batch": 8,
        "steps": 2,
        "warmup": 1,
        "images": 40,
        "image_size": 64,
        "fp32_batch": 4,
        "loader_batches": 3,
    },
}
RANK_COUNTS = (10, 62, 101)


def training_batches(
    table: pd.DataFrame, root: Path, transform: Callable, train: TrainConfig, seed: int
) -> Iterable[tuple[dict, torch.Tensor]]:
    """The batches training draws: the JPEG/PNG data path today; switch here to the preprocess store."""
    return _image_batches(table, root, transform, train, seed)


class Check:
    """The shared state of one run: images, the weights file, results so far and where they go."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.device = args, torch.device(args.device)
        self.settings = {
            **MODES[self.device.type],
            **{k: v for k, v in vars(args).items() if k in MODES["cuda"] and v is not None},
        }
        self.amp = TrainConfig().amp
        self.root = tmp / "demo"
        table = generate_demo(
            self.root, n_per_rank=-(-self.settings["images"] // 10), image_size=self.settings["image_size"]
        )
        self.table = table.assign(rank=table["label"] - 1).head(self.settings["images"])
        self.weights = tmp / f"{self.settings['arch']}-random.pt"
        register_builtin_configs()
        torch.manual_seed(0)
        torch.save(open_clip.create_model(self.settings["arch"], pretrained=None).state_dict(), self.weights)
        self.tmp, self.results = tmp, {"settings": self.settings, "machine": machine_line(self.device)}

    def l2rclip(self, n_ranks: int, device: torch.device | None = None):
        """Backbone, model config, ranks and L2RCLIP over M ranks, from the weights file (`model.pretrained`)."""
        backbone = load_backbone(self.settings["arch"], str(self.weights), device or self.device)
        config = ModelConfig(
            arch=self.settings["arch"],
            pretrained=str(self.weights),
            prompt=PromptConfig(context_init="random", n_context=8),
        )
        space = RankSpace(list(range(16, 16 + n_ranks)))  # ages 16.. (MORPH: 62 ranks)
        model = build_l2rclip(backbone, space, config).to(device or self.device)
        return backbone, config, space, model

    def batch(self, transform: Callable, size: int, n_ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `size` demo images through `transform`, (size, 3, H, W), with labels over M ranks (size,)."""
        files = Files([self.root / p for p in self.table["path"][:size]], transform)
        return torch.stack([files[i] for i in range(len(files))]), torch.arange(size) % n_ranks

    def save(self) -> None:
        """Write the JSON and the markdown table of everything measured so far."""
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(self.results, indent=1) + "\n", encoding="utf-8")
        (out / "gpu_check.md").write_text(markdown(self.results), encoding="utf-8")


def timed(device: torch.device, run: Callable[[], object]) -> float:
    """Seconds of one call, the device synchronised before and after."""
    sync(device)
    tick = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - tick


def l2rclip_step(model, criterion, optimizer, images, labels, device, amp: bool, grad_clip) -> float:
    """What `l2rclip.training.loop._train_epoch` does per batch; returns the loss."""
    with autocast(device, amp):
        terms = criterion(model(images=images), labels)
    optimisation_step(optimizer, terms["loss"], grad_clip)
    return float(terms["loss"].detach())


def part_a_train_step(check: Check) -> None:
    """(a) one-stage L2RCLIP step vs a bare open_clip fine-tune step, alternated, same batch."""
    settings, device, train = check.settings, check.device, TrainConfig()
    backbone, config, space, model = check.l2rclip(RANK_COUNTS[0])
    criterion = phase_loss(LossConfig(), space, IMAGE_TERMS).to(device)
    optimizer = build_optimizer(parameter_groups(model, train), train.optimizer)
    images, labels = check.batch(backbone.preprocess_train, settings["batch"], len(space))
    images, labels = images.to(device), labels.to(device)

    bare = open_clip.create_model(settings["arch"], pretrained=str(check.weights), device=device)
    bare.train()
    prompts = [f"a photo of a {name} year old face." for name in space.names]
    tokens = open_clip.get_tokenizer(settings["arch"])(prompts).to(device)  # (M, 77)
    clip_loss = open_clip.loss.ClipLoss()
    bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=train.lr_image, weight_decay=train.weight_decay)

    def bare_step() -> float:
        with autocast(device, check.amp):
            image_features = bare.encode_image(images, normalize=True)  # (B, E)
            text_features = bare.encode_text(tokens[labels], normalize=True)  # (B, E): each image's prompt
            loss = clip_loss(image_features, text_features, bare.logit_scale.exp())
        optimisation_step(bare_optimizer, loss, train.grad_clip)
        return float(loss.detach())

    steps = {
        "l2rclip": lambda: l2rclip_step(
            model, criterion, optimizer, images, labels, device, check.amp, train.grad_clip
        ),
        "bare": bare_step,
    }
    for _ in range(settings["warmup"]):
        for run in steps.values():
            run()
    seconds = {name: [] for name in steps}
    for repeat in range(settings["steps"]):
        for name in list(steps) if repeat % 2 == 0 else list(reversed(steps)):
            seconds[name].append(timed(device, steps[name]))
    rates = {name: settings["batch"] / statistics.median(values) for name, values in seconds.items()}
    check.results["a_train_step"] = {
        "l2rclip_images_per_s": rates["l2rclip"],
        "bare_images_per_s": rates["bare"],
        "ratio": rates["l2rclip"] / rates["bare"],
        "ranks": len(space),
        "amp": check.amp and device.type == "cuda",
    }


def part_b_loader(check: Check) -> None:
    """(b) the training data path's images/s with the configured workers, vs the step's images/s."""
    settings = check.settings
    backbone = load_backbone(settings["arch"], str(check.weights), "cpu")
    train = dataclasses.replace(TrainConfig(), batch_size=settings["batch"], num_workers=check.args.workers)
    batches = iter(training_batches(check.table, check.root, backbone.preprocess_train, train, seed=0))
    next(batches)  # worker start-up is paid once per epoch, not per batch
    count, tick = 0, time.perf_counter()
    for inputs, labels in itertools.islice(batches, settings["loader_batches"]):
        inputs["images"].to(check.device, non_blocking=True)
        count += len(labels)
    rate = count / (time.perf_counter() - tick)
    step = check.results.get("a_train_step", {}).get("l2rclip_images_per_s")
    check.results["b_loader"] = {
        "images_per_s": rate,
        "workers": train.num_workers,
        "source": "image files",
        "loader_over_step": rate / step if step else None,
    }


def part_c_memory(check: Check) -> None:
    """(c) peak GPU memory of the one-stage L2RCLIP step at M = 10, 62, 101 (CPU: not measured)."""
    train, rows = TrainConfig(), {}
    gc.collect()  # nothing of the earlier parts stays allocated on the device
    for n_ranks in RANK_COUNTS:
        backbone, _, space, model = check.l2rclip(n_ranks)
        criterion = phase_loss(LossConfig(), space, IMAGE_TERMS).to(check.device)
        optimizer = build_optimizer(parameter_groups(model, train), train.optimizer)
        images, labels = check.batch(backbone.preprocess_train, check.settings["batch"], n_ranks)
        images, labels = images.to(check.device), labels.to(check.device)
        l2rclip_step(model, criterion, optimizer, images, labels, check.device, check.amp, train.grad_clip)
        if check.device.type == "cuda":  # the second step: optimiser state exists, as in training
            torch.cuda.reset_peak_memory_stats(check.device)
        l2rclip_step(model, criterion, optimizer, images, labels, check.device, check.amp, train.grad_clip)
        rows[str(n_ranks)] = (
            torch.cuda.max_memory_allocated(check.device) / 2**30 if check.device.type == "cuda" else None
        )
        del model, optimizer, backbone
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    check.results["c_peak_memory_gib"] = rows


def part_d_predict(check: Check) -> None:
    """(d) `Predictor.predict_paths` vs bare `encode_image` on the same files, alternated."""
    settings, device = check.settings, check.device
    backbone, config, space, model = check.l2rclip(RANK_COUNTS[0])
    folder = save_model(model, check.tmp / "model", config, space)
    predictor = Predictor.load(folder, device=str(device))
    bare = open_clip.create_model(settings["arch"], pretrained=str(check.weights), device=device).eval()
    paths = [check.root / p for p in check.table["path"]]
    loader = DataLoader(
        Files(paths, backbone.preprocess_eval),
        batch_size=settings["batch"],
        num_workers=resolve_workers(check.args.workers),
    )

    def ours() -> None:
        predictor.predict_paths(
            paths, batch_size=settings["batch"], num_workers=check.args.workers, progress=False
        )

    def plain() -> None:
        with torch.no_grad(), autocast(device, check.amp):
            for images in loader:
                bare.encode_image(images.to(device, non_blocking=True))  # (B, E)

    runs = {"predict": ours, "bare": plain}
    for run in runs.values():
        run()  # warm-up
    seconds = {name: [] for name in runs}
    for repeat in range(max(2, settings["steps"] // 3)):
        for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
            seconds[name].append(timed(device, runs[name]))
    rates = {name: len(paths) / statistics.median(values) for name, values in seconds.items()}
    check.results["d_predict"] = {
        "predict_images_per_s": rates["predict"],
        "bare_images_per_s": rates["bare"],
        "ratio": rates["predict"] / rates["bare"],
        "images": len(paths),
    }


def part_e_fp32(check: Check) -> None:
    """(e) one fp32 step (no autocast, TF32 off) on the device and on the CPU from the same state."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    backbone, _, space, cpu_model = check.l2rclip(RANK_COUNTS[0], torch.device("cpu"))
    criterion = phase_loss(LossConfig(), space, IMAGE_TERMS)
    images, labels = check.batch(backbone.preprocess_eval, check.settings["fp32_batch"], len(space))
    results = {}
    for name, device in (("cpu", torch.device("cpu")), ("device", check.device)):
        model = copy.deepcopy(cpu_model).to(device).train()
        terms = criterion.to(device)(model(images=images.to(device)), labels.to(device))
        terms["loss"].backward()
        grads = {k: p.grad.detach().double().cpu() for k, p in model.named_parameters() if p.grad is not None}
        results[name] = (float(terms["loss"]), grads)
    (cpu_loss, cpu_grads), (loss, grads) = results["cpu"], results["device"]
    difference = torch.cat([(grads[k] - cpu_grads[k]).flatten() for k in cpu_grads])
    norm = torch.cat([g.flatten() for g in cpu_grads.values()]).norm()
    check.results["e_fp32_device_vs_cpu"] = {
        "loss_cpu": cpu_loss,
        "loss_device": loss,
        "loss_abs_diff": abs(loss - cpu_loss),
        "grad_max_abs_diff": float(difference.abs().max()),
        "grad_diff_norm_over_grad_norm": float(difference.norm() / norm.clamp(min=1e-30)),
    }


def markdown(results: dict) -> str:
    """The measurements as one markdown table (rows for the parts done so far)."""

    def number(value, digits=1):
        return "n/a" if value is None else f"{value:.{digits}f}"

    s = results["settings"]
    lines = [
        f"GPU check: {s['arch']} (random init loaded from a local file: NOT CLIP weights), "
        f"batch {s['batch']}, {s['images']} demo images at {s['image_size']} px; {results['machine']}",
        "",
        "| part | measurement | value |",
        "|---|---|---|",
    ]
    if "a_train_step" in results:
        a = results["a_train_step"]
        lines += [
            f"| (a) train step, M={a['ranks']}, amp {a['amp']} | L2RCLIP one-stage images/s | "
            f"{number(a['l2rclip_images_per_s'])} |",
            f"| | bare open_clip fine-tune images/s | {number(a['bare_images_per_s'])} |",
            f"| | ratio L2RCLIP / bare | {number(a['ratio'], 2)} |",
        ]
    if "b_loader" in results:
        b = results["b_loader"]
        lines += [
            f"| (b) loader, {b['workers']} workers, {b['source']} | images/s | {number(b['images_per_s'])} |",
            f"| | loader / L2RCLIP step | {number(b['loader_over_step'], 2)} |",
        ]
    for ranks, gib in results.get("c_peak_memory_gib", {}).items():
        lines.append(f"| (c) peak memory, M={ranks} | GiB (max_memory_allocated) | {number(gib, 2)} |")
    if "d_predict" in results:
        d = results["d_predict"]
        lines += [
            f"| (d) prediction, {d['images']} files | Predictor.predict_paths images/s | "
            f"{number(d['predict_images_per_s'])} |",
            f"| | bare encode_image images/s | {number(d['bare_images_per_s'])} |",
            f"| | ratio predict / bare | {number(d['ratio'], 2)} |",
        ]
    if "e_fp32_device_vs_cpu" in results:
        e = results["e_fp32_device_vs_cpu"]
        lines += [
            f"| (e) fp32 step, device vs CPU | loss difference | {e['loss_abs_diff']:.2e} |",
            f"| | max gradient difference | {e['grad_max_abs_diff']:.2e} |",
            f"| | gradient difference norm / gradient norm | {e['grad_diff_norm_over_grad_norm']:.2e} |",
        ]
    lines += [
        "",
        f"Total {number(results.get('seconds'), 0)} s. Parts not listed did not run (time limit or "
        "error: see `errors` in gpu_check.json).",
    ]
    return "\n".join(lines) + "\n"


PARTS = {"a": part_a_train_step, "b": part_b_loader, "c": part_c_memory, "d": part_d_predict, "e": part_e_fp32}


def workers(value: str) -> int | str:
    """`--workers`: a count, or a word train.num_workers accepts (e.g. auto)."""
    return int(value) if value.isdigit() else value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke mode, tiny settings)")
    parser.add_argument("--arch", help="open_clip architecture (default: ViT-B-16 on cuda, L2RCLIP-Tiny on cpu)")
    parser.add_argument("--batch", type=int, help="images per step (default: 64 on cuda, 8 on cpu)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: 10 on cuda, 2 on cpu)")
    parser.add_argument(
        "--workers",
        type=workers,
        default=TrainConfig().num_workers,
        help="loader processes, as train.num_workers (default: %(default)s)",
    )
    parser.add_argument("--parts", default="abcde", help="which parts to run (default: abcde)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu for the smoke run")
    logging.disable(logging.WARNING)  # the random-weights warnings, once per load, are expected here
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="l2rclip-gpu-check-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check = Check(args, Path(tmp))
            for key in args.parts:
                try:
                    PARTS[key](check)
                except Exception as error:  # one failing part must not lose the others' numbers
                    check.results.setdefault("errors", {})[key] = f"{type(error).__name__}: {error}"
                check.results["seconds"] = time.perf_counter() - start
                check.save()
    finally:
        logging.disable(logging.NOTSET)  # main() may run inside another program (the tests)
    print(markdown(check.results))
    return check.results


if __name__ == "__main__":
    main()
