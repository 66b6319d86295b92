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

A scope leaves a record on what it built, so that a ``.keras`` file rebuilds
it the same way without anyone remembering the scope: each BN constructed in a
scope notes the layers whose code is running (:func:`kerasbn.scopes.note_builders`:
the custom layer whose ``__init__`` or ``build`` made it, a model zoo's
constructor); when the scope closes, those that hold a kerasbn BN and rebuild
their BN from their own code (not a plain functional or Sequential model, whose
BN nodes are saved as kerasbn's layers) are marked (:func:`mark`). A marked
layer saves as ``kerasbn>InBatchNormScope``: its own serialization plus the
scope's arguments; loading it reopens that scope around its ``from_config``
and ``build``.

What this relies on in Keras, and nothing else: (1) ``keras.layers.BatchNormalization.__new__``
answers while a scope is open (the one constructor intercepted; :class:`_KerasConstructorHook`);
(2) Keras saves a layer under its class's registered name, so a marked layer's class is a subclass
of its own, made once per class and registered under ``kerasbn>InBatchNormScope`` (:func:`mark`).
``tests/library/test_other_models.py`` builds, saves and loads keras-hub's models through both and
fails if a Keras release changes either.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import keras

from kerasbn import scopes
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


class _KerasConstructorHook:
    """While any thread has a scope open, ``keras.layers.BatchNormalization.__new__`` asks the calling
    thread's scope (:mod:`kerasbn.scopes`) what to build: the one constructor a scope intercepts.

    Keras' layer is built in code we do not own (a model zoo, a custom layer), so its constructor
    is the only place to answer with kerasbn's layer; kerasbn's own layer reads the scope in its
    ``__init__`` (``scopes.applies_open_scope``). ``tests/library/test_other_models.py`` fails
    loudly if a Keras release stops calling ``__new__`` this way.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._open = 0
        self._saved = None

    def enter(self) -> None:
        with self._lock:
            if self._open == 0:
                self._saved = _KERAS_BN.__dict__.get("__new__")
                _KERAS_BN.__new__ = staticmethod(_keras_bn_new)
            self._open += 1

    def exit(self) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                if self._saved is None:
                    del _KERAS_BN.__new__
                else:
                    _KERAS_BN.__new__ = self._saved


_HOOK = _KerasConstructorHook()
_MARKING = threading.Lock()


def _keras_bn_new(cls, *args, **kwargs):
    instance = super(_KERAS_BN, cls).__new__(cls, *args, **kwargs)
    settings = scopes.current()
    if cls is not _KERAS_BN or settings is None:
        return instance  # Python then runs __init__ as usual
    scopes.note_builders()
    # A real Keras layer first: Keras normalizes the arguments, names it, and its config
    # is what conversion reads; the kerasbn layer takes that name.
    cls.__init__(instance, *args, **kwargs)
    return replacement(instance, settings["synchronized"], **settings["overrides"])


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

    When it closes, the layers built inside it that build their own BN (custom
    layers, a model zoo's models) and hold kerasbn's are marked, so that a
    ``.keras`` file rebuilds them inside the same scope: save after the block,
    and load anywhere with no scope open.

    What it cannot reach: subclasses of Keras' or kerasbn's BN (they keep their
    own class), and layers built before the scope opened or after it closed
    (build the model inside it). A scope is the calling thread's: models built
    in other threads meanwhile keep Keras' layer.

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
    scopes.push(synchronized, overrides)
    _HOOK.enter()
    try:
        yield
    finally:
        _HOOK.exit()
        _mark_owners(scopes.pop())


# ---------------------------------------------------------------- the record a scope leaves
def _builds_its_own_batch_norm(layer) -> bool:
    """A layer whose loading runs its own code to build BN: anything but BN itself and a
    plain functional or Sequential model (those load each BN node from its saved class)."""
    cls = type(layer)
    plain_graph = cls is keras.Sequential or (cls.__name__ == "Functional"
                                              and cls.__module__.startswith("keras."))
    return not (plain_graph or isinstance(layer, (_KERAS_BN, BatchNormalization)))


def _mark_owners(settings: dict) -> None:
    record = {"synchronized": settings["synchronized"],
              "overrides": keras.saving.serialize_keras_object(dict(settings["overrides"]))}
    for reference in settings["builders"].values():
        layer = reference()
        if layer is None or not _builds_its_own_batch_norm(layer):
            continue
        if any(isinstance(sub, BatchNormalization)
               for sub in layer._flatten_layers(include_self=False, recursive=True)):
            mark(layer, record)


def mark(layer, record: dict) -> None:
    """Makes ``layer`` save as built inside ``batch_norm_scope(**record)``.

    Its class becomes a subclass of its own (same name, same behaviour, cached per class) that
    adds only how it is saved and loaded (:class:`InBatchNormScope`); the record lives on the
    instance. Layers kerasbn built itself are the only ones marked.
    """
    original = unmarked_class(type(layer))
    object.__setattr__(layer, "_kerasbn_batch_norm_scope", record)
    object.__setattr__(layer, "__class__", _marked_class(original))


def unmarked_class(cls) -> type:
    """The class a marked layer's class stands for (``cls`` itself when not marked)."""
    return cls.__bases__[1] if issubclass(cls, InBatchNormScope) else cls


_MARKED_CLASSES: dict = {}


def _marked_class(original) -> type:
    with _MARKING:
        if original not in _MARKED_CLASSES:
            marked = type(original.__name__, (InBatchNormScope, original),
                          {"__module__": original.__module__, "__qualname__": original.__qualname__})
            _register(marked)
            _register(InBatchNormScope)  # the name keeps loading through the generic class
            _MARKED_CLASSES[original] = marked
        return _MARKED_CLASSES[original]


def _register(cls):
    return keras.saving.register_keras_serializable(package="kerasbn", name="InBatchNormScope")(cls)


@_register
class InBatchNormScope:
    """How a layer built inside :func:`batch_norm_scope` saves and loads: its own serialized
    form (``layer``) and the scope's arguments (``batch_norm_scope``); loading rebuilds and
    builds it inside that scope, so the BN its code constructs is kerasbn's again.

    Never constructed directly: :func:`mark` puts it in front of a layer's own class.
    """

    def get_config(self):
        original = unmarked_class(type(self))
        layer = {
            "module": original.__module__,
            "class_name": original.__name__,
            "config": original.get_config(self),
            "registered_name": keras.saving.get_registered_name(original),
        }
        build_config = self.get_build_config()
        if build_config is not None:
            layer["build_config"] = build_config
        return {"layer": layer, "batch_norm_scope": self._kerasbn_batch_norm_scope}

    @classmethod
    def from_config(cls, config):
        record = config["batch_norm_scope"]
        overrides = keras.saving.deserialize_keras_object(record["overrides"])
        # The scope marks what it rebuilds when it closes, so a second save records it again.
        with batch_norm_scope(synchronized=record["synchronized"], **overrides):
            return keras.saving.deserialize_keras_object(config["layer"])
