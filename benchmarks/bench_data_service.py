"""The recipe's ImageNet training input: local pipeline against a tf.data service on loopback.

The photo-sized fake ImageNet of ``bench_input.py`` (tfds-prepared); the recipe's training pipeline
read in this process, then the same pipeline through a dispatcher and 1 and 2 service workers, each
its own process (``python -m recipes.inception_bn.data_service``), all on this machine. Prints the
images/s a consumer receives (batches pulled as fast as they come, no training), median of rounds.
On one machine the service's workers share its cores with the consumer: this measures the
service's overhead, not the scaling it brings when its workers are other machines.

    .venv/bin/python benchmarks/bench_data_service.py [--work-dir D] [--rounds 3]
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from common import markdown_table  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(HERE.parent))
    proc = subprocess.Popen([sys.executable, "-m", "recipes.inception_bn.data_service", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=HERE.parent)
    assert "serving" in proc.stdout.readline()
    return proc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="bench_input.py's work dir (made here when missing)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from bench_input import fake_imagenet, images_per_second

    from recipes.inception_bn import data_service
    from recipes.inception_bn.data import load_source

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_input-"))
    (work / "download").mkdir(parents=True, exist_ok=True)
    if not (work / "download" / "ILSVRC2012_img_train.tar").exists():
        fake_imagenet(work / "download", 256)
    source = load_source("imagenet2012", work / "download", 224, prepared_dir=work / "prepared")
    rows = []
    local = iter(source.train(args.batch, 1.0, seed=0))
    rows.append(["local (this process)", np.median([images_per_second(local, args.batches, args.batch)
                                                    for _ in range(args.rounds)])])
    del local
    for workers in (1, 2):
        port = free_port()
        procs = [start("dispatcher", "--port", str(port))]
        try:
            procs += [start("worker", "--dispatcher", f"127.0.0.1:{port}") for _ in range(workers)]
            dataset = data_service.distribute(source.train(args.batch, 1.0, seed=0), f"grpc://127.0.0.1:{port}",
                                              f"bench-{workers}")
            served = iter(dataset)
            rows.append([f"tf.data service, {workers} worker(s)",
                         np.median([images_per_second(served, args.batches, args.batch) for _ in range(args.rounds)])])
            del served
        finally:
            for p in procs:
                p.kill()
    base = rows[0][1]
    print(f"{os.cpu_count()} cores; 224x224 uint8 batches of {args.batch}; median of {args.rounds} rounds")
    print(markdown_table(["input", "images/s", "vs local"],
                         [[name, f"{r:.0f}", f"{r / base:.2f}"] for name, r in rows]))


if __name__ == "__main__":
    main()
