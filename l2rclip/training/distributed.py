"""Data-parallel training over several processes (torchrun + DDP) that computes what one process does.

`train.devices` (processes per node) x `train.nodes` > 1 makes the train stage relaunch itself under
`torch.distributed.run` (torchrun): standalone on one node, a c10d rendezvous at `train.rdzv_endpoint`
across nodes. `train.batch_size` stays the *global* batch B, the batch the losses see; each of the
N processes loads about B/N of it. The design goal is that N processes follow the trajectory of one
process with batch B (same seed -> same global batches, same losses, same updates):

- Order: `GlobalBatchSampler` draws the one permutation a single process draws (`torch.randperm`
  seeded by the epoch seed), cuts it into the same global batches of B and hands rank r the r-th
  contiguous slice of each (`tensor_split`), so the ranks' slices concatenated in rank order are
  the single-process batch. Slices are padded to equal length (all_gather needs equal shapes) with
  rows labelled -1 that are dropped after gathering; a last batch smaller than N works too.
- Augmentation: `SeededSamples` runs each sample's transform under generators seeded by (epoch
  seed, image index), so an image's random crop does not depend on which process, worker or batch
  position loads it (for one process too: `num_workers` no longer changes the numbers).
- Losses: `kl_t2i` (softmax over the batch's images), the ordinal weights of `cop` (normalised by
  the batch's max distance), `cop_batch`, `supcon` and CORN's conditional subsets are not sums over
  images, so a loss per sub-batch would be another objective. Each rank encodes only its slice;
  `gather_batch` all-gathers the per-image outputs (features, logits) *with gradient* and every rank
  computes the loss of the whole global batch, identically. The prototypes (text side) are
  computed on every rank from the same parameters. Backward: every rank holds the same loss of the
  same gathered tensor, so the gradients all N ranks would send to one slice are equal; their sum
  is N times the local one (what `torch.distributed.nn.all_gather` computes with a collective, here
  without one). DDP then averages: image-tower gradients become the sum over slices, exactly the
  one-process gradient, and the (identical) prompt gradients stay what they are. DDP all-reduces
  during `backward()`, so `clip_grad_norm_` afterwards clips the synchronised gradients.
- Phases on cached features (two-stage stage 1, frozen tower) have no image tower to split: every
  rank runs the whole global batch, the gradients are identical and DDP's average leaves them so.
- Rank 0 alone validates (the result is broadcast, so every rank keeps the same history and best
  epoch), writes checkpoints, history, timings and MLflow, and logs; rank 0 takes the output lock
  and tells the others whether it got it. So the lock lives as long as the process that writes:
  torchrun stops its workers on SIGINT/SIGTERM, but a SIGKILL of the launcher leaves them running
  to the end, and a second run is refused meanwhile. Resuming: rank 0 decides (`find_state`),
  every rank restores the same `last/` (multi-node: keep the output folder on a filesystem every
  node sees).

Not bit-identical to one process: weight gradients are sums over the batch's images, which one
process computes in one reduction and N processes as N partial sums plus an all-reduce; float
addition is not associative, so the two differ in the last bits (about 1e-7 relative; the tests
bound the drift over several steps). BatchNorm towers (open_clip ResNets) normalise per process and
are not equivalent; the ViT towers (LayerNorm) are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from l2rclip.config import ConfigError, TrainConfig
from l2rclip.locking import OutputLockedError, exclusive_output

log = logging.getLogger(__name__)

PADDING_LABEL = -1
# Rank 0 validates while the others wait in the next collective: generous for a large validation split.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
# Per-image outputs are gathered across ranks; these are the same on every rank and stay local.
SHARED_OUTPUTS = ("text_features", "logit_scale")


@dataclass(frozen=True)
class World:
    """The place of a process among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes, tracks and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1

    @classmethod
    def from_environment(cls) -> World:
        """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for alone)."""
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = World()


def world_size(train: TrainConfig) -> int:
    """How many training processes `train` asks for, with its settings checked."""
    for key in ("devices", "nodes"):
        if getattr(train, key) < 1:
            raise ConfigError(f"'train.{key}': expected an integer >= 1, found {getattr(train, key)}")
    if train.nodes > 1 and not train.rdzv_endpoint:
        raise ConfigError(
            f"'train.rdzv_endpoint': train.nodes is {train.nodes}, so the nodes need a "
            "rendezvous: expected host:port of a machine every node reaches, found null"
        )
    size = train.devices * train.nodes
    if size > 1 and train.device.startswith("cuda:"):
        raise ConfigError(
            f"'train.device': {train.device!r} names one GPU but train.devices x nodes is {size}; "
            "expected auto, cuda or cpu (each process takes cuda:LOCAL_RANK)"
        )
    if size > 1 and train.batch_size < size:
        raise ConfigError(
            f"'train.batch_size': {train.batch_size} is the global batch, split over {size} "
            f"processes; expected at least {size}"
        )
    return size


def launched() -> bool:
    """Whether this process is a torchrun worker (then it trains; otherwise it may launch)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_arguments(train: TrainConfig, module: str, argv: Sequence[str], run_id: str) -> list[str]:
    """The torchrun command line for `python -m module argv` on devices x nodes processes."""
    args = ["--nnodes", str(train.nodes), "--nproc-per-node", str(train.devices), "--max-restarts", "0"]
    if train.nodes == 1:
        args.append("--standalone")
    else:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(train.rdzv_endpoint), "--rdzv-id", run_id]
    return [*args, "--module", module, *argv]


def launch(train: TrainConfig, module: str, argv: Sequence[str]) -> int:
    """Run `python -m module argv` under torchrun in this process (the elastic agent); its exit status.

    The rendezvous id is derived from the arguments, so the same command on every node joins the
    same run. A failed worker's own error is on stderr already; this returns its exit status.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    run_id = "l2rclip-" + hashlib.sha256("\0".join([module, *argv]).encode()).hexdigest()[:12]
    arguments = torchrun_arguments(train, module, argv, run_id)
    log.info("launching %d x %d training processes: torchrun %s", train.nodes, train.devices, " ".join(arguments))
    try:
        run(parse_args(arguments))
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code and code > 0), 1)
    return 0


def worker_device(name: str, world: World) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK on GPUs, else the CPU (`auto` prefers CUDA)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"'train.device' is {name!r} but CUDA is not available here; use auto or cpu")
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The collective backend for the training processes (NCCL on GPUs, gloo on the CPU), then torn down."""
    if not world.distributed:
        yield
        return
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def main_process_lock(folder: Path, world: World) -> Iterator[None]:
    """`exclusive_output(folder)` held by rank 0 only; every rank fails with its message when refused."""
    if not world.distributed:
        with exclusive_output(folder):
            yield
        return
    refused: str | None = None
    with ExitStack() as stack:
        if world.is_main:
            try:
                stack.enter_context(exclusive_output(folder))
            except OutputLockedError as error:
                refused = str(error)
        refused = world.broadcast(refused)
        if refused:
            raise OutputLockedError(refused)
        yield


def wrap(model: torch.nn.Module, device: torch.device, world: World) -> torch.nn.Module:
    """The model under DDP (gradients averaged during backward), or itself alone.

    Built per phase, after the phase has set which parameters train (DDP registers those once).
    Buffers are synchronised once, at construction, not before every forward: nothing updates them
    in a training forward, and L2RCLIP replaces its prototype cache buffer when switching modes.
    """
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
    )


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` in the epoch seeded by `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class LabelledImages(Protocol):
    """A map-style dataset of (image, label) with a length (`l2rclip.data.dataset.RankImageDataset`)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class SeededSamples(Dataset[tuple[torch.Tensor, int]]):
    """A dataset whose item `(index, real)` is drawn under generators seeded by (seed, index).

    torch, numpy and `random` are seeded for the transform and restored afterwards, so augmentation
    depends on the image and the epoch only. `real=False` marks padding: the label becomes -1.
    """

    def __init__(self, dataset: LabelledImages, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, real = key
        seed = sample_seed(self.seed, index)
        numpy_state, python_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            try:
                image, label = self.dataset[index]
            finally:
                np.random.set_state(numpy_state)
                random.setstate(python_state)
        return image, label if real else PADDING_LABEL


def rank_positions(batch_size: int, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of a global batch of `batch_size` that this rank loads, and which are real.

    Rank r takes the r-th contiguous slice (`tensor_split`: the first slices are the longest),
    padded with position 0 to the longest slice's length. Anything drawn per image for the whole
    batch from a shared generator (e.g. crop boxes) is drawn for all `batch_size` images on every
    rank and indexed with these positions, so each image gets what one process would give it.

    Returns:
        positions (width,) int64 and real (width,) bool, width = ceil(batch_size / world.size).
    """
    slices = torch.arange(batch_size).tensor_split(world.size)
    mine, pad = slices[world.rank], len(slices[0]) - len(slices[world.rank])
    real = torch.cat([torch.ones(len(mine), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    return torch.cat([mine, mine.new_zeros(pad)]), real


class GlobalBatchSampler(Sampler[list[tuple[int, bool]]]):
    """A rank's slice of each global batch of the seeded permutation, as `(index, real)` keys.

    Global batches: `torch.randperm(n)` from a generator seeded with `seed`, cut into chunks of
    `batch_size` (the last one shorter); rank r gets the images at its `rank_positions`, the
    padding as `(first index of the batch, False)`.
    """

    def __init__(self, n: int, batch_size: int, seed: int, world: World = SINGLE):
        self.n, self.batch_size, self.seed, self.world = n, batch_size, seed, world

    def set_seed(self, seed: int) -> None:
        """Draw the next pass from `seed` (one loader, with persistent workers, serves every epoch)."""
        self.seed = seed

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def global_sizes(self) -> list[int]:
        """The size of each global batch of a pass, in order (the last one may be shorter)."""
        return [min(self.batch_size, self.n - start) for start in range(0, self.n, self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))  # (n,)
        for batch in order.split(self.batch_size):
            positions, real = rank_positions(len(batch), self.world)
            yield [(int(batch[p]), bool(r)) for p, r in zip(positions, real, strict=True)]


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 whose backward assumes every rank computes the same loss of the result."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:  # ctx: autograd's context
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.size, ctx.rows = rank, size, tensor.shape[0]
        return torch.cat(parts)  # (size * rows, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # The N ranks' gradients for this slice are equal; their sum is N times this rank's.
        mine = grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
        return mine * ctx.size, None, None


def gather_batch(
    outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, world: World
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The global batch's outputs and labels on every rank, in global order, padding dropped.

    Args:
        outputs: this rank's model outputs; per-image ones (B/N, ...) are gathered with gradient,
            `SHARED_OUTPUTS` (prototypes, (M, E)) are the same on every rank and kept.
        labels: (B/N,) rank indices of this rank's slice, -1 on padding rows.
        world: this process's rank among `world.size` (a process group is initialised).
    """
    parts = [torch.empty_like(labels) for _ in range(world.size)]
    dist.all_gather(parts, labels.contiguous())
    every = torch.cat(parts)  # (N * B/N,)
    real = every != PADDING_LABEL
    gathered = {
        key: value if key in SHARED_OUTPUTS else _GatherRows.apply(value, world.rank, world.size)[real]
        for key, value in outputs.items()
    }
    return gathered, every[real]
