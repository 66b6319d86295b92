"""A cluster that never forms: every start-up failure ends the worker by itself, promptly, with one
line and a status an orchestrator acts on. Real recipe processes on loopback (TF_CONFIG), real
signals, real sockets; each waits on what the process prints, never on the clock."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from recipes.inception_bn.cluster import parse_tf_config
from recipes.inception_bn.ending import INTERRUPTED, REFUSED, RETRYABLE, Refused
from recipes.inception_bn.rendezvous import NotFormed, Rendezvous, listen
from tests.helpers import forkserver
from tests.helpers.distributed import ROOT, TIMEOUT, _env, free_ports
from tests.recipes.test_inception_bn_train import RECIPE, TINY, _main_in_process

# A bound for a busy machine on what follows the start-up timeout (the process's exit), not a speed claim.
BOUND = 30


def _config(workers, index, job="worker"):
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": job, "index": index}})


def _start(run_dir, config, *args):
    command = [sys.executable, *RECIPE, "--run-dir", str(run_dir), *TINY, "--steps", "4", "--eval-every", "2",
               "--eval-examples", "16", "--quiet", "--no-export", *args]
    return forkserver.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env({"TF_CONFIG": config}))


def _waiting(proc):
    """Reads standard error up to the worker's "waiting for every worker" line; returns that line."""
    while True:
        line = proc.stderr.readline()
        assert line, f"the worker ended before waiting for its peers: {proc.communicate()[1][-3000:]}"
        if "waiting for every worker of the cluster to answer" in line:
            return line.strip()


def _ends(proc):
    """``(seconds from now to the exit, status, the lines of standard error)``."""
    started = time.perf_counter()
    _, stderr = proc.communicate(timeout=TIMEOUT)
    return time.perf_counter() - started, proc.returncode, [line for line in stderr.splitlines() if line.strip()]


def _one_line(lines, start):
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    (line,) = [line for line in lines if line.startswith(start)]
    return line


@pytest.mark.slow(cores=2)
def test_a_worker_whose_peers_never_answer_ends_by_itself_naming_each_and_why(tmp_path):
    # Worker 0 of three (the leader): worker 1's port has nothing behind it, worker 2's name does
    # not resolve. Worker 1 of two whose leader never starts. Both end at --startup-timeout with 138.
    own, silent, unresolvable, leader, follower = free_ports(5)
    three = [f"127.0.0.1:{own}", f"127.0.0.1:{silent}", f"no-such-host.invalid:{unresolvable}"]
    missing_leader = [f"127.0.0.1:{leader}", f"127.0.0.1:{follower}"]
    procs = [_start(tmp_path / "leader", _config(three, 0), "--startup-timeout", "3"),
             _start(tmp_path / "follower", _config(missing_leader, 1), "--startup-timeout", "3")]
    try:
        waiting = [_waiting(proc) for proc in procs]
        ended = [_ends(proc) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert waiting[0] == (f"worker 0: waiting for every worker of the cluster to answer (worker 1 at "
                          f"127.0.0.1:{silent}, worker 2 at no-such-host.invalid:{unresolvable}); giving up after "
                          "3 s (--startup-timeout)")
    for seconds, status, lines in ended:
        print(f"exited {seconds:.1f} s after saying it waits: {lines[-1]}")
        assert status == RETRYABLE and seconds < 3 + BOUND, (status, lines)
    assert _one_line(ended[0][2], "the cluster") == (
        f"the cluster did not form within 3 s (--startup-timeout): worker 1 at 127.0.0.1:{silent} never answered "
        "(nothing listens there: not started yet, or another address); worker 2 at "
        f"no-such-host.invalid:{unresolvable} never answered (its name no-such-host.invalid does not resolve); "
        "rerun every worker's command: nothing saved yet: the rerun starts afresh")
    assert _one_line(ended[1][2], "the cluster").startswith(
        f"the cluster did not form within 3 s (--startup-timeout): worker 0 at 127.0.0.1:{leader} never answered "
        "(nothing listens there")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_cluster_forms_ends_the_worker_at_once_with_130(tmp_path, signum):
    # The peer never starts and no start-up timeout is set (--startup-timeout 0): the worker would
    # wait forever. A SIGTERM (a pod deleted) or Ctrl-C ends it within seconds, with one line.
    ports = free_ports(2)
    procs = [_start(tmp_path, _config([f"127.0.0.1:{p}" for p in ports], 1), "--startup-timeout", "0")]
    try:
        assert _waiting(procs[0]).endswith(f"(worker 0 at 127.0.0.1:{ports[0]})")  # no time limit said
        procs[0].send_signal(signum)
        seconds, status, lines = _ends(procs[0])
    finally:
        procs[0].kill()
    print(f"{signal.Signals(signum).name}: exited {seconds:.2f} s later")
    assert status == INTERRUPTED and seconds < BOUND, (status, lines)
    assert _one_line(lines, "interrupted") == ("interrupted before training started; nothing saved yet: the "
                                               "rerun starts afresh")


@pytest.mark.slow
def test_a_port_in_use_is_one_line_naming_what_holds_it(tmp_path):
    # A stale process holds this worker's port: here, this test's own listening socket.
    own, peer = free_ports(2)
    with socket.socket() as stale:
        stale.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        stale.bind(("", own))
        stale.listen(1)
        proc = _start(tmp_path, _config([f"127.0.0.1:{own}", f"127.0.0.1:{peer}"], 0))
        seconds, status, lines = _ends(proc)
    assert status == RETRYABLE, lines
    line = _one_line(lines, "port")
    assert line.startswith(f"port {own} of worker 0 (127.0.0.1:{own} in TF_CONFIG) is in use by pid {os.getpid()}: "), line
    assert line.endswith("; stop what holds it, or give this task another port in every worker's TF_CONFIG"), line


@pytest.mark.slow
def test_workers_started_with_different_clusters_are_told_so(tmp_path):
    a, b, c = free_ports(3)
    two, three = [f"127.0.0.1:{a}", f"127.0.0.1:{b}"], [f"127.0.0.1:{a}", f"127.0.0.1:{b}", f"127.0.0.1:{c}"]
    procs = [_start(tmp_path / "0", _config(two, 0)), _start(tmp_path / "1", _config(three, 1))]
    try:
        ended = [_ends(proc) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    lines = [_one_line(lines, "error:") for _, _, lines in ended]
    assert [status for _, status, _ in ended] == [REFUSED, REFUSED], ended
    assert lines == [f"error: {peer}'s TF_CONFIG gives another cluster than {own}'s: every worker needs the same "
                     '"cluster" (only "task" differs)' for peer, own in (("worker 1", "worker 0"),
                                                                          ("worker 0", "worker 1"))]


@pytest.mark.parametrize("port_now", ["closed", "another server"])
def test_a_peer_that_met_this_worker_and_moved_on_counts_as_met(port_now):
    # Worker 0 probed worker 1 and was answered, then ended its rendezvous (its port: closed, then
    # TensorFlow's server) while worker 1's own probe of it had gone unanswered - a read that timed
    # out on a busy machine. Worker 1 goes on at once instead of waiting until --startup-timeout.
    ports = free_ports(2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    first, second = parse_tf_config(_config(workers, 0)), parse_tf_config(_config(workers, 1))
    waiting = Rendezvous(second, listen(second.own))
    done = Rendezvous(first, listen(first.own))
    done.probe(first.peers[0])
    done.close()
    assert done.seen == {"worker 1"} and waiting.seen_by == {"worker 0"} and not waiting.seen
    server = None
    if port_now == "another server":  # something that does not speak the rendezvous: closes at once
        server = socket.create_server(("127.0.0.1", ports[0]))
        threading.Thread(target=lambda: [server.accept()[0].close() for _ in range(100)], daemon=True).start()
    try:
        started = time.monotonic()
        waiting.wait(60, str)
        assert time.monotonic() - started < 10
        assert waiting.seen == {"worker 0"}
    finally:
        waiting.close()
        if server is not None:
            server.close()


def test_a_peer_never_met_whose_port_is_closed_is_still_missing():
    # The control: worker 0 never reached worker 1, and nothing listens on its port.
    ports = free_ports(2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    second = parse_tf_config(_config(workers, 1))
    waiting = Rendezvous(second, listen(second.own))
    try:
        with pytest.raises(NotFormed, match="worker 0 at 127.0.0.1:.* never answered .nothing listens there"):
            waiting.wait(0.5, str)
    finally:
        waiting.close()


@pytest.mark.slow
def test_a_peer_lost_after_answering_ends_the_worker_through_the_sentinel(tmp_path):
    # Worker 0 (this test) answers the rendezvous, then never starts TensorFlow: worker 1 waits
    # inside TensorFlow's formation, which holds Python's lock. The sentinel ends it at
    # --startup-timeout with its line and SIGUSR1 (status 138 as a shell or Kubernetes reports it).
    ports = free_ports(2)
    workers = [f"127.0.0.1:{p}" for p in ports]
    leader = parse_tf_config(_config(workers, 0))
    rendezvous = Rendezvous(leader, listen(leader.own))
    answered = threading.Thread(target=rendezvous.wait, args=(0, str))
    answered.start()
    proc = _start(tmp_path, _config(workers, 1), "--startup-timeout", "3")
    try:
        answered.join(TIMEOUT)
        assert not answered.is_alive()
        rendezvous.close()
        seconds, status, lines = _ends(proc)
    finally:
        proc.kill()
    assert status == -signal.SIGUSR1 and 128 + signal.SIGUSR1 == RETRYABLE, (status, lines)
    assert seconds < 3 + BOUND
    assert _one_line(lines, "the cluster") == (
        "the cluster did not form within 3 s (--startup-timeout) after every worker answered: a worker stopped "
        "before TensorFlow formed the cluster; rerun every worker's command: nothing saved yet: the rerun "
        "starts afresh")


def test_the_sentinel_ends_its_process_unless_told_in_time(tmp_path):
    code = ("import sys, time; from recipes.inception_bn.cluster import formation_sentinel; "
            "s = formation_sentinel(float(sys.argv[1]), 'given up'); time.sleep(float(sys.argv[2])); "
            "s.stdin.close(); s.wait(); print('formed')")
    slow = subprocess.run([sys.executable, "-c", code, "0.5", "60"], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=TIMEOUT)
    assert slow.returncode == -signal.SIGUSR1 and slow.stderr.strip() == "given up" and slow.stdout == ""
    quick = subprocess.run([sys.executable, "-c", code, "60", "0"], capture_output=True, text=True, cwd=ROOT,
                           env=_env(), timeout=TIMEOUT)
    assert quick.returncode == 0 and quick.stdout == "formed\n" and quick.stderr == ""


# Bad cluster input: one line, status 2, before anything starts --------------------------------------

@pytest.mark.parametrize("config, said", [
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}',
     "TF_CONFIG's task index 5 does not fit the cluster: worker has 2 task(s), index 0 to 1"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
     "TF_CONFIG's task type 'chief' is not a job of its cluster (worker)"),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster worker 1 is 'b': expected \"host:port\""),
    ('{"cluster": {"worker": ["a:1", "b:70000"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster worker 1 is 'b:70000': expected \"host:port\" with a port from 1 to 65535"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster lists a:1 more than once: each task needs its own host:port"),
    ('{"cluster": {"chief": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
     "TF_CONFIG's cluster has 2 chiefs: at most one"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster has job(s) ps: the recipe trains on \"chief\" and \"worker\" tasks only"),
    ('{"cluster": {"worker": ["a:1"]}}', 'TF_CONFIG has no "task" with "type" and "index"'),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster"'),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
     "TF_CONFIG's cluster worker is 'a:1': expected a list of \"host:port\""),
])
def test_a_tf_config_that_does_not_fit_is_refused_in_one_line(config, said):
    with pytest.raises(Refused) as refused:
        parse_tf_config(config)
    assert str(refused.value).startswith(said), str(refused.value)


def test_the_chief_leads_and_ipv6_addresses_parse():
    parsed = parse_tf_config(json.dumps({"cluster": {"worker": ["[::1]:2000", "h:2001"], "chief": ["c:1999"]},
                                         "task": {"type": "worker", "index": 1}}))
    assert [t.name for t in parsed.tasks] == ["chief 0", "worker 0", "worker 1"]
    assert parsed.leader.name == "chief 0" and parsed.own.name == "worker 1"
    assert (parsed.tasks[1].host, parsed.tasks[1].port) == ("::1", 2000)
    assert [t.name for t in parsed.peers] == ["chief 0", "worker 0"]


def test_the_recipe_refuses_a_task_index_outside_the_cluster_with_status_2(tmp_path, capsys, monkeypatch,
                                                                          tiny_variant):
    monkeypatch.setenv("TF_CONFIG", _config(["127.0.0.1:1", "127.0.0.1:2"], 5))
    status, stderr = _main_in_process(["--run-dir", str(tmp_path), *TINY], capsys)
    assert status == REFUSED and "Traceback" not in stderr
    assert stderr.strip() == ("error: TF_CONFIG's task index 5 does not fit the cluster: worker has 2 task(s), "
                              "index 0 to 1")


def test_the_test_ports_are_outside_the_kernels_range_and_claimed(tmp_path):
    from tests.helpers import ports

    claimed = free_ports(3)
    assert len(set(claimed)) == 3 and all(1024 <= p < ports._ephemeral_start() for p in claimed)
    # Another test run (another process) does not get them while this one holds them.
    code = ("import fcntl, sys; from tests.helpers.ports import _LOCKS; "
            "f = open(_LOCKS / sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    other = subprocess.run([sys.executable, "-c", code, str(claimed[0])], capture_output=True, text=True,
                           cwd=ROOT, env=_env(), timeout=TIMEOUT)
    assert other.returncode != 0 and "BlockingIOError" in other.stderr
