"""Synchronized BN under real tf.distribute strategies, against float64 numpy.

The scenarios run in fresh processes: logical CPU devices must be set before
TensorFlow initializes, and multi-worker clusters need one process per worker.
The single-step scenarios of one replica count share one process
(``sync_worker.py --batch``), run once per test run, the first time a test asks for one of them.
"""

import json
import sys

import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests.helpers import forkserver, reference
from tests.helpers.distributed import (
    ROOT,
    TIMEOUT,
    _check,
    _env,
    once_per_run,
    run_script,
    run_workers,
)

pytestmark = pytest.mark.slow
EPS = 1e-3

# name: (replicas, sync_worker.py's arguments)
SCENARIOS = {
    "4,4": (2, ["--sizes", "4,4"]),
    "5,3": (2, ["--sizes", "5,3"]),
    "7,0": (2, ["--sizes", "7,0"]),
    "large_mean": (2, ["--sizes", "16,16", "--shape", "8,8", "--loc", "1e4", "--spread", "1", "--momentum", "0"]),
    "unsync": (2, ["--sizes", "4,6", "--layer", "unsync"]),
    "unequal_and_empty": (4, ["--sizes", "5,3,0,4"]),
    "groups_of_two": (4, ["--sizes", "4,2,3,5", "--group-size", "2"]),
    "group_of_three": (4, ["--sizes", "4,4,4,4", "--group-size", "3"]),
    "one_replica": (1, ["--sizes", "6"]),
}


@pytest.fixture(scope="session")
def scenario(tmp_path_factory):
    """``scenario(name)``: that scenario's result; each replica count's batch runs once per test run."""

    def run_batch(replicas, directory):
        batch = {str(directory / f"{n}.npz"): ["--replicas", str(r), *argv]
                 for n, (r, argv) in SCENARIOS.items() if r == replicas}
        (directory / "batch.json").write_text(json.dumps(batch))
        _check(forkserver.run([sys.executable, str(ROOT / "tests" / "helpers" / "sync_worker.py"), "--replicas", str(replicas),
                               "--batch", str(directory / "batch.json")],
                              capture_output=True, text=True, timeout=TIMEOUT, env=_env()),
               f"sync_worker.py --replicas {replicas} --batch")

    def result(name):
        replicas = SCENARIOS[name][0]
        directory = once_per_run(tmp_path_factory, f"sync_{replicas}_replicas",
                                 lambda d: run_batch(replicas, d))
        return dict(np.load(directory / f"{name}.npz"))

    return result


def _global_data(sizes, loc=3.0, spread=2.0, channels=4, shape=(3, 3)):
    from tests.helpers.sync_worker import make_data

    return make_data(sizes, shape, channels, loc, spread)


def _merge(results):
    merged = {}
    for r in results:
        merged.update(r)
    return merged


def _check_against_reference(result, sizes, group_size=None, momentum=0.5, **data):
    xs, dys, gamma, beta = _global_data(sizes, **data)
    k = group_size or len(sizes)
    expected_mean, expected_var = [], []
    for g in range(len(sizes) // k):
        members = range(g * k, (g + 1) * k)
        x = np.concatenate([xs[r] for r in members])
        dy = np.concatenate([dys[r] for r in members])
        y_ref, mu, var = reference.bn_forward(x, -1, gamma, beta, EPS)
        dx_ref, dgamma_ref, dbeta_ref = reference.bn_backward(x, dy, -1, gamma, EPS)
        bounds = np.cumsum([0] + [sizes[r] for r in members])
        for i, r in enumerate(members):
            assert not np.isnan(result[f"y_{r}"]).any()
            np.testing.assert_allclose(result[f"y_{r}"], y_ref[bounds[i]:bounds[i + 1]],
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(result[f"dx_{r}"], dx_ref[bounds[i]:bounds[i + 1]],
                                       rtol=1e-3, atol=1e-4)
        # The optimizer sums the replicas' gradients: the group's sum is its reference.
        np.testing.assert_allclose(sum(result[f"dgamma_{r}"] for r in members), dgamma_ref,
                                   rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(sum(result[f"dbeta_{r}"] for r in members), dbeta_ref,
                                   rtol=1e-4, atol=1e-3)
        m = len(x) * 9
        expected_mean.append((1 - momentum) * mu)
        expected_var.append(momentum + (1 - momentum) * var * m / (m - 1))
    # One consistent set of moving statistics: the mean over groups, on every replica.
    for copy_mean, copy_var in zip(result["moving_mean"], result["moving_variance"], strict=True):
        np.testing.assert_allclose(copy_mean, np.mean(expected_mean, 0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(copy_var, np.mean(expected_var, 0), rtol=1e-4)


@pytest.mark.parametrize("sizes", ["4,4", "5,3", "7,0"])
def test_two_replicas_match_the_global_batch(sizes, scenario):
    result = scenario(sizes)
    _check_against_reference(result, [int(s) for s in sizes.split(",")])
    assert result["collectives_per_replica"] == 2  # one forward, one in the gradient


def test_four_replicas_unequal_and_empty(scenario):
    sizes = [5, 3, 0, 4]
    result = scenario("unequal_and_empty")
    assert result["y_2"].shape == (0, 3, 3, 4)
    _check_against_reference(result, sizes)
    assert result["collectives_per_replica"] == 2


def test_sync_groups_of_two_among_four_replicas(scenario):
    sizes = [4, 2, 3, 5]
    result = scenario("groups_of_two")
    _check_against_reference(result, sizes, group_size=2)


def test_group_size_that_does_not_divide_the_replicas_is_a_clear_error(scenario):
    result = scenario("group_of_three")
    # A ValueError (tf.function prefixes where it was traced).
    assert "sync_group_size=3 must divide the number of replicas in sync (4)" in str(result["error"])
    assert set(result) == {"error"}


def test_one_replica_is_the_local_layer_without_collectives(scenario):
    result = scenario("one_replica")
    _check_against_reference(result, [6])
    assert result["collectives_per_replica"] == 0


def test_outside_a_strategy_no_collective_is_traced():
    layer = kerasbn.SyncBatchNormalization()
    x = tf.random.normal((4, 3, 3, 2))
    fn = tf.function(lambda x: layer(x, training=True))
    ops = {op.type for op in fn.get_concrete_function(x).graph.get_operations()}
    assert not any("Collective" in t for t in ops)
    local = kerasbn.BatchNormalization()
    np.testing.assert_allclose(fn(x), local(x, training=True), rtol=1e-6)


def test_large_channel_mean_keeps_the_variance(scenario):
    """Mean 1e4, std 1: E[x^2] - E[x]^2 in float32 loses the variance entirely."""
    result = scenario("large_mean")
    xs, _, _, _ = _global_data([16, 16], loc=1e4, spread=1.0, shape=(8, 8))
    flat = reference.channels_last(np.concatenate(xs), -1)
    relative = np.abs(result["moving_variance"][0] / flat.var(0, ddof=1) - 1)
    assert relative.max() <= 1e-4, relative


def test_unsynchronized_layers_keep_one_consistent_set_of_statistics(scenario):
    sizes = [4, 6]
    result = scenario("unsync")
    xs, _, _, _ = _global_data(sizes)
    means, variances = [], []
    for x in xs:
        flat = reference.channels_last(x, -1)
        means.append(0.5 * flat.mean(0))
        variances.append(0.5 + 0.5 * flat.var(0, ddof=1))
    for copy_mean, copy_var in zip(result["moving_mean"], result["moving_variance"], strict=True):
        np.testing.assert_allclose(copy_mean, np.mean(means, 0), rtol=1e-5)
        np.testing.assert_allclose(copy_var, np.mean(variances, 0), rtol=1e-5)
    assert result["collectives_per_replica"] == 0


def test_two_workers_on_loopback_match_the_global_batch(tmp_path):
    sizes = [5, 3]
    results = run_workers("sync_worker.py", ["--multi-worker", "--sizes", "5,3"], tmp_path)
    _check_against_reference(_merge(results), sizes)
    assert results[0]["collectives_per_replica"] == 2


@pytest.fixture(scope="session")
def fits(tmp_path_factory):
    """Both builds fitted in one process, once per test run: kerasbn's layer, and Keras' BN converted."""
    directory = once_per_run(tmp_path_factory, "fit", lambda d: run_script(
        "fit_worker.py", ["--replicas", "2", "--out-converted", str(d / "converted.npz")], d))
    return {False: dict(np.load(directory / "result.npz")), True: dict(np.load(directory / "converted.npz"))}


@pytest.mark.parametrize("convert", [False, True])
def test_model_fit_under_mirrored_strategy(convert, fits):
    result = fits[convert]
    assert str(result["layer_type"]) == "SyncBatchNormalization"
    assert np.all(np.isfinite(result["loss"])) and result["loss"][-1] < result["loss"][0]
    copies = result["moving_variance_copies"]
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0], copies[1])
    assert not np.allclose(copies[0], 1.0)  # the statistics did move


def test_model_fit_with_two_workers_on_loopback(tmp_path):
    results = run_workers("fit_worker.py", ["--multi-worker"], tmp_path)
    for r in results:
        assert int(r["replicas"]) == 2
        assert np.all(np.isfinite(r["loss"])) and r["loss"][-1] < r["loss"][0]
    np.testing.assert_allclose(results[0]["moving_variance_copies"],
                               results[1]["moving_variance_copies"], rtol=1e-6)


def test_recalibration_under_mirrored_strategy_uses_global_batches(tmp_path):
    result = run_script("recalibrate_worker.py", [], tmp_path)
    z = result["x"].astype(np.float64) @ result["kernel"].astype(np.float64)
    batches = z.reshape(5, 16, 4)  # global batches of 16, 8 per replica
    np.testing.assert_allclose(result["moving_mean"], batches.mean(1).mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result["moving_variance"], batches.var(1, ddof=1).mean(0), rtol=1e-4)
