"""The open :func:`kerasbn.batch_norm_scope` blocks of each thread, and what they built.

In a module of its own so that the layer (``batch_normalization.py``) can read the scope it is
built in, and ``construction.py`` can open and close scopes, without importing each other. A
scope is the calling thread's: a model built in another thread meanwhile is not affected.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref

_local = threading.local()


def _stack() -> list[dict]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current() -> dict | None:
    """The innermost open scope's settings in this thread (``synchronized``, ``overrides``), or None."""
    stack = _stack()
    return stack[-1] if stack else None


def push(synchronized: bool, overrides: dict) -> None:
    _stack().append({"synchronized": synchronized, "overrides": overrides, "builders": {}})


def pop() -> dict:
    """Closes the innermost scope; returns its settings and the layers whose code built BN in it."""
    return _stack().pop()


def note_builders(depth: int = 2) -> None:
    """Notes, in the open scope, every layer whose code is running in this thread: the BN being
    constructed ``depth`` frames up is theirs to rebuild when a ``.keras`` file loads (a custom
    layer's ``__init__`` or ``build``, a model zoo's constructor)."""
    import keras

    settings = current()
    frame = sys._getframe(depth)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.layers.Layer) and id(owner) not in settings["builders"]:
            settings["builders"][id(owner)] = weakref.ref(owner)
        frame = frame.f_back


def applies_open_scope(init):
    """``BatchNormalization.__init__``, built inside a scope, takes the scope's arguments on top of
    the caller's (``synchronized=True`` when the scope asks). Subclasses of kerasbn's layers are left
    as they are, as with Keras' (their code may depend on their arguments)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        settings = current()
        if settings is None:
            return init(self, *args, **kwargs)
        from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization

        if type(self) not in (BatchNormalization, SyncBatchNormalization):
            return init(self, *args, **kwargs)
        note_builders()
        bound = signature.bind(self, *args, **kwargs).arguments
        bound.pop("self")
        arguments = {**bound.pop("kwargs", {}), **bound, **settings["overrides"]}
        if settings["synchronized"]:
            arguments["synchronized"] = True
        return init(self, **arguments)

    # Keras reads the constructor's signature with inspect.getfullargspec, which ignores
    # functools.wraps' __wrapped__ but not this.
    __init__.__signature__ = signature
    return __init__
