"""recipes/inception_bn/processes.py: the runs a command starts, stopped together, one command per
run directory (the signals' path end to end: tests/recipes/test_reproduce.py)."""

import os
import sys

import pytest

from recipes.inception_bn import compare, processes


def test_nothing_new_starts_after_a_run_is_interrupted():
    started = []

    def run(item):
        started.append(item)
        if item == "b":
            raise processes.RunInterrupted("b was interrupted")
        return item

    for jobs in (1, 2):
        started.clear()
        with pytest.raises(processes.RunInterrupted, match="b was interrupted"):
            processes.in_parallel(run, ["a", "b", "c", "d", "e"], jobs)
        # With two at a time, "c" may have started beside "b"; nothing after it.
        assert started[:2] == ["a", "b"] and set(started) <= {"a", "b", "c"}, started
    assert processes.in_parallel(run, ["a", "c"], 2) == ["a", "c"]


HOLD_THE_LOCK = """
import sys
from pathlib import Path
from recipes.inception_bn import processes
with processes.holding(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_command_on_the_same_run_dir_is_refused_in_one_line(tmp_path, capsys):
    # Another terminal's `make reproduce` (a real process) holds the run directory: compare and
    # reproduce refuse to train the same runs into the same files, naming its pid; once it is gone
    # (killed: the kernel's lock goes with it) the directory is free.
    import signal
    import subprocess

    from recipes.inception_bn import reproduce
    from tests.helpers import forkserver
    from tests.helpers.distributed import ROOT

    holder = forkserver.popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        for command in (lambda: compare.main(["--run-dir", str(tmp_path), "--dataset", "synthetic"]),
                        lambda: reproduce.main(["--run-dir", str(tmp_path), "--seeds", "0,1"])):
            assert command() == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line == (f"error: another command (pid {holder.pid}) is training in {tmp_path}; "
                            "wait for it to end or stop it, then rerun")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with processes.holding(tmp_path):
        assert (tmp_path / ".command.lock").read_text() == f"{os.getpid()}\n"
