"""A tf.data service for the recipe's training input: a dispatcher and any number of workers.

    python -m recipes.inception_bn.data_service dispatcher --port 5050 [--work-dir DIR]
    python -m recipes.inception_bn.data_service worker --dispatcher HOST:5050 --port 5051
    python -m recipes.inception_bn.train ... --data-service grpc://HOST:5050

The trainers send the training pipeline's host part (read, crop, decode, resize, flip, the
distortion factors: ``recipes.inception_bn.data``) to the service; its workers run it and stream
uint8 batches back; the device part stays in the training step. Service workers need the data at
the same path as the trainers (a shared filesystem, or a copy) and the recipe's code on their
Python path (this repository, with the `recipes` extra).

Processing mode: ``ShardingPolicy.DYNAMIC``. The dispatcher hands out the source's splits - file
slots and positions for ImageNet, stream positions for the synthetic source - to whichever
worker asks next, so within an epoch each split is processed by exactly one worker (at most one
if a worker dies: its split in progress is lost), workers that are faster do more, and workers
can join or leave during training. ImageNet: the splits are the partitions' file slots (a file of
an epoch, read whole and permuted: ``partitions.py``) and the stream positions, dealt independently;
the synthetic source: the same examples and draws as locally (``order.py``).
All the trainers of one run (replicas and workers) read one job, named after the run directory
and the step it started at, so no batch goes to two of them. A resumed run starts a new job at
its step's stream position. Which trainer gets which batch is whoever asks first, so the run is
not reproducible: ``--deterministic`` refuses it.
Fashion-MNIST lives in every trainer's memory: it has nothing to offload and is refused.

SIGTERM or Ctrl-C stops either process at once, status 0, one line; a dispatcher restarted with the
same ``--work-dir`` keeps its jobs (the journal).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SERVICE_SOURCES = ("imagenet2012", "synthetic")


def job_name(run_dir, start_step: int) -> str:
    """One job per run and start: every trainer of the run computes the same name."""
    import hashlib

    digest = hashlib.sha1(os.path.abspath(os.fspath(run_dir)).encode()).hexdigest()[:12]
    return f"kerasbn-{digest}-step{start_step}"


def distribute(dataset, address: str, job: str):
    """``dataset``'s elements produced by the service at ``address``, for job ``job``."""
    import tensorflow as tf

    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=address, job_name=job))


def check_address(address: str) -> str:
    """``grpc://HOST:PORT``, or a ValueError saying what is expected."""
    rest = address[len("grpc://"):] if address.startswith("grpc://") else None
    host, _, port = (rest or "").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--data-service must be grpc://HOST:PORT (the dispatcher); received {address!r}")
    return address


def main(argv=None) -> int:
    from recipes.inception_bn import ending
    from recipes.inception_bn.stopping import StopRequest, block_stop_signals

    block_stop_signals()  # first, so that no TensorFlow thread takes SIGTERM or SIGINT
    parser = argparse.ArgumentParser(prog="python -m recipes.inception_bn.data_service",
                                     description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    dispatcher = roles.add_parser("dispatcher", help="the service's coordinator; trainers connect to it")
    dispatcher.add_argument("--port", type=int, default=5050)
    dispatcher.add_argument("--work-dir", help="journal here, so a restarted dispatcher keeps its jobs")
    worker = roles.add_parser("worker", help="runs the input pipelines")
    worker.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    worker.add_argument("--port", type=int, default=0, help="0: any free port")
    worker.add_argument("--worker-address", help="HOST:PORT the trainers reach this worker at "
                        "(default: this host's name and --port)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    service = tf.data.experimental.service
    if args.role == "dispatcher":
        server = service.DispatchServer(service.DispatcherConfig(
            port=args.port, work_dir=args.work_dir, fault_tolerant_mode=args.work_dir is not None))
        print(f"dispatcher serving at {server.target}", flush=True)
    else:
        config = {"dispatcher_address": args.dispatcher.removeprefix("grpc://"), "port": args.port}
        if args.worker_address:
            config["worker_address"] = args.worker_address
        server = service.WorkerServer(service.WorkerConfig(**config))
        print(f"worker serving for dispatcher {args.dispatcher}", flush=True)
    # server.join() would be one long C++ call, during which no Python handler runs: the signals
    # are blocked in every thread (before TensorFlow starts any) and taken by the stop request's.
    with StopRequest(announce=False) as stop:
        name = stop.wait()
    # A hard exit, as a lost machine's: the dispatcher journals every change before it answers
    # (--work-dir), so nothing it acknowledged is lost, and no server thread can hold the exit up.
    ending.end_process(ending.DONE, f"{args.role} stopped by {name}"
                       + (f"; restart it with the same --work-dir {args.work_dir} to keep its jobs"
                          if args.role == "dispatcher" and args.work_dir else ""), sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
