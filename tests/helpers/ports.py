"""TCP ports for the tests' clusters that nothing else takes before the workers do.

A port found free by binding port 0 and released is back in the kernel's ephemeral range, which
serves every ``bind(0)`` and every outgoing connection of every process: another test, or a
second ``make test`` beside this one, could take it before the worker binds it (seen: a gRPC
server that could not start). Ports here come from below that range, which the kernel never
hands out by itself, and each is claimed with a lock file that every test run on this machine
respects, held until this process ends (a port is used once per process).
"""

import fcntl
import random
import socket
import tempfile
from pathlib import Path

_LOCKS = Path(tempfile.gettempdir()) / "kerasbn-test-ports"
_held = []  # open lock files: the claims last as long as this process


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers bind
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def reserve_ports(n: int) -> list[int]:
    """``n`` distinct ports, each free now, below the ephemeral range and claimed for this process."""
    high = _ephemeral_start()
    low = max(1024, high - 12000)
    _LOCKS.mkdir(exist_ok=True)
    chosen = []
    for port in random.sample(range(low, high), min(2000, high - low)):
        lock = open(_LOCKS / str(port), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if not _bindable(port):
            lock.close()
            continue
        _held.append(lock)
        chosen.append(port)
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"no {n} free ports between {low} and {high}")


__all__ = ["reserve_ports"]
