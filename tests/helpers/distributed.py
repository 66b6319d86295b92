"""Helpers that run distributed scenarios in fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import forkserver
from tests.helpers.ports import reserve_ports

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # a safety net for a hung process, never a speed claim: two suites side by side on 2 cores once took 300 s for one recipe run


def _env(extra=None):
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    # TensorFlow's PreemptionCheckpointHandler asks GCE's metadata server whether it runs on
    # GCP; a closed loopback port answers "no" at once, with no traffic off this machine.
    env.setdefault("GCE_METADATA_IP", "127.0.0.1:9")
    env.update(extra or {})
    return env


def _check(proc_result, what):
    if proc_result.returncode != 0:
        raise AssertionError(f"{what} failed:\n{proc_result.stderr[-4000:]}")


def run_script(script, args, tmp_path):
    """Runs ``script`` once (MirroredStrategy scenarios); returns its npz."""
    out = tmp_path / "result.npz"
    result = forkserver.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / script), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(),
    )
    _check(result, f"{script} {' '.join(args)}")
    return dict(np.load(out))


def free_ports(n):
    """``n`` ports for a loopback cluster, claimed for this test process (tests/helpers/ports.py)."""
    return reserve_ports(n)


def tf_config(ports, index):
    workers = [f"127.0.0.1:{p}" for p in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def start_cluster(command, workers=2, cwd=None):
    """Starts ``command`` once per worker of a loopback MultiWorkerMirroredStrategy cluster.

    Returns each worker's stdout (index = task index); raises with every failing worker's stderr.
    """
    ports = free_ports(workers)
    procs = [forkserver.popen(command(index), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                              env=_env({"TF_CONFIG": tf_config(ports, index)}))
             for index in range(workers)]
    outputs, failures = [], []
    for index, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"worker {index} timed out") from None
        if proc.returncode != 0:
            failures.append(f"worker {index}:\n{stderr[-3000:]}")
        outputs.append(stdout)
    if failures:
        raise AssertionError("\n".join(failures))
    return outputs


def run_workers(script, args, tmp_path, workers=2):
    """Runs ``script`` as a MultiWorkerMirroredStrategy cluster on loopback.

    Returns the list of each worker's npz (index = task index).
    """
    start_cluster(lambda index: [sys.executable, str(ROOT / "tests" / "helpers" / script), *args,
                                 "--out", str(tmp_path / f"worker{index}.npz")], workers)
    return [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(workers)]


def make_strategy(replicas=1, multi_worker=False):
    """Inside a worker process: ``(strategy, task_index)``.

    MultiWorkerMirroredStrategy from TF_CONFIG, or MirroredStrategy over
    ``replicas`` logical CPU devices (configured before TensorFlow starts).
    """
    import tensorflow as tf

    if multi_worker:
        return tf.distribute.MultiWorkerMirroredStrategy(), json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)]), 0


def once_per_run(tmp_path_factory, name, produce):
    """``produce(directory)`` once per pytest run, however many xdist workers ask; returns the directory.

    The first worker to ask produces while holding a lock; the others wait on the lock and then read
    what it wrote (a multi-device process started once, not once per worker).
    """
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by this run's workers
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "done").exists():
            directory.mkdir(exist_ok=True)
            produce(directory)
            (directory / "done").write_text("")
    return directory
