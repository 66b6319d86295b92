"""Synchronized BN under torch.distributed: gloo processes on loopback, compared with one process on the
concatenated batch (float64 ground truth), as PyTorch's SyncBatchNorm would be. Each rank is a process
of its own (tests/helpers/torch_ddp_worker.py); the test waits for their exit, not on the clock."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import forkserver, reference
from tests.helpers.torch_ddp_worker import SHARES, build_model, global_data, share, train

ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-3


# Every 2-rank scenario in one pair of processes (recalibration last: it imports TensorFlow), and the
# 4-rank one: two interpreter starts per rank in all, not one per scenario.
RUNS = {2: ("shares", "empty", "poisoned", "ddp", "recalibrate"), 4: ("groups",)}
_DONE: dict = {}


@pytest.fixture(scope="module")
def ranks_of(tmp_path_factory):
    """The ranks' files of one scenario (``{name: array}`` per rank); each run happens once."""
    def ranks(scenario, world):
        if world not in _DONE:
            _DONE[world] = run_ranks(tmp_path_factory.mktemp(f"world{world}"), RUNS[world], world)
        directory = _DONE[world]
        return [dict(np.load(directory / f"{scenario}-rank{rank}.npz")) for rank in range(world)]
    return ranks


def run_ranks(tmp_path, scenarios, world):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(KERAS_BACKEND="torch", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # Forked from a server that imported torch and Keras once (tests/helpers/forkserver.py).
    ranks = [forkserver.popen([sys.executable, "-m", "tests.helpers.torch_ddp_worker", str(rank), str(world),
                               str(tmp_path), *scenarios], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    outputs = [rank.communicate(timeout=600) for rank in ranks]  # a hang guard, not a schedule
    for rank, (stdout, stderr) in enumerate(outputs):
        assert ranks[rank].returncode == 0, f"rank {rank}:\n{stderr[-3000:]}"
        for scenario in scenarios:  # recalibration may import it (Keras' get_config): not asserted
            done = f"rank {rank} {scenario} done; imported tensorflow: "
            assert done + "False" in stdout or (scenario == "recalibrate" and done in stdout), stdout
    return tmp_path


def moving_after_two_steps(mean, unbiased_variance):
    """momentum 0.5 from (0, 1), the second batch the first plus 1."""
    return 0.25 * mean + 0.5 * (mean + 1.0), 0.25 + 0.25 * unbiased_variance + 0.5 * unbiased_variance


@pytest.mark.parametrize("scenario", ["shares", "empty"])
def test_synchronized_ranks_equal_one_process_on_the_concatenated_batch(ranks_of, scenario):
    ranks = ranks_of(scenario, 2)
    x, dy = global_data()
    ones = np.ones(4)
    y, mean, variance = reference.bn_forward(x, -1, ones, 0 * ones, EPS)
    dx, dgamma, dbeta = reference.bn_backward(x, dy, -1, ones, EPS)
    np.testing.assert_allclose(np.concatenate([r["sync_y"] for r in ranks]), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([r["sync_dx"] for r in ranks]), dx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(sum(r["sync_dgamma"] for r in ranks), dgamma, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(sum(r["sync_dbeta"] for r in ranks), dbeta, rtol=1e-4, atol=1e-3)
    m = x.size // 4
    expected_mean, expected_variance = moving_after_two_steps(mean, variance * m / (m - 1))
    for r in ranks:  # every rank holds the global batch's statistics: any rank's checkpoint is the truth
        np.testing.assert_array_equal(r["sync_moving_mean"], ranks[0]["sync_moving_mean"])
        np.testing.assert_array_equal(r["sync_moving_variance"], ranks[0]["sync_moving_variance"])
        np.testing.assert_allclose(r["sync_moving_mean"], expected_mean, rtol=1e-5)
        np.testing.assert_allclose(r["sync_moving_variance"], expected_variance, rtol=1e-5)


def test_local_layers_keep_each_ranks_own_statistics(ranks_of):
    ranks = ranks_of("shares", 2)
    x, dy = global_data()
    for rank, r in enumerate(ranks):
        own, own_dy = share(x, SHARES["shares"], rank), share(dy, SHARES["shares"], rank)
        ones = np.ones(4)
        y, mean, variance = reference.bn_forward(own, -1, ones, 0 * ones, EPS)
        dx, _, _ = reference.bn_backward(own, own_dy, -1, ones, EPS)
        np.testing.assert_allclose(r["local_y"], y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(r["local_dx"], dx, rtol=1e-3, atol=1e-4)
        m = own.size // 4
        expected_mean, expected_variance = moving_after_two_steps(mean, variance * m / (m - 1))
        np.testing.assert_allclose(r["local_moving_mean"], expected_mean, rtol=1e-5)
        np.testing.assert_allclose(r["local_moving_variance"], expected_variance, rtol=1e-5)
    assert np.abs(ranks[0]["local_moving_mean"] - ranks[1]["local_moving_mean"]).min() > 0.5


def test_one_ranks_non_finite_batch_leaves_every_ranks_statistics_and_nothing_hangs(ranks_of):
    ranks = ranks_of("poisoned", 2)  # rank 1's share holds an inf at both steps
    for r in ranks:  # the merged statistics are non-finite on every rank: every rank skips, alike
        np.testing.assert_array_equal(r["sync_moving_mean"], np.zeros(4))
        np.testing.assert_array_equal(r["sync_moving_variance"], np.ones(4))
    np.testing.assert_array_equal(ranks[1]["local_moving_mean"], np.zeros(4))
    x, _ = global_data()
    clean = share(x, SHARES["poisoned"], 0).reshape(-1, 4)
    expected_mean, _ = moving_after_two_steps(clean.mean(0), clean.var(0, ddof=1))
    np.testing.assert_allclose(ranks[0]["local_moving_mean"], expected_mean, rtol=1e-5)


def test_ddp_training_equals_one_process_on_the_global_batch(ranks_of):
    ranks = ranks_of("ddp", 2)
    x, _ = global_data()
    targets = np.random.RandomState(2).normal(size=(x.shape[0], 2)).astype("float32")
    model = build_model()
    model(x[:1], training=False)
    train(model, x, targets, model)
    for r in ranks:
        for i, weight in enumerate(model.weights):
            np.testing.assert_allclose(r[f"w{i}"], weight.numpy(), rtol=2e-4, atol=2e-5, err_msg=weight.path)


def test_sync_group_size_merges_within_each_group_of_ranks(ranks_of):
    ranks = ranks_of("groups", 4)
    x, dy = global_data()
    for group in (0, 1):
        members = ranks[2 * group:2 * group + 2]
        part = np.concatenate([share(x, SHARES["groups"], rank) for rank in (2 * group, 2 * group + 1)])
        part_dy = np.concatenate([share(dy, SHARES["groups"], rank) for rank in (2 * group, 2 * group + 1)])
        ones = np.ones(4)
        y, mean, variance = reference.bn_forward(part, -1, ones, 0 * ones, EPS)
        dx, _, _ = reference.bn_backward(part, part_dy, -1, ones, EPS)
        np.testing.assert_allclose(np.concatenate([r["y"] for r in members]), y, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.concatenate([r["dx"] for r in members]), dx, rtol=1e-3, atol=1e-4)
        m = part.size // 4
        for r in members:
            np.testing.assert_allclose(r["moving_mean"], mean, rtol=1e-5)
            np.testing.assert_allclose(r["moving_variance"], variance * m / (m - 1), rtol=1e-5)


def test_recalibration_counts_every_ranks_batches(ranks_of):
    ranks = ranks_of("recalibrate", 2)
    x, _ = global_data()
    steps = [(x * (step + 1)).astype(np.float64).reshape(-1, 4) for step in range(3)]  # both ranks' shares
    for r in ranks:
        np.testing.assert_allclose(r["moving_mean"], np.mean([s.mean(0) for s in steps], 0), rtol=1e-5)
        np.testing.assert_allclose(r["moving_variance"], np.mean([s.var(0, ddof=1) for s in steps], 0), rtol=1e-4)


def test_without_a_process_group_synchronized_is_the_local_layer():
    assert not torch.distributed.is_initialized()
    x, dy = global_data()
    import kerasbn

    layer = kerasbn.SyncBatchNormalization(momentum=0.0)
    y = layer(x, training=True)
    expected, _, _ = reference.bn_forward(x, -1, np.ones(4), np.zeros(4), EPS)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
