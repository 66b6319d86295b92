"""Every worker of a cluster meets every other before TensorFlow forms it (see ``cluster.py``: why).

Each worker holds its own port (:func:`listen`: the one TensorFlow takes next; held by another
process -> :class:`NotFormed` naming the holder) and greets each peer until every worker has
answered every other (:class:`Rendezvous`); the greeting carries the cluster's fingerprint, so
workers started with different clusters are told so instead of waiting on each other.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

from recipes.inception_bn.ending import RETRYABLE, Refused, RunEnded

if TYPE_CHECKING:  # the types only: cluster.py imports this module
    from recipes.inception_bn.cluster import Cluster, Task

_PROTOCOL = "kerasbn-rendezvous/1"
_PROBE_EVERY = 0.2  # seconds between rounds of probes of the peers not yet seen
_ANSWER_WITHIN = 2.0  # seconds a peer has to answer a probe


class NotFormed(RunEnded):
    """The cluster did not form (a peer silent, this worker's port held): a retry may succeed."""

    status = RETRYABLE


# This worker's port -----------------------------------------------------------------------------

def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` on this machine (``"pid N: command"``), where /proc tells; else None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, IndexError, ValueError, StopIteration):
            continue
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid}: {command[:120]}"
        except OSError:
            continue
    return None


def listen(own: Task) -> socket.socket:
    """This worker's port, held from now until TensorFlow takes it (all interfaces, as TensorFlow binds)."""
    family = socket.AF_INET6 if ":" in own.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier attempt's TIME_WAIT is no owner
    try:
        listener.bind(("", own.port))
    except OSError as error:
        listener.close()
        if error.errno != errno.EADDRINUSE:
            raise Refused(f"{own.name} cannot listen on port {own.port} ({own.address} in TF_CONFIG): "
                          f"{error.strerror or error}") from None
        holder = port_holder(own.port)
        earlier = holder is not None and "recipes.inception_bn.train" in holder
        raise NotFormed(
            f"port {own.port} of {own.name} ({own.address} in TF_CONFIG) is in use"
            + (f" by {holder}" if holder else "")
            + ("; probably this worker's process from an earlier attempt: stop it, then rerun" if earlier
               else "; stop what holds it, or give this task another port in every worker's TF_CONFIG")) from None
    listener.listen(16)
    listener.settimeout(0.1)  # the accept loop checks whether to end
    return listener


# Meeting every worker ----------------------------------------------------------------------------

def _greeting(cluster: Cluster) -> bytes:
    return f"{_PROTOCOL} {cluster.digest} {cluster.own.job} {cluster.own.index}\n".encode()


def _read_greeting(conn: socket.socket) -> tuple[str, str, int] | None:
    """``(digest, job, index)`` from a peer's line, or None when it is not this protocol."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 256:
        chunk = conn.recv(256)
        if not chunk:
            break
        data += chunk
    fields = data.decode(errors="replace").split()
    if len(fields) != 4 or fields[0] != _PROTOCOL or not fields[3].isdigit():
        return None
    return fields[1], fields[2], int(fields[3])


class Rendezvous:
    """Every worker answers every other on its own port before TensorFlow forms the cluster.

    A worker is done when it has reached every peer (:attr:`seen`) and every peer has reached it
    (:attr:`seen_by`): then no peer will probe its port again, and it can hand the port to
    TensorFlow. Each greeting carries the cluster's fingerprint, so workers started with
    different clusters in their TF_CONFIG are told so instead of waiting on each other.
    """

    def __init__(self, cluster: Cluster, listener: socket.socket):
        self.cluster, self._listener = cluster, listener
        self.seen, self.seen_by = set(), set()
        self.trouble = {}  # peer name -> why its last probe failed
        self.disagrees = None  # the name of a peer whose TF_CONFIG gives another cluster
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._answer, name="rendezvous", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._listener.close()

    def _answer(self) -> None:
        names = {(t.job, t.index): t.name for t in self.cluster.peers}
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(_ANSWER_WITHIN)
                    greeting = _read_greeting(conn)
                    if greeting is None or (greeting[1], greeting[2]) not in names:
                        continue
                    conn.sendall(_greeting(self.cluster))
                except OSError:
                    continue
            self._record(names[(greeting[1], greeting[2])], greeting[0], self.seen_by)

    def _record(self, name: str, digest: str, met: set) -> bool:
        """A peer met (``met``: :attr:`seen` or :attr:`seen_by`), or one whose TF_CONFIG disagrees (False)."""
        with self._lock:
            if digest != self.cluster.digest:
                self.disagrees = name
                return False
            met.add(name)
            return True

    def probe(self, peer: Task) -> None:
        """Greets ``peer`` once; records that it answered, or why not."""
        try:
            infos = socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            self.trouble[peer.name] = f"its name {peer.host} does not resolve"
            return
        try:
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as conn:
                conn.settimeout(_ANSWER_WITHIN)
                conn.connect(infos[0][4])
                conn.sendall(_greeting(self.cluster))
                greeting = _read_greeting(conn)
        except ConnectionRefusedError:
            self._failed(peer, "nothing listens there: not started yet, or another address")
            return
        except TimeoutError:
            self._failed(peer, "no answer: a host that is down, or a firewall")
            return
        except OSError as error:
            self._failed(peer, error.strerror or str(error))
            return
        if greeting is None or (greeting[1], greeting[2]) != (peer.job, peer.index):
            self._failed(peer, "something else answers there: a process of an earlier attempt, or another "
                               "program, holds that port")
            return
        if self._record(peer.name, greeting[0], self.seen):
            self.trouble.pop(peer.name, None)

    def _failed(self, peer: Task, why: str) -> None:
        """A probe of ``peer`` that met no rendezvous. A peer that has reached this worker (alive,
        with this cluster) and no longer answers on its port has ended its own rendezvous: it had
        met every worker, this one included, and handed its port to TensorFlow. Its answer to this
        worker's earlier probe was lost (a read that timed out on a busy machine; seen: a
        3-worker start of `make test-processes` stuck until --startup-timeout); it counts as met.
        Any other failure is ``why``."""
        with self._lock:
            moved_on = peer.name in self.seen_by
            if moved_on:
                self.seen.add(peer.name)
        if moved_on:
            self.trouble.pop(peer.name, None)
        else:
            self.trouble[peer.name] = why

    def wait(self, timeout: float, resume_fn) -> None:
        """Until every worker has met every other; :class:`NotFormed` after ``timeout`` s (0: never),
        :class:`Refused` when a peer's TF_CONFIG gives another cluster."""
        names = {peer.name for peer in self.cluster.peers}
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            for peer in self.cluster.peers:
                if peer.name not in self.seen:
                    self.probe(peer)
            with self._lock:
                disagrees, seen, seen_by = self.disagrees, set(self.seen), set(self.seen_by)
            if disagrees is not None:
                raise Refused(f"{disagrees}'s TF_CONFIG gives another cluster than {self.cluster.own.name}'s: "
                              "every worker needs the same \"cluster\" (only \"task\" differs)")
            if seen == names and seen_by == names:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise NotFormed(self._missing(names, seen, seen_by, timeout) +
                                f"; rerun every worker's command: {resume_fn()}")
            time.sleep(_PROBE_EVERY)

    def _missing(self, names, seen, seen_by, timeout) -> str:
        by_name = {peer.name: peer for peer in self.cluster.peers}
        silent = [f"{name} at {by_name[name].address} never answered ({self.trouble.get(name, 'no answer')})"
                  for name in sorted(names - seen)]
        one_way = [f"{name} at {by_name[name].address} (it answers, but has not reached {self.cluster.own.name} at "
                   f"{self.cluster.own.address}: a firewall, or another address for it in its TF_CONFIG?)"
                   for name in sorted((names & seen) - seen_by)]
        return (f"the cluster did not form within {timeout:g} s (--startup-timeout): "
                + "; ".join(silent + one_way))
