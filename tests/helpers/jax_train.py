"""A few SGD steps of a small convolutional network with synchronized BN under
``keras.distribution.DataParallel``, as a custom JAX loop (``stateless_call``): run by one
process on its 4 host devices, or by each of 2 ``jax.distributed`` processes (2 devices each;
``python -m tests.helpers.jax_train PROCESS_ID PORT OUT``), which then list the TensorFlow modules
they imported (none).
"""

import sys

import numpy as np

STEPS, BATCH, SHAPE = 3, 16, (6, 6, 3)


def global_batches():
    rng = np.random.RandomState(0)
    # Unequal means per device share: the global statistics differ from each share's.
    offsets = np.repeat(np.arange(4, dtype="float32"), BATCH // 4)[:, None, None, None] * 3.0
    return [((rng.normal(size=(BATCH,) + SHAPE) + offsets).astype("float32"),
             rng.normal(size=(BATCH, 2)).astype("float32")) for _ in range(STEPS)]


def train(rows=slice(None), synchronized=True):
    """Trains on the global batches (this process's ``rows`` of each); returns every weight."""
    import keras


    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu"))
    with distribution.scope():
        return _train(distribution, rows, synchronized)


def _train(distribution, rows, synchronized):
    import jax
    import jax.numpy as jnp
    import keras
    from jax.sharding import NamedSharding, PartitionSpec

    import kerasbn
    from kerasbn.kernels.jax_backend import backend_mesh

    def seeded(seed):
        # The same weights in every process (keras.utils.set_random_seed would import TensorFlow).
        return keras.initializers.GlorotUniform(seed=seed)

    model = keras.Sequential([
        keras.Input(SHAPE), keras.layers.Conv2D(4, 3, use_bias=False, kernel_initializer=seeded(1)),
        kerasbn.BatchNormalization(momentum=0.5, synchronized=synchronized), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, kernel_initializer=seeded(2))])
    sharding = NamedSharding(backend_mesh(distribution.device_mesh), PartitionSpec("batch"))

    def loss(trainable, non_trainable, x, y):
        predicted, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.mean(jnp.square(predicted - y)), non_trainable

    @jax.jit
    def step(trainable, non_trainable, x, y):
        grads, non_trainable = jax.grad(loss, has_aux=True)(trainable, non_trainable, x, y)
        return [w - 0.1 * g for w, g in zip(trainable, grads, strict=True)], non_trainable

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    for x, y in global_batches():
        x, y = (jax.make_array_from_process_local_data(sharding, a[rows], a.shape) for a in (x, y))
        trainable, non_trainable = step(trainable, non_trainable, x, y)
    return {f"w{i}": np.asarray(jax.device_get(w))
            for i, w in enumerate(list(trainable) + list(non_trainable))}


def main(process_id, port, out):
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    half = BATCH // 2
    weights = train(slice(process_id * half, (process_id + 1) * half))
    np.savez(out, **weights)
    # A JAX user's process carries no TensorFlow: kerasbn, its layer and training imported none.
    print("tensorflow modules:", sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
