"""The cluster a run trains on: the strategy, each worker's role, and a start-up that ends by itself.

``MultiWorkerMirroredStrategy()`` forms the cluster inside one long TensorFlow call that holds
Python's lock: a worker whose peer never starts waits there forever, and no Python thread - not
the stop-signal thread, not a watchdog - runs until it returns. So before that call every worker
meets every other in plain Python (:class:`Rendezvous`, on the very port TensorFlow takes next),
where the clock and the signals are honoured:

- the TF_CONFIG is checked first (:func:`parse_tf_config`): a task that does not fit the cluster,
  a malformed address, two TF_CONFIGs that disagree -> one line, status 2;
- this worker's port already held (a process of an earlier attempt) -> one line naming the holder,
  status 138 (a retry may find it free);
- a peer that does not answer within ``--startup-timeout`` (not started, a wrong address, a name that
  does not resolve) -> one line naming each such worker and its address, status 138.

Only once every worker has answered every other does TensorFlow form the cluster, which then
takes a second or two. A peer that dies in that second leaves TensorFlow waiting: a sentinel
process (:func:`formation_sentinel`) ends the worker after ``--startup-timeout`` with its line and
SIGUSR1, which Kubernetes, Slurm and shells report as status 138 (128 + 10).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from recipes.inception_bn.ending import Refused
from recipes.inception_bn.rendezvous import Rendezvous, listen

DEFAULT_STARTUP_TIMEOUT = 900.0  # seconds; torchrun's --rdzv-timeout default
_JOBS = ("chief", "worker")  # the tasks MultiWorkerMirroredStrategy trains on


# The TF_CONFIG ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    job: str
    index: int
    address: str  # "host:port", as TF_CONFIG gives it
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.job} {self.index}"


@dataclass(frozen=True)
class Cluster:
    tasks: tuple[Task, ...]
    own: Task

    @property
    def peers(self) -> tuple[Task, ...]:
        return tuple(task for task in self.tasks if task != self.own)

    @property
    def leader(self) -> Task:
        """The task running TensorFlow's coordination service: the chief, else worker 0."""
        return self.tasks[0]

    @property
    def digest(self) -> str:
        """The cluster's fingerprint: every worker's TF_CONFIG must give the same one."""
        canonical = json.dumps([[task.job, task.index, task.address] for task in self.tasks])
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _address(job: str, index: int, address) -> Task:
    where = f"TF_CONFIG's cluster {job} {index}"
    if not isinstance(address, str) or ":" not in address:
        raise Refused(f"{where} is {address!r}: expected \"host:port\"")
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [IPv6]:port
    if not host or any(c.isspace() for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refused(f"{where} is {address!r}: expected \"host:port\" with a port from 1 to 65535")
    return Task(job, index, address, host, int(port))


def parse_tf_config(text: str) -> Cluster:
    """The cluster and this worker's task from TF_CONFIG; :class:`Refused` (one line) when they do not fit."""
    try:
        config = json.loads(text)
    except ValueError as error:
        raise Refused(f"TF_CONFIG is not valid JSON: {error}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not cluster:
        raise Refused('TF_CONFIG has no "cluster": expected {"cluster": {"worker": ["host:port", ...]}, '
                      '"task": {"type": "worker", "index": 0}}')
    unknown = sorted(set(cluster) - set(_JOBS))
    if unknown:
        raise Refused(f"TF_CONFIG's cluster has job(s) {', '.join(unknown)}: the recipe trains on \"chief\" and "
                      "\"worker\" tasks only (every worker evaluates; there is no parameter server)")
    tasks = []
    for job in _JOBS:  # the chief first: it leads, as in TensorFlow
        addresses = cluster.get(job, [])
        if not isinstance(addresses, list):
            raise Refused(f"TF_CONFIG's cluster {job} is {addresses!r}: expected a list of \"host:port\"")
        if job == "chief" and len(addresses) > 1:
            raise Refused(f"TF_CONFIG's cluster has {len(addresses)} chiefs: at most one")
        tasks += [_address(job, index, address) for index, address in enumerate(addresses)]
    if not tasks:
        raise Refused("TF_CONFIG's cluster lists no task")
    repeated = sorted({t.address for t in tasks if sum(u.address == t.address for u in tasks) > 1})
    if repeated:
        raise Refused(f"TF_CONFIG's cluster lists {', '.join(repeated)} more than once: each task needs its own "
                      "host:port")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise Refused('TF_CONFIG has no "task" with "type" and "index": expected e.g. '
                      '{"task": {"type": "worker", "index": 0}}')
    job, index = task["type"], task["index"]
    if job not in cluster:
        raise Refused(f"TF_CONFIG's task type {job!r} is not a job of its cluster "
                      f"({', '.join(j for j in _JOBS if j in cluster)})")
    count = len(cluster[job])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise Refused(f"TF_CONFIG's task index {index!r} does not fit the cluster: {job} has {count} task(s), "
                      f"index 0 to {count - 1}")
    (own,) = [t for t in tasks if (t.job, t.index) == (job, index)]
    return Cluster(tuple(tasks), own)


# The strategy ---------------------------------------------------------------------------------------

_SENTINEL = """
import os, select, signal, sys
parent, seconds, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready and os.getppid() == parent:
    sys.stderr.write(line + "\\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGUSR1)
"""


def formation_sentinel(seconds: float, line: str) -> subprocess.Popen:
    """A process that, unless its standard input closes within ``seconds``, prints ``line`` and ends
    this one with SIGUSR1 (status 138 as shells and Kubernetes report it).

    It guards the one call no thread of this process can interrupt: TensorFlow forming the cluster
    holds Python's lock. Close its standard input (``.stdin.close()``) when the call returns; it also
    ends when this process does.
    """
    return subprocess.Popen([sys.executable, "-c", _SENTINEL, str(os.getpid()), str(seconds), line],
                            stdin=subprocess.PIPE)


def join_cluster(cluster: Cluster, timeout: float, resume_fn):
    """MultiWorkerMirroredStrategy for ``cluster``, or a :class:`RunEnded` that says why it did not form."""
    import tensorflow as tf

    listener = listen(cluster.own)
    rendezvous = Rendezvous(cluster, listener)
    try:
        if cluster.peers:
            others = ", ".join(f"{peer.name} at {peer.address}" for peer in cluster.peers)
            print(f"{cluster.own.name}: waiting for every worker of the cluster to answer ({others})"
                  + (f"; giving up after {timeout:g} s (--startup-timeout)" if timeout else ""),
                  file=sys.stderr, flush=True)
        rendezvous.wait(timeout, resume_fn)
    finally:
        rendezvous.close()  # TensorFlow's server takes the port next
    sentinel = None
    if timeout:
        sentinel = formation_sentinel(timeout, (
            f"the cluster did not form within {timeout:g} s (--startup-timeout) after every worker answered: a "
            f"worker stopped before TensorFlow formed the cluster; rerun every worker's command: {resume_fn()}"))
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except ValueError as error:
        raise Refused(f"TF_CONFIG: {error}") from None
    finally:
        if sentinel is not None:
            sentinel.stdin.close()
            sentinel.wait()


def make_strategy(cpu_replicas: int = 1, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
                  resume_fn=lambda: "the rerun starts afresh"):
    """MultiWorkerMirroredStrategy from TF_CONFIG, else MirroredStrategy over the GPUs
    (or ``cpu_replicas`` logical CPUs), else the default strategy."""
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return join_cluster(parse_tf_config(os.environ["TF_CONFIG"]), startup_timeout, resume_fn)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.OneDeviceStrategy("/gpu:0")
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(cpu_replicas)])
    return tf.distribute.get_strategy()


def worker_role(strategy):
    """``(is_chief, task_index, task name, input pipelines)``: this worker's place in the cluster, and
    the cluster's input pipelines (:func:`input_pipelines`); without TF_CONFIG the one process is the
    chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0, "trainer", input_pipelines(strategy)
    chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())
    return chief, resolver.task_id, f"{resolver.task_type} {resolver.task_id}", input_pipelines(strategy)


def input_pipelines(strategy) -> int:
    """One input pipeline per worker (``distribute_datasets_from_function``); one without a strategy."""
    import tensorflow as tf

    if not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        return 1
    return strategy.num_replicas_in_sync // len(strategy.extended.worker_devices)


def check_same_step(strategy, step):
    """Every worker must resume at the same step (the run directory is shared); say so if not."""
    import tensorflow as tf

    # strategy.reduce has SUM and MEAN only: all steps are equal iff R * sum(s^2) == sum(s)^2.
    value = tf.constant([float(step), float(step) ** 2], tf.float64)
    all_reduce = tf.function(lambda: strategy.reduce("SUM", strategy.run(lambda: tf.identity(value)), axis=None),
                             autograph=False)  # eager collectives log a warning on every worker
    total, squares = all_reduce().numpy()
    replicas = strategy.num_replicas_in_sync
    if abs(replicas * squares - total ** 2) > 0.5:
        raise Refused(f"workers restored different steps (mean {total / replicas:.1f}, this one {step}): "
                      "--run-dir must be on a filesystem every worker shares")

