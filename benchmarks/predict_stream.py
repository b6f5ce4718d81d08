"""`l2rclip predict` before and after streaming (issue 21.5): images/s and peak memory, side by side.

The old implementation is the commit before `l2rclip/serving/reading.py` was added (or `--old
REV`), extracted with `git archive` into a temporary folder and run from there; nothing of it is
kept in the library. Each variant is the real command, `python -m l2rclip.cli predict MODEL
FOLDER --probabilities`, in a child process:

- old: the parent commit's default (whole table in memory, decoding in the main process);
- old, 2 loader processes: its `--num-workers 2`;
- new: streaming, decoding threads (default: one per CPU), `--store none`;
- new + store: the same, reading pixels from a preprocess-stage store of the images.

Images are the demo set's drawn shapes (`l2rclip.data.demo`, 96 px PNG), written into a temporary
folder; the model is the demo CLIP shipped with l2rclip (`L2RCLIP-Demo`, `pretrained: demo`,
64 px input), saved like a trained model; the store is written with `write_store` at margin 0, as
the preprocess stage writes it (its one-off cost is shown apart). Each variant runs at N images,
N/10 images and 1 image (the start-up: imports, model load); the variants alternate within each
round. Net images/s = (N - 1) / (wall(N) - wall(1)), medians over the rounds. Peak MB is the
child's maximum resident set from `os.wait4` (loader processes included). This script imports no
torch itself (the setup runs in a child): a child inherits its parent's peak resident set in
ru_maxrss. The CSVs of old and new at N are compared byte for byte.

    python benchmarks/predict_stream.py                  # 10,000 images, 2 rounds
    python benchmarks/predict_stream.py --images 2000 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark_utils import machine_line

ROOT = Path(__file__).resolve().parents[1]


def setup(folder: Path, images: int) -> None:
    """(child process) The demo images, the demo-CLIP model and a margin-0 store of the images."""
    import warnings

    from l2rclip.config import ModelConfig, PromptConfig
    from l2rclip.data.demo import generate_demo
    from l2rclip.data.store import spec_for, write_store
    from l2rclip.models.backbone import load_backbone
    from l2rclip.models.checkpoint import save_model
    from l2rclip.models.factory import build_l2rclip
    from l2rclip.ranks import RankSpace

    table = generate_demo(folder / "demo", n_per_rank=-(-images // 10), image_size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("L2RCLIP-Demo", "demo")
    config = ModelConfig(
        arch="L2RCLIP-Demo", pretrained="demo", prompt=PromptConfig(context_init="the number of shapes is")
    )
    space = RankSpace(list(range(1, 11)))
    save_model(build_l2rclip(backbone, space, config), folder / "model", config, space)
    paths = sorted(table["path"])[:images]
    for name, count in (("all", images), ("tenth", max(1, images // 10)), ("one", 1)):
        listing = "path\n" + "".join(f"demo/{p}\n" for p in paths[:count])
        (folder / f"{name}.csv").write_text(listing, encoding="utf-8")
    tick = time.perf_counter()
    write_store(paths, folder / "demo", spec_for(backbone.recipe, 0.0), folder / "store", recipe=backbone.recipe)
    print(f"store: {images} images in {time.perf_counter() - tick:.1f} s")


def old_commit(rev: str | None) -> str:
    """`rev`, else the parent of the commit that added the streaming reader."""
    if rev:
        return rev
    added = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--diff-filter=A", "--", "l2rclip/serving/reading.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not added:
        raise SystemExit("l2rclip/serving/reading.py is not committed; pass --old REV")
    return f"{added}^"


def run_measured(command: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run `command`; (wall seconds, peak resident set in MB of it and the children it waited for)."""
    with log.open("w", encoding="utf-8") as out:
        tick = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - tick
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({process.returncode}); see {log}:\n{log.read_text()[-2000:]}"
        )
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="images N (default 10,000)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--old", help="the old revision (default: the parent of the streaming commit)")
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        setup(args.setup, args.images)
        return

    old = old_commit(args.old)
    with tempfile.TemporaryDirectory(prefix="l2rclip-predict-stream-") as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        archive = subprocess.run(["git", "archive", old], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp / "old")], input=archive, check=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        tick = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--setup", str(tmp), "--images", str(args.images)], env=env, check=True
        )
        print(f"setup (images, model, store): {time.perf_counter() - tick:.1f} s")
        variants = {
            "old (parent commit, default)": ("old", []),
            "old, --num-workers 2 (loader processes)": ("old", ["--num-workers", "2"]),
            "new (streaming, decoding threads)": ("new", ["--store", "none"]),
            "new + store (--store)": ("new", ["--store", str(tmp / "store")]),
        }
        sizes = {"one": 1, "tenth": max(1, args.images // 10), "all": args.images}
        walls: dict[tuple[str, str], list[float]] = {}
        peaks: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for size in sizes:
                for number, (name, (code, options)) in enumerate(variants.items()):
                    path = tmp / "old" if code == "old" else ROOT
                    out = tmp / f"{number}-{size}.csv"
                    command = [sys.executable, "-m", "l2rclip.cli", "predict", str(tmp / "model")]
                    command += [str(tmp / f"{size}.csv"), "--out", str(out), "--device", "cpu", "--probabilities"]
                    wall, peak = run_measured(command + options, {**env, "PYTHONPATH": str(path)}, tmp / "log")
                    walls.setdefault((name, size), []).append(wall)
                    peaks.setdefault((name, size), []).append(peak)
                    print(f"round {round_}, {sizes[size]} images, {name}: {wall:.1f} s, {peak:.0f} MB", flush=True)
        same = {
            name: (tmp / f"{number}-all.csv").read_bytes() == (tmp / "0-all.csv").read_bytes()
            for number, name in enumerate(variants)
        }

    def median(table: dict, name: str, size: str) -> float:
        return statistics.median(table[(name, size)])

    base = next(iter(variants))
    rate = {n: (args.images - 1) / (median(walls, n, "all") - median(walls, n, "one")) for n in variants}
    print()
    print(f"L2RCLIP-Demo (demo CLIP, 64 px), {args.images} demo PNGs (96 px), batch 64, --probabilities, CPU")
    print(machine_line(torch_threads=False))
    print(f"old = {old}")
    print()
    print(
        f"| variant | wall {args.images} img (s) | start-up, 1 img (s) | net images/s | images/s vs old | "
        f"peak MB, {sizes['tenth']} img | peak MB, {args.images} img | peak vs old | CSV = old's |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        print(
            f"| {name} | {median(walls, name, 'all'):.1f} | {median(walls, name, 'one'):.1f} | {rate[name]:.0f} | "
            f"{rate[name] / rate[base]:.2f}x | {median(peaks, name, 'tenth'):.0f} | "
            f"{median(peaks, name, 'all'):.0f} | "
            f"{median(peaks, name, 'all') / median(peaks, base, 'all'):.2f}x | {'yes' if same[name] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
