"""Wall time and peak memory of every DVC pipeline stage on the demo set, in a scratch clone.

Clones the repository (its committed HEAD) into a temporary folder, optionally overrides a few
params in the clone's params.yaml, and runs each stage in pipeline order, `demo -> prepare ->
train@k -> evaluate@k -> report`, either with the stage's own command from dvc.yaml (default:
measures the stage itself) or with `dvc repro --single-item <stage>` (`--dvc`: adds DVC's
hashing and caching, as `dvc repro` does). The environment is the offline one of `make demo`:
HF_HUB_OFFLINE=1 (so training falls back to the small random backbone and says so), MLflow on a
SQLite file in the temporary folder, the virtual environment's bin first on PATH.

Peak memory is the child's maximum resident set from os.wait4 (which covers the processes it
waited for, e.g. the stage under `dvc repro`). This script does not import torch, so the floor
every child inherits in ru_maxrss from its parent (Linux keeps it across exec) stays small.

`--simulated-clip ARCH/TAG` measures a connected user's machine without a network: random weights
of ARCH are written where open_clip looks for TAG's (a private Hugging Face cache in the temporary
folder, tests/support/simulated_hub.py), so the real tag path runs (cache lookup, QuickGELU, the
tag's preprocessing) and `model.image_tower: auto` sees a real CLIP. `--whole` runs what `make
demo` runs, `l2rclip demo --no-push`, as one command, and times each stage from DVC's
"Running stage" lines as they stream.

    python benchmarks/pipeline_stages.py                 # all folds of params.yaml (~4 min, 2 quiet CPU cores)
    python benchmarks/pipeline_stages.py --folds 0       # one fold
    python benchmarks/pipeline_stages.py --folds 0 --dvc # through dvc repro --single-item
    python benchmarks/pipeline_stages.py --simulated-clip ViT-B-16/openai --whole  # make demo with CLIP weights
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchmark_utils import machine_line

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def stage_commands(repo: Path, folds: list[int]) -> list[tuple[str, str]]:
    """(name, command) for every stage of dvc.yaml in file order, `foreach` stages expanded per fold."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    commands = []
    for name, stage in stages.items():
        if "foreach" in stage:
            commands += [(f"{name}@{fold}", stage["do"]["cmd"].replace("${item}", str(fold))) for fold in folds]
        else:
            commands.append((name, stage["cmd"]))
    return commands


def run_measured(command: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, float, float]:
    """Run `command`; return (exit code, wall seconds, peak resident set of the child in MB)."""
    with log.open("w", encoding="utf-8") as out:
        tick = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - tick
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # reaped here; keeps Popen from waiting again
    return code, wall, usage.ru_maxrss / 1024  # KiB on Linux


def simulate_clip(arch_tag: str, home: Path) -> Path:
    """Random `arch` weights where open_clip finds `tag`'s, in a private Hugging Face cache at `home`."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.simulated_hub import SimulatedHub  # imports torch: after the import-floor reference

    arch, _, tag = arch_tag.partition("/")
    (home / "hub").mkdir(parents=True)
    return SimulatedHub(home).add(arch, tag)


def run_whole(
    argv: list[str], cwd: Path, env: dict, log: Path
) -> tuple[int, float, float, list[tuple[str, float]]]:
    """Run `argv` (e.g. `l2rclip demo`); also time each DVC stage from its "Running stage" line to the next."""
    marks: list[tuple[str, float]] = []
    with log.open("w", encoding="utf-8") as out:
        tick = time.perf_counter()
        process = subprocess.Popen(  # unbuffered: DVC's lines must arrive when it writes them
            argv,
            cwd=cwd,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.perf_counter() - tick))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - tick
    process.returncode = code = os.waitstatus_to_exitcode(status)
    ends = [at for _, at in marks[1:]] + [wall]
    stages = [(name, end - at) for (name, at), end in zip(marks, ends, strict=True)]
    stages.append(("(CPU seconds of the whole run: user + system)", usage.ru_utime + usage.ru_stime))
    return code, wall, usage.ru_maxrss / 1024, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="repository to clone (default: this one)")
    parser.add_argument("--folds", help="comma-separated folds to run (default: `folds` of params.yaml)")
    parser.add_argument("--n-per-rank", type=int, help="override data.demo.n_per_rank (default: params.yaml)")
    parser.add_argument(
        "--epochs", type=int, help="override model.fallback.epochs, the epochs of the offline fallback backbone"
    )
    parser.add_argument("--dvc", action="store_true", help="run each stage as `dvc repro --single-item`")
    parser.add_argument(
        "--simulated-clip",
        metavar="ARCH/TAG",
        help="random weights in a private Hugging Face cache under TAG's file names, e.g. ViT-B-16/openai",
    )
    parser.add_argument("--whole", action="store_true", help="run `l2rclip demo --no-push` (make demo) as one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed) for inspection")
    args = parser.parse_args()
    start = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix="l2rclip-pipeline-"))
    repo = tmp / "repo"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }
    try:
        subprocess.run(["git", "clone", "-q", str(args.repo), str(repo)], check=True, env=env)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True, env=env, capture_output=True, text=True
        ).stdout.strip()
        params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
        overrides = {}
        if args.folds is not None:
            overrides["folds"] = params["folds"] = [int(f) for f in args.folds.split(",")]
        if args.n_per_rank is not None:
            overrides["data.demo.n_per_rank"] = params["data"]["demo"]["n_per_rank"] = args.n_per_rank
        if args.epochs is not None:
            overrides["model.fallback.epochs"] = params["model"]["fallback"]["epochs"] = args.epochs
        if overrides:
            (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        logs = tmp / "logs"
        logs.mkdir()
        rows = []
        python = shutil.which("python", path=env["PATH"]) or sys.executable
        _, wall, peak = run_measured(
            [python, "-c", "import torch, open_clip, mlflow"], repo, env, logs / "imports.log"
        )
        reference = ("(reference: python -c 'import torch, open_clip, mlflow')", wall, peak, 0)
        if args.simulated_clip:
            home = tmp / "hf_home"
            tick = time.perf_counter()
            weights = simulate_clip(args.simulated_clip, home)
            print(
                f"# simulated {args.simulated_clip}: {weights} in {time.perf_counter() - tick:.0f} s", flush=True
            )
            env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"))
        commands = [] if args.whole else stage_commands(repo, list(params["folds"]))
        if args.whole:
            demo = shutil.which("l2rclip", path=env["PATH"]) or "l2rclip"
            code, wall, peak, stages = run_whole([demo, "demo", "--no-push"], repo, env, logs / "demo.log")
            rows += [(name, seconds, float("nan"), 0) for name, seconds in stages]
            rows.append(("l2rclip demo --no-push (whole; peak of all)", wall, peak, code))
            if code != 0:
                print(f"l2rclip demo failed with exit code {code}; log: {logs / 'demo.log'}", file=sys.stderr)
                args.keep = True
        for name, command in commands:
            argv = ["dvc", "repro", "--single-item", name] if args.dvc else shlex.split(command)
            argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
            code, wall, peak = run_measured(argv, repo, env, logs / f"{name.replace('@', '_')}.log")
            rows.append((name, wall, peak, code))
            if code != 0:
                print(
                    f"stage {name} failed with exit code {code}; log: {logs / name.replace('@', '_')}.log",
                    file=sys.stderr,
                )
                args.keep = True
                break
        fallback = "NOT CLIP" in "".join(
            p.read_text(encoding="utf-8", errors="replace")
            for p in [*logs.glob("train_*.log"), *logs.glob("demo.log")]
        )
    finally:
        if args.keep:
            print(f"# kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    mode = (
        "l2rclip demo --no-push"
        if args.whole
        else "dvc repro --single-item <stage>"
        if args.dvc
        else "the stage commands of dvc.yaml"
    )
    print(
        f"# clone of {args.repo} at {commit}; params.yaml of the clone"
        + (f" with {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else "")
        + f"; run as {mode}; HF_HUB_OFFLINE=1"
        + (f"; simulated CLIP weights {args.simulated_clip} (random)" if args.simulated_clip else "")
        + ("; training used the offline fallback backbone (NOT CLIP)" if fallback else "")
    )
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"# {machine_line(torch_threads=False)}; {time.perf_counter() - start:.0f} s in all; "
        f"this script's own peak {own:.0f} MB (a floor under every child's peak)"
    )
    print("| stage | wall s | peak MB |")
    print("|---|---|---|")
    for name, wall, peak, code in rows:
        memory = "" if math.isnan(peak) else f"{peak:.0f}"  # per-stage rows of --whole have none
        print(f"| {name}{'' if code == 0 else f' (exit {code})'} | {wall:.1f} | {memory} |")
    if not args.whole:
        print(f"| total | {sum(r[1] for r in rows):.1f} | {max(r[2] for r in rows):.0f} (max) |")
    print(f"| {reference[0]} | {reference[1]:.1f} | {reference[2]:.0f} |")


if __name__ == "__main__":
    main()
