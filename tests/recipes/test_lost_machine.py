"""A lost or frozen machine: every survivor ends promptly with one retryable line, and the rerun
resumes from the checkpoint that line names. Real workers on loopback (TF_CONFIG), real SIGKILL
and SIGSTOP, each checked against the checkpoint state file on disk."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from recipes.inception_bn.ending import RETRYABLE as EXIT_RETRYABLE
from recipes.inception_bn.failures import StallWatchdog, first_line, lost_tasks
from tests.helpers import forkserver
from tests.helpers.distributed import ROOT, TIMEOUT, _env, free_ports, start_cluster, tf_config
from tests.recipes.test_inception_bn_train import (
    RECIPE,
    TINY,
    _checkpoint_steps,
    _history,
    _wait_for,
)

# Seconds from the loss to every survivor's exit. TensorFlow's coordination service declares a
# task lost after 10 s without a heartbeat; measured here: 0.2 s (chief killed: connection
# refused), 6-9 s (a worker killed or frozen, the chief frozen). A bound for a busy machine.
BOUND = 30
# A checkpoint (and an evaluation) every EVERY steps: the losses come after the first one.
EVERY = 10


def _state_step(run_dir):
    """The step of the checkpoint the state file names, or -1 (no state file yet)."""
    state = run_dir / "checkpoints" / "checkpoint"
    text = state.read_text() if state.exists() else ""
    found = re.search(r'model_checkpoint_path: ".*ckpt-(\d+)"', text)
    return int(found.group(1)) if found else -1


def _start(run_dir, workers, steps=100000):
    ports = free_ports(workers)
    command = [sys.executable, *RECIPE, "--run-dir", str(run_dir), *TINY, "--steps", str(steps), "--eval-every",
               str(EVERY), "--eval-examples", "16", "--quiet", "--no-export"]
    return [forkserver.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=_env({"TF_CONFIG": tf_config(ports, index)})) for index in range(workers)]


def _lose(procs, victim, signum, ready):
    """Once ``ready()``, sends ``signum`` to worker ``victim``; returns each survivor's
    ``(seconds to exit, status, stdout, stderr)`` and the victim's stdout; no process is left."""
    _wait_for(procs, ready, "checkpoint")
    procs[victim].send_signal(signum)
    lost = time.perf_counter()
    survivors = {}
    for index, proc in enumerate(procs):
        if index != victim:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            survivors[index] = (time.perf_counter() - lost, proc.returncode, stdout, stderr)
    procs[victim].kill()  # a frozen one is the orchestrator's to remove
    victim_stdout, _ = procs[victim].communicate(timeout=TIMEOUT)
    for proc in procs:
        assert proc.poll() is not None
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)
    return survivors, victim_stdout


def _check_survivors(survivors, run_dir, lost):
    """Each survivor: status 138 within the bound, one line naming the lost task and the checkpoint
    the state file names, the traceback in its log file, none on the console. Returns that step."""
    named = _state_step(run_dir)
    resumes = (f"the rerun resumes from {run_dir / 'checkpoints' / f'ckpt-{named}'}" if named >= 0
               else "nothing saved yet: the rerun starts afresh")
    for index, (seconds, status, _, stderr) in survivors.items():
        print(f"worker {index} exited {seconds:.1f} s after losing {lost}: {stderr.strip()[-400:]}")
        assert status == EXIT_RETRYABLE, (index, status, stderr[-3000:])
        assert seconds < BOUND, (index, seconds)
        assert "Traceback" not in stderr, stderr[-3000:]
        (line,) = [line for line in stderr.splitlines() if line.startswith("lost ")]
        assert line.startswith(f"lost {lost}"), line
        log = run_dir / f"worker{index}-errors.log"
        assert line.endswith(f"; rerun every worker's command: {resumes} (traceback in {log})"), line
        assert "Traceback (most recent call last)" in log.read_text()
    return named


def _assert_resumed(stdout, run_dir, step):
    if step >= 0:
        assert f"Resuming {run_dir} from step {step} of" in stdout, stdout
    else:
        assert "Resuming" not in stdout, stdout


def _finish(run_dir, step, workers=2):
    """Rerunning every worker resumes from the checkpoint the last line named, and finishes."""
    command = [sys.executable, *RECIPE, "--run-dir", str(run_dir), *TINY, "--steps", str(step + 2),
               "--eval-every", str(EVERY), "--eval-examples", "16", "--quiet", "--no-export"]
    chief, *_ = start_cluster(lambda index: command, workers=workers, cwd=ROOT)
    _assert_resumed(chief, run_dir, step)
    assert _state_step(run_dir) == step + 2 and int(_history(run_dir)[-1]["step"]) == step + 2


def _lost(run_dir, workers, victim, signum, lost, ready=None, rerun=True):
    """One scenario: ``workers`` train, worker ``victim`` gets ``signum`` once ``ready()`` (default:
    a checkpoint saved), every survivor is checked, and (``rerun``) rerunning every worker resumes."""
    procs = _start(run_dir, workers)
    survivors, _ = _lose(procs, victim, signum, ready or (lambda: _state_step(run_dir) >= EVERY))
    assert sorted(survivors) == [index for index in range(workers) if index != victim]
    step = _check_survivors(survivors, run_dir, lost)
    if rerun:
        _finish(run_dir, step, workers)
    return step


def _chief_killed_as_a_checkpoint_appears(run_dir):
    # The second checkpoint's files appear: the save is in progress. The state file still names a
    # complete checkpoint (that one, or the one before), the survivor names it, the rerun restores it.
    step = _lost(run_dir, 2, 0, signal.SIGKILL, "worker 0",
                 lambda: max(_checkpoint_steps(run_dir), default=-1) > EVERY)
    assert step >= EVERY


@pytest.mark.processes
@pytest.mark.slow(cores=2)
def test_a_killed_or_frozen_worker_or_chief_ends_every_survivor_and_the_rerun_resumes(tmp_path):
    # Five runs side by side (the waits are TensorFlow's heartbeat, not work): a worker and the chief
    # SIGKILLed, a worker and the chief frozen (SIGSTOP: alive, silent; a frozen chief is its
    # coordination service not answering), and a worker killed in a cluster of three.
    # The rerun reads only what is on disk, and the losses leave it in one of two states: a complete
    # checkpoint last (rerun after the loss in a cluster of three) or a later save's files beside
    # the one the state file names (the chief killed as they appear). The other three losses end
    # their survivors the same way and leave the first state; rerunning them too cost 6 more
    # processes, 12 s of CPU (measured), for a path already run.
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    no_rerun = partial(_lost, rerun=False)
    scenarios = [
        (no_rerun, tmp_path / "worker-killed", 2, 1, signal.SIGKILL, "worker 1"),
        (_chief_killed_as_a_checkpoint_appears, tmp_path / "chief-killed"),
        (no_rerun, tmp_path / "worker-frozen", 2, 1, signal.SIGSTOP, "worker 1"),
        (no_rerun, tmp_path / "chief-frozen", 2, 0, signal.SIGSTOP, "worker 0 (its coordination service stopped answering)"),
        (_lost, tmp_path / "of-three", 3, 1, signal.SIGKILL, "worker 1"),
    ]
    with ThreadPoolExecutor(len(scenarios)) as pool:
        for scenario in [pool.submit(*scenario) for scenario in scenarios]:
            scenario.result()


def test_the_watchdog_ends_a_run_without_progress_and_names_what_it_waited_for(tmp_path):
    stalled = []
    reported = threading.Event()
    watchdog = StallWatchdog(0.2, tmp_path, "worker 3", lambda: "the rerun resumes from X",
                             on_stall=lambda line: (stalled.append(line), reported.set()))
    watchdog.start("training steps 41-50 (input from the tf.data service grpc://h:1)")
    assert reported.wait(TIMEOUT)
    watchdog.stop()
    (line,) = stalled
    assert line.startswith("stalled: no progress for 0 s (--stall-timeout 0.2), waiting for training steps 41-50 "
                           "(input from the tf.data service grpc://h:1); rerun every worker's command: "
                           "the rerun resumes from X (every thread's stack in "), line
    log = (tmp_path / "worker3-errors.log").read_text()
    assert "waiting for training steps 41-50" in log and "_watch" in log  # every thread's stack
    # Progress keeps it quiet; timeout 0 never starts it.
    quiet = StallWatchdog(0, tmp_path, "worker 3", str, on_stall=stalled.append).start("x")
    assert quiet._thread is None


def test_lost_peer_messages_name_the_task_from_what_tensorflow_says():
    said = ("Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most recent call last):\n"
            '  File "train.py", line 1, in <module>\n\n'
            "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
            "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.\n"
            "\t [[{{node CollectiveReduceV2}}]] [Op:__inference_eval_step_2508]")
    assert first_line(Exception(said)) == ("Collective ops is aborted by: Error reported from /job:worker/task:1: "
                                           "The following tasks are unhealthy (stopped sending heartbeats): "
                                           "/job:worker/replica:0/task:1")
    assert lost_tasks(first_line(Exception(said)), "worker 0") == ["worker 1"]
    refused = "failed to connect to all addresses; ipv4:127.0.0.1:4321: Connection refused"
    assert lost_tasks(refused, "worker 2", {"127.0.0.1:1234": "worker 0", "127.0.0.1:4321": "worker 1"}) == \
        ["worker 1"]


def test_a_survivor_that_exited_first_is_not_named_as_the_machine_lost(tmp_path):
    # 3 workers, worker 1 killed: worker 2 may exit (138) before the heartbeat declares worker 1
    # dead, and TensorFlow then tells worker 0 that worker 2 stopped heartbeating.
    import time

    import tensorflow as tf

    from recipes.inception_bn.failures import lost_peer_message

    def said(task):
        return tf.errors.UnavailableError(None, None, f"Collective ops is aborted by: The following tasks are "
                                          f"unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:{task}")

    started = time.time() - 1
    first = lost_peer_message(said(1), tmp_path, "worker 2", 50, "resume", since=started)
    assert first.startswith("lost worker 1 of the cluster at step 50")
    second = lost_peer_message(said(2), tmp_path, "worker 0", 50, "resume", since=started)
    assert second.startswith("lost worker 1 of the cluster at step 50"), second
    # A marker from an earlier start is not this loss.
    later = lost_peer_message(said(2), tmp_path, "worker 0", 60, "resume", since=time.time() + 10)
    assert later.startswith("lost worker 2 of the cluster at step 60"), later
