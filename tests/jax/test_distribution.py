"""Statistics under JAX's distribution, exactly as the arguments say.

Under ``keras.distribution.DataParallel`` over 4 devices (XLA host devices), each device's
share of the batch has its own mean, so the global batch's statistics, each device's and each
pair's are three different things; each mode must equal the one-device computation on its
slices. Then: the collectives XLA compiles per layer, ``shard_map`` with ``axis_name``, and
two ``jax.distributed`` processes on loopback against one process on the global batch.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import kerasbn
from kerasbn.kernels.jax_backend import backend_mesh
from tests.helpers import jax_train, reference
from tests.helpers.ports import reserve_ports

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 4
SHAPE = (16, 3, 5)  # 4 rows per device


def _distribution():
    devices = keras.distribution.list_devices("cpu")
    assert len(devices) == DEVICES, devices
    return keras.distribution.DataParallel(devices=devices)


def _data(seed=0):
    rng = np.random.RandomState(seed)
    offsets = np.repeat(np.arange(DEVICES, dtype="float32"), SHAPE[0] // DEVICES)[:, None, None]
    x = (rng.normal(size=SHAPE) * (1 + offsets) + 10 * offsets).astype("float32")
    return x, rng.normal(size=SHAPE).astype("float32")


def _training_step(layer, distribution, x, dy):
    """``(y, new moving statistics, dx, dgamma, dbeta)`` of one jitted step, inputs sharded if
    ``distribution``."""
    def loss(trainable, non_trainable, x, dy):
        y, non_trainable = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(y * dy), (y, non_trainable)

    step = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    if distribution is not None:
        sharding = NamedSharding(backend_mesh(distribution.device_mesh), PartitionSpec("batch"))
        x, dy = jax.device_put(x, sharding), jax.device_put(dy, sharding)
        with distribution.scope():
            (dweights, dx), (y, stats) = step(trainable, non_trainable, x, dy)
    else:
        (dweights, dx), (y, stats) = step(trainable, non_trainable, x, dy)
    return [np.asarray(t) for t in (y, *stats, dx, *dweights)]


def _layer(**arguments):
    gamma = keras.initializers.RandomUniform(0.5, 1.5, seed=1)  # away from 0: outputs of scale 1
    layer = kerasbn.BatchNormalization(momentum=0.0, gamma_initializer=gamma, **arguments)
    layer.build(SHAPE)
    return layer


MODES = {"synchronized": ({"synchronized": True}, 1), "per_device": ({}, 4),
         "pairs": ({"synchronized": True, "sync_group_size": 2}, 2)}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_data_parallel_statistics_are_what_the_arguments_say(mode):
    arguments, groups = MODES[mode]
    x, dy = _data()
    layer = _layer(**arguments)
    y, moving_mean, moving_variance, dx, dgamma, dbeta = _training_step(layer, _distribution(), x, dy)

    # The one-device computation on each group's slice, with the same weights.
    alone = _layer()
    alone.set_weights(layer.get_weights())
    parts = [_training_step(alone, None, xs, dys)
             for xs, dys in zip(np.split(x, groups), np.split(dy, groups), strict=True)]
    expected_y, expected_dx = (np.concatenate([p[i] for p in parts]) for i in (0, 3))
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-5, atol=1e-5)
    # The moving statistics average the groups' (a tf.distribute MEAN aggregation would too).
    np.testing.assert_allclose(moving_mean, np.mean([p[1] for p in parts], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(moving_variance, np.mean([p[2] for p in parts], 0), rtol=1e-5)
    np.testing.assert_allclose(dgamma, np.sum([p[4] for p in parts], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbeta, np.sum([p[5] for p in parts], 0), rtol=1e-5, atol=1e-5)
    # The modes cannot be confused: normalized by the other groupings (float64), other outputs.
    gamma, beta = (np.asarray(w, np.float64) for w in layer.get_weights()[:2])
    for other in {1, 2, 4} - {groups}:
        y_other = np.concatenate([reference.bn_forward(xs, -1, gamma, beta, layer.epsilon)[0]
                                  for xs in np.split(x, other)])
        assert np.abs(y_other - y).max() > 0.1


def _collectives(text):
    return re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                      r"(?:-start)?\(", text)


def _compiled_collectives(layer, distribution):
    x, dy = _data()
    sharding = NamedSharding(backend_mesh(distribution.device_mesh), PartitionSpec("batch"))
    x, dy = jax.device_put(x, sharding), jax.device_put(dy, sharding)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(trainable, x):
        return layer.stateless_call(trainable, non_trainable, x, training=True)

    def loss(trainable, x):
        y, new = forward(trainable, x)
        return jnp.sum(y * dy), new

    with distribution.scope():
        compiled = [jax.jit(f).lower(trainable, x).compile().as_text()
                    for f in (forward, jax.grad(loss, argnums=(0, 1), has_aux=True))]
    return [_collectives(text) for text in compiled]


def test_collectives_per_layer_in_the_compiled_step():
    """docs/design.md quotes these counts (TensorFlow: 2 per synchronized layer). XLA decides the
    exact count: JAX 0.10's compiles 1 all-gather forward and 1 all-reduce in the step (BN's
    backward sums with dgamma, dbeta), JAX 0.7's 2 and 4; always fewer than Keras' layer."""
    distribution = _distribution()
    keras_layer = keras.layers.BatchNormalization()
    keras_layer.build(SHAPE)
    keras_forward, keras_step = _compiled_collectives(keras_layer, distribution)
    assert set(keras_forward) == {"all-reduce"}  # global statistics, reduced by XLA
    forward, step = _compiled_collectives(_layer(synchronized=True), distribution)
    assert set(forward) == {"all-gather"}  # the (N, 3, C) table gathered, merged on every device
    assert len(step) < len(keras_step)
    if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 10):
        assert forward == ["all-gather"] and sorted(step) == ["all-gather", "all-reduce"]
    forward, step = _compiled_collectives(_layer(), distribution)
    assert "all-gather" not in forward + step  # each device its own: the averages' and guard's only
    assert len(step) <= len(keras_step)


def test_shard_map_synchronizes_over_axis_name():
    x, dy = _data()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("devices",))
    mapped = _layer(synchronized=True, axis_name="devices")
    trainable = [v.value for v in mapped.trainable_variables]
    non_trainable = [v.value for v in mapped.non_trainable_variables]

    def per_device(trainable, x, dy):
        def loss(trainable, x):
            y, new = mapped.stateless_call(trainable, non_trainable, x, training=True)
            return jnp.sum(y * dy), (y, new)
        (dweights, dx), (y, new) = jax.grad(loss, argnums=(0, 1), has_aux=True)(trainable, x)
        dweights = jax.lax.psum(dweights, "devices")  # the weights' gradient, as a DP loop sums it
        return y, new, dx, dweights

    spec, batch = PartitionSpec(), PartitionSpec("devices")
    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, batch, batch),
                                out_specs=(batch, spec, batch, spec), check_vma=False))
    y, (moving_mean, moving_variance), dx, dweights = run(trainable, x, dy)

    alone = _layer()
    alone.set_weights(mapped.get_weights())
    expected = _training_step(alone, None, x, dy)
    for got, want in zip([y, moving_mean, moving_variance, dx, *dweights], expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_what_cannot_be_split_is_a_clear_error():
    distribution = _distribution()
    with distribution.scope():
        with pytest.raises(ValueError, match="splits the batch over 4 devices; received a batch of 6"):
            kerasbn.BatchNormalization()(np.ones((6, 3), "float32"), training=True)
        with pytest.raises(ValueError, match="sync_group_size=3 must divide the number of devices"):
            kerasbn.BatchNormalization(synchronized=True, sync_group_size=3)(
                np.ones((8, 3), "float32"), training=True)


def test_model_fit_under_data_parallel_trains_with_synchronized_statistics():
    distribution = _distribution()
    x, _ = _data()
    with distribution.scope():
        model = keras.Sequential([keras.Input(SHAPE[1:]),
                                  kerasbn.SyncBatchNormalization(momentum=0.0, center=False, scale=False),
                                  keras.layers.Flatten(), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.0), "mse")
        model.fit(x, np.zeros((16, 1)), batch_size=16, epochs=1, verbose=0, shuffle=False)
    flat = x.reshape(-1, SHAPE[-1]).astype(np.float64)
    np.testing.assert_allclose(model.layers[0].moving_mean, flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.layers[0].moving_variance, flat.var(0, ddof=1), rtol=1e-5)


@pytest.mark.slow
def test_two_jax_processes_on_loopback_match_one_process_on_the_global_batch(tmp_path):
    (port,) = reserve_ports(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(KERAS_BACKEND="jax", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
                         " --xla_llvm_disable_expensive_passes=true")  # as this session (conftest.py)
    # Output to files: a pipe read after the other process's would fill and block that process
    # while its peer waits for it at JAX's shutdown barrier.
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "tests.helpers.jax_train", str(i), str(port),
                                 str(tmp_path / f"process{i}.npz")], env=env, cwd=ROOT,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)
               for i, log in enumerate(logs)]
    for worker in workers:
        worker.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for output in outputs:  # fresh interpreters: import kerasbn, build, train - no TensorFlow
        assert "tensorflow modules: []" in output.splitlines(), output[-2000:]
    one_process = jax_train.train()
    unsynchronized = jax_train.train(synchronized=False)
    for i in range(2):
        weights = np.load(tmp_path / f"process{i}.npz")
        assert sorted(weights.files) == sorted(one_process)
        for name, value in one_process.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    assert max(np.abs(unsynchronized[k] - one_process[k]).max() for k in one_process) > 1e-3
