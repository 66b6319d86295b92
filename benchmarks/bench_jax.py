"""kerasbn on Keras' JAX backend against Keras' own BatchNormalization, in one process.

Three measurements, each a jitted training step (forward, backward, SGD update and the
moving-statistics update, through ``stateless_call`` as Keras' JAX trainer runs it), the
candidates alternating round by round (``common.time_alternating``), medians reported:

1. one layer, training step, several shapes;
2. a small convolutional network (4 conv-BN-ReLU blocks, 32 x 16 x 16 x 3 batches);
3. the same network under ``keras.distribution.DataParallel`` over 4 XLA host devices:
   kerasbn synchronized (the global batch), kerasbn per device, Keras' (global: XLA makes its
   reductions cross-device).

Ratios are kerasbn / Keras (below 1: kerasbn faster).

    .venv/bin/python benchmarks/bench_jax.py [--repeats 20] [--devices 4] [--json PATH]

On a GPU machine (the JAX image of ``device``) it measures the same on the GPU; --devices 1
skips the data-parallel part where only one accelerator exists.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "jax"
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np
    from common import markdown_table, time_alternating
    from jax.sharding import NamedSharding, PartitionSpec

    import kerasbn
    from kerasbn.kernels.jax_backend import backend_mesh

    def make_bn(kind):
        if kind == "keras":
            return keras.layers.BatchNormalization()
        return kerasbn.BatchNormalization(synchronized=kind == "kerasbn sync")

    def training_step(model, x, y):
        def loss(trainable, non_trainable):
            out, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return jnp.mean(jnp.square(out - y)), non_trainable

        @jax.jit
        def step(trainable, non_trainable):
            grads, non_trainable = jax.grad(loss, has_aux=True)(trainable, non_trainable)
            return [w - 0.01 * g for w, g in zip(trainable, grads, strict=True)], non_trainable

        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])

        def run():
            jax.block_until_ready(step(*state))
        return run

    rng = np.random.RandomState(0)
    report = {"machine": _cpu_model(), "jax": jax.__version__, "keras": keras.__version__,
              "device": str(jax.devices()[0].device_kind), "layer": [], "network": [], "data_parallel": []}

    # 1. One layer.
    rows = []
    for shape in [(64, 28, 28, 64), (32, 16, 16, 64), (256, 1024), (64, 256)]:
        x = jnp.asarray(rng.normal(size=shape).astype("float32"))
        candidates = {}
        for kind in ("kerasbn", "keras"):
            model = keras.Sequential([keras.Input(shape[1:]), make_bn(kind)])
            candidates[kind] = training_step(model, x, x)
        times = time_alternating(candidates, repeats=args.repeats)
        ratio = times["kerasbn"] / times["keras"]
        report["layer"].append({"shape": shape, **times, "ratio": ratio})
        rows.append([shape, f"{times['kerasbn'] * 1e3:.3f}", f"{times['keras'] * 1e3:.3f}", f"{ratio:.2f}"])
    print("One layer, training step (ms):")
    print(markdown_table(["shape", "kerasbn", "Keras", "kerasbn / Keras"], rows))

    # 2. A small network.
    def network(kind):
        layers = [keras.Input((16, 16, 3))]
        for filters in (16, 32, 32, 64):
            layers += [keras.layers.Conv2D(filters, 3, padding="same", use_bias=False), make_bn(kind),
                       keras.layers.ReLU()]
        layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
        keras.utils.set_random_seed(0)
        return keras.Sequential(layers)

    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    y = rng.normal(size=(32, 10)).astype("float32")
    times = time_alternating({kind: training_step(network(kind), jnp.asarray(x), jnp.asarray(y))
                              for kind in ("kerasbn", "keras")}, repeats=args.repeats, inner=3)
    ratio = times["kerasbn"] / times["keras"]
    report["network"].append({**times, "ratio": ratio})
    print("\nNetwork (4 conv-BN-ReLU blocks, batch 32 x 16 x 16 x 3), training step (ms):")
    print(markdown_table(["kerasbn", "Keras", "kerasbn / Keras"],
                         [[f"{times['kerasbn'] * 1e3:.2f}", f"{times['keras'] * 1e3:.2f}", f"{ratio:.2f}"]]))

    # 3. Data parallel.
    devices = keras.distribution.list_devices()
    if args.devices > 1 and len(devices) >= args.devices:
        distribution = keras.distribution.DataParallel(devices=devices[:args.devices])
        sharding = NamedSharding(backend_mesh(distribution.device_mesh), PartitionSpec("batch"))
        xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
        with distribution.scope():
            candidates = {kind: training_step(network(kind), xs, ys)
                          for kind in ("kerasbn sync", "kerasbn", "keras")}
            times = time_alternating(candidates, repeats=args.repeats, inner=3)
        report["data_parallel"].append({"devices": args.devices, **times})
        print(f"\nNetwork under DataParallel over {args.devices} devices, training step (ms):")
        print(markdown_table(
            ["kerasbn synchronized", "kerasbn per device", "Keras (global)", "sync / Keras",
             "per device / Keras"],
            [[f"{times['kerasbn sync'] * 1e3:.2f}", f"{times['kerasbn'] * 1e3:.2f}",
              f"{times['keras'] * 1e3:.2f}", f"{times['kerasbn sync'] / times['keras']:.2f}",
              f"{times['kerasbn'] / times['keras']:.2f}"]]))
    print(f"\nMachine: {report['machine']}; device {report['device']}; JAX {report['jax']}, "
          f"Keras {report['keras']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
