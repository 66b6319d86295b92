"""Fresh processes for the tests without paying TensorFlow's import in each: a fork server.

A recipe process with the tiny network spends ~5 s of its ~6.5 s importing TensorFlow and
Keras (2 cores, AMD EPYC), and the suite starts some sixty of them. The server imports
TensorFlow, Keras and NumPy once - nothing initialized: no TensorFlow context, no device, no
thread pool, no gRPC - and forks one child per command. The child is a real process (its own
pid, signals, exit status, stdout/stderr), single-threaded like a fresh interpreter, with the
command's environment, working directory, argv and a clean signal state; it runs the module,
code or script as ``__main__``, as ``python -m module args``, ``python -c code args`` or
``python script args`` would.

:func:`popen` and :func:`run` take the same arguments as ``subprocess.Popen``/``run`` (argv
``[sys.executable, "-m", module, ...]``, ``[sys.executable, "-c", code, ...]`` or
``[sys.executable, script, ...]``) and fall back to
a plain subprocess for anything else (another Keras backend than the session's, JAX, another
interpreter). In a PyTorch session the server imports torch and Keras on it, for the ranks of
``tests/torch/test_distributed.py``. A child's own
``subprocess.run([sys.executable, ...])`` (the comparison's one process per variant) is forked by
the same server, and :func:`run` can stand in for ``subprocess.run`` in the test process too.

    python -m tests.helpers.forkserver SOCKET    # the server; started on first use, one per test process
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

_HEADER = struct.Struct("!I")
# JAX is not served: its processes (jax.distributed) start few, and a fork after importing jax is
# not a fresh process for XLA's runtime.
SERVED_BACKENDS = ("tensorflow", "torch")
_server = None
_server_lock = threading.Lock()


# The server -------------------------------------------------------------------------------------

def serve(path: str) -> None:
    import importlib

    import numpy  # noqa: F401

    # The session's backend only (KERAS_BACKEND: TensorFlow's recipe processes, PyTorch's ranks):
    # imported, nothing initialized (no thread pool, no device), so a fork is a fresh process.
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    importlib.import_module(backend)
    import keras  # noqa: F401  (after the framework: Keras on the session's backend)

    if backend == "tensorflow":
        # Most TensorFlow children train on Fashion-MNIST: decompressed once here (plain NumPy, no
        # TensorFlow state), each child finds it in the loader's cache.
        from recipes import fashion_mnist

        if fashion_mnist.find_data_dir() is not None:
            fashion_mnist.load_fashion_mnist()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".binding")
    listener.listen(64)
    os.rename(path + ".binding", path)  # the socket's name appears once it accepts connections
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    children = {}  # pid -> the connection its status goes to
    # Where the suite's CPU goes (docs/benchmarks.md#the-test-suite): each child's CPU seconds, its
    # own children's included, and the test that started it, one line per child as it is reaped.
    cpu_log, tests = os.environ.get(CPU_LOG), {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                connection, _ = listener.accept()
                request, fds = _receive(connection)
                pid = os.fork()
                if pid == 0:
                    os.close(wake_read)
                    os.close(wake_write)
                    listener.close()
                    connection.close()
                    _child(request, fds, path)  # never returns
                for fd in fds:
                    os.close(fd)
                connection.sendall(_HEADER.pack(pid))
                children[pid] = connection
                tests[pid] = request["env"].get("PYTEST_CURRENT_TEST", "-")
            else:
                os.read(wake_read, 4096)
        while children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            test = tests.pop(pid, "-")
            if cpu_log:
                with open(cpu_log, "a") as log:
                    log.write(f"{usage.ru_utime + usage.ru_stime:.2f}\t{test}\n")
            connection = children.pop(pid, None)
            if connection is not None:
                code = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, as Popen
                try:
                    connection.sendall(struct.pack("!i", code))
                except OSError:
                    pass
                connection.close()


def _receive(connection):
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    length = _HEADER.unpack(message[:_HEADER.size])[0]
    body = message[_HEADER.size:]
    while len(body) < length:
        body += connection.recv(length - len(body))
    return json.loads(body), fds


class _Parent:
    """The server a child was forked from, as ``_the_server`` hands it out: its children's own
    Python subprocesses are forked there too."""

    def __init__(self, path):
        self.path = path
        self.process = self

    def poll(self):
        return None


def _child(request, fds, path) -> None:
    global _server
    code = 1
    try:
        _server = _Parent(path)
        subprocess.run = run
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.set_wakeup_fd(-1)
        # A fresh interpreter's signal state: nothing blocked, Python's own SIGINT, defaults else.
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        import runpy

        kind, target, args = request["kind"], request["target"], request["args"]
        if kind == "module":
            sys.argv = [target, *args]
            sys.path[0] = request["cwd"]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "code":
            sys.argv = ["-c", *args]
            sys.path[0] = ""
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:  # as the interpreter does: the traceback, status 1
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


# The client -------------------------------------------------------------------------------------

SHARED = "KERASBN_TEST_FORKSERVER"  # the socket of a server shared by every process given it
# A file the server appends each reaped child's CPU seconds and test to (unset: nothing written).
CPU_LOG = "KERASBN_TEST_CHILD_CPU_LOG"
# Set to 1: no fork server; every process is a fresh interpreter, started as a user starts it
# (.ci/run runs the process scenarios so once, after the fast suite).
FRESH = "KERASBN_TEST_FRESH_INTERPRETERS"


def fresh_interpreters() -> bool:
    return os.environ.get(FRESH) == "1"


class _Server:
    def __init__(self, env, wait=True):
        self.directory = tempfile.mkdtemp(prefix="kerasbn-forkserver-")
        self.path = os.path.join(self.directory, "socket")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
        env = {k: v for k, v in env.items() if k not in ("TF_CONFIG", SHARED)}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.helpers.forkserver", self.path], cwd=root, env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        atexit.register(self.close)
        if wait and self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start ({self.process.wait()})")

    def close(self):
        self.process.kill()
        self.process.wait()
        try:
            os.unlink(self.path)
            os.rmdir(self.directory)
        except OSError:
            pass


class _Shared(_Parent):
    """A server another process started (:func:`share`): ready once its socket's name exists."""

    def __init__(self, path):
        super().__init__(path)
        deadline = time.monotonic() + 300
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the shared fork server never opened {path}")
            time.sleep(0.05)


def share() -> None:
    """Starts a server for this process and every process it starts afterwards (pytest-xdist's
    workers: one server, TensorFlow imported once, for all of them), without waiting for it."""
    global _server
    if fresh_interpreters():
        return
    with _server_lock:
        _server = _Server(dict(os.environ), wait=False)
        os.environ[SHARED] = _server.path


def _the_server(env) -> _Server:
    env = dict(os.environ if env is None else env)
    global _server
    with _server_lock:
        if _server is None and os.environ.get(SHARED):
            _server = _Shared(os.environ[SHARED])
        if _server is None or _server.process.poll() is not None:
            _server = _Server(env)
        return _server


def _forkable(args, env) -> tuple[str, str, list] | None:
    if fresh_interpreters() or not isinstance(args, (list, tuple)) or len(args) < 2 or args[0] != sys.executable:
        return None
    # The server imports this session's backend (TensorFlow or PyTorch); any other runs plain.
    session = os.environ.get("KERAS_BACKEND", "tensorflow")
    if session not in SERVED_BACKENDS or (env or os.environ).get("KERAS_BACKEND", "tensorflow") != session:
        return None
    if args[1] in ("-m", "-c") and len(args) >= 3:
        return {"-m": "module", "-c": "code"}[args[1]], args[2], list(args[3:])
    if args[1].endswith(".py"):
        return "script", args[1], list(args[2:])
    return None


class ForkedProcess:
    """The parts of ``subprocess.Popen`` the tests use, for a child of the fork server."""

    def __init__(self, kind, target, args, env, cwd, stdin, stdout, stderr, text):
        self.args = [sys.executable, *({"module": ["-m"], "code": ["-c"]}.get(kind, []) + [target]), *args]
        self.returncode = None
        child_fds, mine = [], []
        for stream, default in ((stdin, 0), (stdout, 1), (stderr, 2)):
            if stream == subprocess.PIPE:
                read, write = os.pipe()
                child_fds.append(read if default == 0 else write)
                mine.append((write, "w") if default == 0 else (read, "r"))
            elif stream == subprocess.DEVNULL:
                child_fds.append(os.open(os.devnull, os.O_RDWR))
                mine.append(None)
            elif stream == subprocess.STDOUT and default == 2:
                child_fds.append(os.dup(child_fds[1]))
                mine.append(None)
            elif stream is None:
                child_fds.append(os.dup(default))
                mine.append(None)
            else:
                child_fds.append(os.dup(stream if isinstance(stream, int) else stream.fileno()))
                mine.append(None)
        server = _the_server(env)
        request = json.dumps({"kind": kind, "target": target, "args": [str(a) for a in args],
                              "env": dict(env if env is not None else os.environ),
                              "cwd": os.fspath(cwd or os.getcwd())}).encode()
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(server.path)
        socket.send_fds(self._connection, [_HEADER.pack(len(request)) + request], child_fds)
        for fd in child_fds:
            os.close(fd)
        self.pid = _HEADER.unpack(self._receive(_HEADER.size))[0]
        self.stdin, self.stdout, self.stderr = (None if spec is None else _stream(*spec, text) for spec in mine)

    def _receive(self, size):
        data = b""
        while len(data) < size:
            chunk = self._connection.recv(size - len(data))
            if not chunk:
                raise RuntimeError("the fork server closed the connection")
            data += chunk
        return data

    def poll(self):
        if self.returncode is None:
            self._connection.setblocking(False)
            try:
                self._connection.recv(4, socket.MSG_PEEK)
            except BlockingIOError:
                return None
            finally:
                self._connection.setblocking(True)
            self._collect()
        return self.returncode

    def _collect(self):
        self.returncode = struct.unpack("!i", self._receive(4))[0]
        self._connection.close()

    def wait(self, timeout=None):
        if self.returncode is None:
            self._connection.settimeout(timeout)
            try:
                self._connection.recv(4, socket.MSG_PEEK)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            finally:
                self._connection.settimeout(None)
            self._collect()
        return self.returncode

    def communicate(self, input=None, timeout=None):
        if self.stdin is not None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        results = {}

        def read(name, stream):
            results[name] = stream.read()
            stream.close()

        readers = [threading.Thread(target=read, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join()
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, signum):
        if self.poll() is None:  # as Popen: nothing once the child is reaped (its pid may be reused)
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None:
                stream.close()
        self.wait()


def _stream(fd, mode, text):
    if text:
        return open(fd, mode, encoding="utf-8", errors="replace")
    return open(fd, mode + "b", buffering=0)


def popen(args, *, env=None, cwd=None, stdin=None, stdout=None, stderr=None, text=False):
    """``subprocess.Popen(args, ...)``, forked from the server when ``args`` runs Python code here."""
    forkable = _forkable(args, env)
    if forkable is None:
        return subprocess.Popen(args, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text)
    return ForkedProcess(*forkable, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text)


_plain_run = subprocess.run


def run(args, *, stdin=None, input=None, stdout=None, stderr=None, capture_output=False, timeout=None, check=False,
        env=None, cwd=None, text=None, **other):
    """``subprocess.run``, forked from the server when ``args`` runs Python code here and nothing
    but these arguments is asked for; a plain ``subprocess.run`` otherwise."""
    forkable = None if other else _forkable(args, env)
    if forkable is None:
        return _plain_run(args, stdin=stdin, input=input, stdout=stdout, stderr=stderr, capture_output=capture_output,
                          timeout=timeout, check=check, env=env, cwd=cwd, text=text, **other)
    if capture_output:
        stdout = stderr = subprocess.PIPE
    proc = ForkedProcess(*forkable, env=env, cwd=cwd, stdin=subprocess.PIPE if input is not None else stdin,
                         stdout=stdout, stderr=stderr, text=bool(text))
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    serve(sys.argv[1])
