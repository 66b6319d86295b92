"""One rank of a torch.distributed (gloo, loopback) run: ``python -m tests.helpers.torch_ddp_worker
RANK WORLD DIRECTORY SCENARIO...``, the scenarios in turn in one process group (one interpreter start
per rank for all of them). Writes ``DIRECTORY/{SCENARIO}-rank{RANK}.npz``; tests/torch/test_distributed.py
compares the ranks with one process on the concatenated batch (float64 ground truth, or the same
model trained in one process).

Scenarios:
- ``shares``: synchronized and local layers on unequal (and, with ``empty``, empty) shares of one
  global batch; outputs, input and weight gradients, moving statistics.
- ``ddp``: a Keras model wrapped in ``DistributedDataParallel`` as Keras' torch guide wraps it,
  trained three SGD steps on equal shares; its weights and statistics.
"""

from __future__ import annotations

import datetime
import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import kerasbn  # noqa: E402

GLOBAL_BATCH = 16
SHARES = {"shares": (5, 11), "empty": (16, 0), "poisoned": (8, 8), "ddp": (8, 8), "groups": (4, 4, 4, 4)}


def global_data(seed=0):
    rng = np.random.RandomState(seed)
    x = rng.normal(3.0, 2.0, (GLOBAL_BATCH, 3, 3, 4)).astype("float32")
    x += np.linspace(0, 5, GLOBAL_BATCH, dtype="float32")[:, None, None, None]  # ranks' shares differ
    dy = rng.normal(0.0, 1.0, x.shape).astype("float32")
    return x, dy


def share(array, shares, rank):
    start = sum(shares[:rank])
    return array[start:start + shares[rank]]


def gradients(layer, x, dy):
    x = torch.tensor(x, requires_grad=True)
    y = layer(x, training=True)
    weights = [v.value for v in layer.trainable_variables]
    grads = torch.autograd.grad((y * torch.tensor(dy)).sum(), [x] + weights, allow_unused=True)
    return y.detach().numpy(), [g.numpy() for g in grads]


def run_shares(rank, scenario, out):
    x, dy = global_data()
    shares = SHARES[scenario]
    x, dy = share(x, shares, rank), share(dy, shares, rank)
    if scenario == "poisoned" and rank == 1:
        x = x.copy()
        x.flat[5] = np.inf  # one rank's non-finite batch: every rank must skip the update (and not hang)
    results = {}
    for name, layer in (("sync", kerasbn.SyncBatchNormalization(momentum=0.5)),
                        ("local", kerasbn.BatchNormalization(momentum=0.5))):
        layer.build((None, 3, 3, 4))
        for step in range(2):  # the second step reads the moving statistics the first wrote
            y, (dx, dgamma, dbeta) = gradients(layer, x + step, dy)
        results.update({f"{name}_y": y, f"{name}_dx": dx, f"{name}_dgamma": dgamma, f"{name}_dbeta": dbeta,
                        f"{name}_moving_mean": layer.moving_mean.numpy(),
                        f"{name}_moving_variance": layer.moving_variance.numpy()})
    np.savez(out, **results)


def build_model():
    # Seeded initializers (keras.utils.set_random_seed would import TensorFlow where installed).
    return keras.Sequential([
        keras.Input((3, 3, 4)),
        keras.layers.Conv2D(6, 3, padding="same", kernel_initializer=keras.initializers.GlorotUniform(1)),
        kerasbn.SyncBatchNormalization(momentum=0.5), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotUniform(2))])


def train(model, x, targets, parameters_of):
    optimizer = torch.optim.SGD(parameters_of.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        # Keras layers ignore torch's module.train(): training=True reaches every BN through DDP's forward.
        outputs = parameters_of(torch.tensor(x + step), training=True)
        loss = torch.nn.functional.mse_loss(outputs, torch.tensor(targets))
        loss.backward()
        optimizer.step()


def run_ddp(rank, out):
    x, _ = global_data()
    targets = np.random.RandomState(2).normal(size=(GLOBAL_BATCH, 2)).astype("float32")
    shares = SHARES["ddp"]
    model = build_model()
    model(x[:1], training=False)  # built
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    train(model, share(x, shares, rank), share(targets, shares, rank), ddp)
    np.savez(out, **{f"w{i}": w.numpy() for i, w in enumerate(model.weights)})  # moving statistics included


def run_groups(rank, out):
    x, dy = global_data()
    layer = kerasbn.SyncBatchNormalization(momentum=0.0, sync_group_size=2)
    layer.build((None, 3, 3, 4))
    y, (dx, _, _) = gradients(layer, share(x, SHARES["groups"], rank), share(dy, SHARES["groups"], rank))
    np.savez(out, y=y, dx=dx, moving_mean=layer.moving_mean.numpy(), moving_variance=layer.moving_variance.numpy())


def run_recalibrate(rank, out):
    x, _ = global_data()
    model = keras.Sequential([keras.Input((3, 3, 4)), kerasbn.BatchNormalization()])  # local, as trained
    batches = [share(x, SHARES["ddp"], rank) * (step + 1) for step in range(3)]
    kerasbn.recalibrate_statistics(model, batches, verbose=0)
    np.savez(out, moving_mean=model.layers[0].moving_mean.numpy(),
             moving_variance=model.layers[0].moving_variance.numpy())


RUNS = {"shares": run_shares, "empty": run_shares, "poisoned": run_shares, "ddp": run_ddp,
        "recalibrate": run_recalibrate, "groups": run_groups}


def main(rank, world, directory, scenarios):
    if os.environ.get("OMP_NUM_THREADS"):  # forked after torch started: its thread count is the server's
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    for scenario in scenarios:
        out = os.path.join(directory, f"{scenario}-rank{rank}.npz")
        if RUNS[scenario] is run_shares:
            run_shares(rank, scenario, out)
        else:
            RUNS[scenario](rank, out)
        # Training and inference on torch import no TensorFlow (recalibration calls Keras' get_config,
        # which imports it where installed: it comes last).
        print(f"rank {rank} {scenario} done; imported tensorflow: {'tensorflow' in sys.modules}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
