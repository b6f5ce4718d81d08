"""Data-parallel training (torchrun + DDP, gloo on the CPU) computes what one process computes.

Bit-identity with one process is impossible: weight gradients are sums over the batch, which one
process reduces in one pass and N processes as N partial sums plus an all-reduce (float addition
is not associative). So the comparisons are to 1e-5 on losses and 1e-6 on weights; a DDP run
resumed after a kill is compared bit for bit with an uninterrupted DDP run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import gather_worker
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.project import SMALL, environment, merge

from l2rclip.config import ConfigError, Params, TrainConfig, from_dict
from l2rclip.data.demo import generate_demo
from l2rclip.locking import exclusive_output
from l2rclip.losses import OrdinalLoss
from l2rclip.stages.prepare import prepare
from l2rclip.stages.preprocess import preprocess
from l2rclip.stages.train import train_fold
from l2rclip.training.distributed import PADDING_LABEL, GlobalBatchSampler, SeededSamples, World, world_size

pytestmark = pytest.mark.timeout(900)


@pytest.mark.parametrize(("n", "batch_size", "size"), [(30, 8, 1), (30, 8, 2), (29, 8, 3), (9, 4, 2), (7, 6, 4)])
def test_ranks_slices_make_up_the_single_process_batches(n, batch_size, size):
    single = list(GlobalBatchSampler(n, batch_size, seed=5))
    per_rank = [list(GlobalBatchSampler(n, batch_size, seed=5, world=World(rank, size))) for rank in range(size)]
    assert [[i for i, _ in batch] for batch in single] == [
        b.tolist() for b in torch.randperm(n, generator=torch.Generator().manual_seed(5)).split(batch_size)
    ]
    for step, batch in enumerate(single):
        slices = [rank_batches[step] for rank_batches in per_rank]
        assert len({len(s) for s in slices}) == 1  # equal shapes for all_gather
        assert [key for s in slices for key in s if key[1]] == batch  # in rank order: the same batch
    assert all(len(batches) == len(single) for batches in per_rank)  # every rank takes every step


class RandomDraws(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.rand(2) + np.random.rand() + random.random(), index


def test_augmentation_depends_on_the_image_not_on_the_process_stream():
    samples = SeededSamples(RandomDraws(), seed=3)
    forward = [samples[(i, True)][0] for i in range(10)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    backward = [samples[(i, True)][0] for i in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generators are untouched
    assert samples[(4, False)][1] == PADDING_LABEL
    assert not torch.equal(SeededSamples(RandomDraws(), seed=4)[(0, True)][0], forward[0])


def test_distributed_settings_are_checked():
    assert world_size(TrainConfig(devices=2, nodes=2, rdzv_endpoint="node0:29400")) == 4
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        world_size(TrainConfig(nodes=2))
    with pytest.raises(ConfigError, match="train.device"):
        world_size(TrainConfig(devices=2, device="cuda:1"))
    with pytest.raises(ConfigError, match="global batch"):
        world_size(TrainConfig(devices=4, batch_size=2))


def test_gathered_loss_and_averaged_gradients_equal_the_whole_batch(tmp_path):
    # The workers live in a small module: spawned processes import it, not this one (MLflow, DVC...).
    torch.multiprocessing.spawn(gather_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)}
    torch.manual_seed(0)
    reference = gather_worker.TinyRanker()
    criterion = OrdinalLoss(torch.arange(5.0).tolist(), **gather_worker.TERMS)
    images, labels = gather_worker.fixed_batch()
    for step, batch in enumerate(gather_worker.STEPS):
        reference.zero_grad()
        loss = criterion(reference(images[batch]), labels[batch])["loss"]
        loss.backward()
        for rank in (0, 1):
            ddp_loss, grads = results[rank][step]
            assert ddp_loss == pytest.approx(loss.item(), abs=1e-6)
            for name, param in reference.named_parameters():
                torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the train stage under torchrun


def stage_params(tmp_path, devices, epochs=3):
    return merge(
        SMALL,
        {
            "data": {"root": str(tmp_path / "demo"), "demo": {"n_per_rank": 8, "image_size": 48}},
            "model": {"arch": "L2RCLIP-Tiny", "pretrained": "none", "fallback": {"epochs": epochs}},
            # 30 training images in batches of 8: 4 steps per epoch, the last one of 6 (3 per rank)
            "train": {"epochs": epochs, "device": "cpu", "batch_size": 8, "devices": devices},
            "tracking": {"enabled": False},
        },
    )


def train_command(params_file, prepared, out):
    return [
        sys.executable,
        "-m",
        "l2rclip.stages.train",
        "--params",
        str(params_file),
        "--fold",
        "0",
        "--prepared",
        str(prepared),
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Prepared demo data and one uninterrupted 2-process training through the stage's command line."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    generate_demo(tmp_path / "demo", n_per_rank=8, image_size=48)
    prepare(from_dict(Params, stage_params(tmp_path, 1)), tmp_path / "prepared")
    params_file = tmp_path / "params-2.yaml"
    params_file.write_text(yaml.safe_dump(stage_params(tmp_path, 2)))
    env = {**environment(tmp_path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        train_command(params_file, tmp_path / "prepared", tmp_path / "two"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, params_file, env, result.stderr


def history(out):
    return json.loads((out / "last/state.json").read_text())["history"]


def test_two_processes_follow_one_process_with_the_whole_batch(ddp_run):
    tmp_path, _, _, log = ddp_run
    assert "launching 1 x 2 training processes" in log
    assert log.count("epoch 1/3") == 1  # rank 0 alone logs
    torch.set_num_threads(1)
    train_fold(from_dict(Params, stage_params(tmp_path, 1)), 0, tmp_path / "prepared", tmp_path / "one")
    one, two = tmp_path / "one", tmp_path / "two"
    for a, b in zip(history(one), history(two), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == (pytest.approx(a[key], abs=1e-5) if isinstance(a[key], float) else a[key]), key
    for name in ("best/model.safetensors", "last/model.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{name} {key}")
    optimizers = [torch.load(out / "last/optimizer.pt", weights_only=True) for out in (one, two)]
    assert optimizers[0]["scheduler"] == optimizers[1]["scheduler"]
    assert optimizers[0]["optimizer"]["param_groups"] == optimizers[1]["optimizer"]["param_groups"]
    torch.testing.assert_close(
        optimizers[1]["optimizer"]["state"], optimizers[0]["optimizer"]["state"], atol=1e-6, rtol=0
    )  # Adam's moments
    for name in ("history.csv", "summary.json"):
        assert (two / name).is_file()


def test_two_processes_on_the_image_store_follow_one_process(ddp_run):
    """The store path shards the same global batches and gives each image the same crop box."""
    tmp_path, params_file, env, _ = ddp_run
    preprocess(from_dict(Params, stage_params(tmp_path, 1)), tmp_path / "prepared", tmp_path / "store")
    command = [
        *train_command(params_file, tmp_path / "prepared", tmp_path / "two-store"),
        "--store",
        str(tmp_path / "store"),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.set_num_threads(1)
    train_fold(
        from_dict(Params, stage_params(tmp_path, 1)),
        0,
        tmp_path / "prepared",
        tmp_path / "one-store",
        tmp_path / "store",
    )
    one, two = tmp_path / "one-store", tmp_path / "two-store"
    for a, b in zip(history(one), history(two), strict=True):
        for key in a:
            assert b[key] == (pytest.approx(a[key], abs=1e-5) if isinstance(a[key], float) else a[key]), key
    a, b = load_file(one / "last/model.safetensors"), load_file(two / "last/model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow  # end to end: the slow tier (make test-all)
def test_ddp_training_killed_after_an_epoch_resumes_to_the_same_weights(ddp_run):
    tmp_path, params_file, env, _ = ddp_run
    resumed = tmp_path / "resumed"
    command = train_command(params_file, tmp_path / "prepared", resumed)
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = resumed / "last" / "state.json"
    deadline = time.monotonic() + 600
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun's agent stops its workers on SIGTERM (a SIGKILL would orphan them: they would finish,
    # holding the output lock, so no second run could interfere meanwhile).
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    killed_at = json.loads(state.read_text())["epoch"]
    assert 1 <= killed_at < 3, "the kill must interrupt training"

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resumed / 'last'} after epoch {killed_at}" in result.stderr, result.stderr
    reference = tmp_path / "two"
    for name in ("best/model.safetensors", "last/model.safetensors", "last/optimizer.pt", "history.csv"):
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
def test_a_ddp_run_on_a_locked_folder_is_refused_by_every_rank(ddp_run):
    tmp_path, params_file, env, _ = ddp_run
    out = tmp_path / "locked"
    with exclusive_output(out):  # as a trainer still running would hold it
        result = subprocess.run(
            train_command(params_file, tmp_path / "prepared", out),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(f"PID {os.getpid()}") >= 2  # rank 0 was refused, rank 1 says the same
    assert not out.exists()
