"""Building any model with kerasbn's BN: a scope in which BN constructors build kerasbn's layer.

Model zoos (keras-hub, keras.applications, a colleague's code) construct
``keras.layers.BatchNormalization`` themselves, often inside custom layers
where no graph walk can reach the instance afterwards. Inside
:func:`batch_norm_scope` the constructor itself answers with kerasbn's layer:

- ``keras.layers.BatchNormalization(...)`` (the class itself, however it was
  imported) returns a :class:`kerasbn.SyncBatchNormalization` (or
  :class:`kerasbn.BatchNormalization`) with the same arguments. Python does
  not call ``__init__`` again on an object ``__new__`` returned that is not an
  instance of the class asked for, which is what makes this sound.
- kerasbn's own ``BatchNormalization`` and ``SyncBatchNormalization`` are
  built with the scope's arguments applied on top of the caller's.

Subclasses of either class are left as they are: their code may depend on
being what they are. :func:`kerasbn.convert_sync_batchnorm` uses the scope to
rebuild custom layers and then checks that nothing was missed.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import keras

from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization

# Arguments both layers share; everything else in Keras' config is base-layer state.
_SHARED_ARGUMENTS = (
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer",
    "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer",
    "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
    "renorm", "renorm_clipping", "renorm_momentum", "synchronized", "name", "trainable",
    "dtype",
)
_KERASBN_ARGUMENTS = frozenset(inspect.signature(BatchNormalization.__init__).parameters) - {
    "self", "kwargs"}
_KERAS_BN = keras.layers.BatchNormalization
_KERASBN_CLASSES = (BatchNormalization, SyncBatchNormalization)


def kerasbn_config(layer, **overrides) -> dict:
    """The :class:`kerasbn.BatchNormalization` config equivalent to ``layer``'s.

    From Keras' own layer, it keeps Keras' biased moving variance
    (``unbiased_variance=False``); ``overrides`` are applied last.
    """
    config = dict(layer.get_config())
    if not isinstance(layer, BatchNormalization):
        config = {k: config[k] for k in _SHARED_ARGUMENTS if k in config}
        if not config.get("renorm"):
            config.pop("renorm_clipping", None)
        config["unbiased_variance"] = False
    config.update(overrides)
    return config


def replacement(layer, synchronized: bool, **overrides):
    """The unbuilt kerasbn layer that stands for BN ``layer`` (Keras' or kerasbn's)."""
    config = kerasbn_config(layer, **overrides)
    if not synchronized:
        return BatchNormalization.from_config(config)
    for argument in ("synchronized", "fused"):
        config.pop(argument, None)
    return SyncBatchNormalization.from_config(config)


class _Scopes:
    """The open scopes (innermost last) and the constructor hooks they need while any is open."""

    def __init__(self):
        self.lock = threading.RLock()
        self.stack: list[dict] = []
        self._saved = {}

    def current(self) -> dict | None:
        return self.stack[-1] if self.stack else None

    def push(self, settings: dict) -> None:
        with self.lock:
            if not self.stack:
                self._install()
            self.stack.append(settings)

    def pop(self) -> None:
        with self.lock:
            self.stack.pop()
            if not self.stack:
                self._uninstall()

    def _install(self):
        self._saved = {
            (_KERAS_BN, "__new__"): _KERAS_BN.__dict__.get("__new__"),
            (BatchNormalization, "__init__"): BatchNormalization.__dict__["__init__"],
        }
        _KERAS_BN.__new__ = staticmethod(_keras_bn_new)
        BatchNormalization.__init__ = _kerasbn_init(BatchNormalization.__dict__["__init__"])

    def _uninstall(self):
        for (cls, name), original in self._saved.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        self._saved = {}


_SCOPES = _Scopes()


def _keras_bn_new(cls, *args, **kwargs):
    instance = super(_KERAS_BN, cls).__new__(cls, *args, **kwargs)
    settings = _SCOPES.current()
    if cls is not _KERAS_BN or settings is None:
        return instance  # Python then runs __init__ as usual
    # A real Keras layer first: Keras normalizes the arguments, names it, and its config
    # is what conversion reads; the kerasbn layer takes that name.
    cls.__init__(instance, *args, **kwargs)
    return replacement(instance, settings["synchronized"], **settings["overrides"])


def _kerasbn_init(original):
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        settings = _SCOPES.current()
        if settings is None or type(self) not in _KERASBN_CLASSES:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        bound.pop("self")
        arguments = {**bound.pop("kwargs", {}), **bound, **settings["overrides"]}
        if settings["synchronized"]:
            arguments["synchronized"] = True
        return original(self, **arguments)

    # Keras reads the constructor's signature (for its automatic config) with
    # inspect.getfullargspec, which ignores functools.wraps' __wrapped__ but not this.
    __init__.__signature__ = signature
    __init__.__doc__, __init__.__qualname__ = original.__doc__, original.__qualname__
    return __init__


@contextlib.contextmanager
def batch_norm_scope(synchronized: bool = False, **overrides):
    """A context in which every BN layer constructed is kerasbn's.

    Inside it, ``keras.layers.BatchNormalization(...)`` builds a
    :class:`kerasbn.BatchNormalization` with the same arguments (a
    :class:`kerasbn.SyncBatchNormalization` when ``synchronized``), wherever
    the call is: a model zoo's constructor, a custom layer's ``__init__`` or
    ``build``, ``from_config`` while loading. Keras' biased moving variance is
    kept (``unbiased_variance=False``) unless ``overrides`` say otherwise, so
    a model built in the scope computes what the Keras-built one would. Layers
    of kerasbn's own classes get ``overrides`` (and ``synchronized=True`` when
    asked) on top of their arguments.

    What it cannot reach: subclasses of Keras' or kerasbn's BN (they keep their
    own class), and layers built before the scope opened or after it closed
    (build the model inside it). The hook is process-wide while any scope is
    open: don't build other models in other threads meanwhile.

    Args:
        synchronized: build synchronized layers (global-batch statistics under
            a ``tf.distribute`` strategy).
        **overrides: :class:`kerasbn.BatchNormalization` arguments set on every
            layer built (e.g. ``momentum=0.9``, ``sync_group_size=2``,
            ``unbiased_variance=True``).

    Example, a keras-hub backbone (``pip install keras-hub``) with synchronized
    BN from the start::

        with strategy.scope(), kerasbn.batch_norm_scope(synchronized=True):
            backbone = keras_hub.models.MobileNetBackbone(...)

    >>> import keras, kerasbn
    >>> with kerasbn.batch_norm_scope(synchronized=True, momentum=0.9):
    ...     layer = keras.layers.BatchNormalization(epsilon=1e-5)
    >>> type(layer).__name__, layer.epsilon, layer.momentum
    ('SyncBatchNormalization', 1e-05, 0.9)
    >>> type(keras.layers.BatchNormalization()).__name__
    'BatchNormalization'
    """
    if not isinstance(synchronized, bool):
        raise TypeError(f"batch_norm_scope: `synchronized` must be a bool; received {synchronized!r}.")
    unknown = sorted(set(overrides) - _KERASBN_ARGUMENTS - {"dtype", "trainable"})
    if unknown:
        raise TypeError(f"batch_norm_scope: unknown BatchNormalization argument(s) {unknown}; "
                        f"expected some of {sorted(_KERASBN_ARGUMENTS - {'synchronized'})}.")
    if overrides.get("sync_group_size") is not None and not synchronized:
        raise ValueError("batch_norm_scope: `sync_group_size` needs synchronized=True; received "
                         f"sync_group_size={overrides['sync_group_size']} with synchronized=False.")
    # Bad values fail here, naming the argument, not at the first layer the model builds.
    BatchNormalization(synchronized=synchronized, **overrides)
    _SCOPES.push({"synchronized": synchronized, "overrides": overrides})
    try:
        yield
    finally:
        _SCOPES.pop()
