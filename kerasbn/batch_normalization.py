"""The kerasbn BatchNormalization layer (local and synchronized)."""

from __future__ import annotations

import numbers

import keras
from keras import constraints, initializers, ops, regularizers

from kerasbn import kernels
from kerasbn.backend import INFERENCE_BACKENDS, SUPPORTED_BACKENDS, require_backend
from kerasbn.kernels.portable import normalize_inference
from kerasbn.scopes import applies_open_scope
from kerasbn.statistics import Averages, updated_averages

_RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _check_fraction(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a float in [0, 1)"
            + (" or None" if allow_none else "")
            + f"; received {name}={value!r}."
        )
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1); received {name}={value!r}.")
    return float(value)


def _check_positive_int(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a positive int or None; received {name}={value!r}."
        )
    if value <= 0:
        raise ValueError(
            f"`{name}` must be a positive int or None; received {name}={value!r}."
        )
    return int(value)


def _check_renorm_clipping(renorm_clipping) -> dict:
    if renorm_clipping is None:
        return {}
    if not isinstance(renorm_clipping, dict):
        raise TypeError(
            "`renorm_clipping` must be a dict with keys among "
            f"{_RENORM_CLIPPING_KEYS}; received {renorm_clipping!r}."
        )
    unknown = set(renorm_clipping) - set(_RENORM_CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"Received invalid keys for `renorm_clipping` argument: {sorted(unknown)}; "
            f"supported keys: {list(_RENORM_CLIPPING_KEYS)}."
        )
    clipping = {k: (None if v is None else float(v)) for k, v in renorm_clipping.items()}
    rmin, rmax, dmax = (clipping.get(k) for k in ("rmin", "rmax", "dmax"))
    if rmin is not None and rmax is not None and rmin > rmax:
        raise ValueError(
            "rmax should be greater than rmin in the `renorm_clipping` argument; "
            f"received rmax={rmax}, rmin={rmin}."
        )
    if dmax is not None and dmax < 0:
        raise ValueError(
            f"dmax should be non-negative in the `renorm_clipping` argument; received dmax={dmax}."
        )
    return clipping


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization (Ioffe & Szegedy, 2015), local or synchronized.

    During training (``training=True``) each channel is normalized with the
    mean and the biased variance of the current batch, computed over every
    axis but ``axis`` (for convolutions: the batch and all spatial
    positions), then scaled by ``gamma`` and shifted by ``beta`` (the paper's
    Algorithm 1); gradients flow through the statistics. The population
    statistics used at inference are tracked as

    ``moving = momentum * moving + (1 - momentum) * batch_statistic``

    where, by default, the variance fed to the average is the *unbiased*
    ``m / (m - 1) * batch_variance`` of the paper's Algorithm 2 (``m`` values
    per channel in the batch). Keras' own layer averages the biased variance.
    During inference (``training=False``, and always when
    ``trainable=False``, as in Keras) the moving statistics are used and never
    change.

    Everything about ``keras.layers.BatchNormalization`` holds here (same
    arguments, defaults and weights), plus: the unbiased population variance,
    exact cumulative averages (``momentum=None``), ghost batches
    (``virtual_batch_size``), float32 statistics under any dtype policy,
    TensorFlow's fused kernel where possible, safe empty and one-value
    batches, and synchronization across replicas with one collective.

    Args:
        axis: int, the channel axis to keep (-1 for channels-last, 1 for
            channels-first convolutions).
        momentum: float in [0, 1), the moving average's momentum; or None
            for the cumulative average over all training batches seen
            (exact population statistics, counted by ``num_batches``).
        epsilon: float > 0 added to the variance before the square root.
        center: if True, add the learned offset ``beta``.
        scale: if True, multiply by the learned ``gamma``.
        beta_initializer, gamma_initializer: initializers of ``beta`` and
            ``gamma``.
        moving_mean_initializer, moving_variance_initializer: initializers of
            the moving statistics.
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        unbiased_variance: if True (default), the moving variance averages
            ``m / (m - 1)`` times the batch variance (Algorithm 2). A batch
            with a single value per channel (``m = 1``) carries no variance
            estimate: it is still normalized (its output is ``beta``) but
            leaves the moving statistics unchanged. If False, the biased
            batch variance is averaged, as Keras does.
        virtual_batch_size: int or None. Ghost batch normalization: each
            consecutive group of ``virtual_batch_size`` examples is
            normalized with its own statistics; it must divide the batch.
            The moving statistics then average the ghost batches' statistics
            (their mean of means and mean of unbiased variances: each ghost
            batch is one of Algorithm 2's mini-batches). Not combinable with
            ``renorm`` or ``synchronized``.
        renorm: if True, Batch Renormalization (Ioffe, 2017): training output
            ``gamma * (x_hat * r + d) + beta`` with ``r``, ``d`` from the
            renorm moving statistics, clipped; inference is unchanged. As in
            Keras, the weights add ``moving_stddev`` (the moving average runs
            over ``sqrt(variance + epsilon)`` and ``moving_variance`` is
            derived from it), ``renorm_mean`` and ``renorm_stddev``, so Keras'
            renorm weights load as they are.
        renorm_clipping: dict with optional keys ``rmax``, ``rmin``, ``dmax``
            (defaults inf, 0, inf); ``r`` is clipped to ``[rmin, rmax]`` and
            ``d`` to ``[-dmax, dmax]``.
        renorm_momentum: float in [0, 1), momentum of the renorm statistics.
        synchronized: if True, the batch statistics are those of the global
            batch across devices: the replicas of a ``tf.distribute`` strategy
            (one collective per layer forward, one backward; see
            ``SyncBatchNormalization``), on JAX the devices of
            ``keras.distribution.DataParallel``, on PyTorch the ranks of
            ``torch.distributed`` (under ``DistributedDataParallel`` too; a
            Keras model there is called with ``training=True``). If False, each
            device normalizes its own share of the batch, on every backend.
        sync_group_size: int or None; with ``synchronized=True``, devices
            share statistics within consecutive groups of this many devices
            (it must divide the device count); None means all devices.
        axis_name: JAX only, for code that maps the layer over devices itself
            (``jax.shard_map``, ``jax.pmap`` around ``stateless_call``): the
            mapped axis to synchronize over, as Flax's ``axis_name``; needs
            ``synchronized=True``. Not needed under ``keras.distribution``.
        fused: the backend's own batch-norm kernel. On PyTorch, None (default)
            runs ``torch.native_batch_norm`` (on the shifted input) for a local
            float32 layer without mask, ghost batches or renorm, False the
            element-wise ops; on JAX the element-wise ops always run; True is
            refused on both. On TensorFlow, None uses its fused batch-norm kernels
            (oneDNN on CPU, cuDNN on GPU) whenever the case allows it
            (float16/bfloat16/float32 input, channel axis 1 or last, no ghost
            batches) and the input has at least 2**17 values (below that the
            element-wise path is faster); False never uses them; True
            requires them. Local training (no synchronization, mask or renorm)
            is one kernel call forward (statistics and output) and one
            gradient call backward, as tf.keras 2's ``fused=True``; the input
            is shifted by a per-channel sample first where the kernel would
            lose precision (a channel's mean large against its spread; always
            under XLA and on GPU: docs/design.md, "Precision"). Masks, renorm
            and synchronization need the statistics before normalizing: they
            run the kernels split (statistics, then normalization with the
            merged statistics, whose gradient call yields the per-channel sums
            for the backward pass).
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``).

    Call arguments:
        inputs: a tensor of rank >= 2.
        training: Python bool; True normalizes with batch statistics and
            updates the moving statistics.
        mask: optional boolean tensor of ``inputs``' shape without the last
            axis (Keras' convention, whatever ``axis`` is: what ``Masking``
            and ``Embedding(mask_zero=True)`` propagate), or broadcastable to
            it; False positions are left out of the statistics (they are
            still normalized).

    Example:

    >>> import numpy as np, keras, kerasbn
    >>> layer = kerasbn.BatchNormalization(momentum=None)
    >>> x = np.random.RandomState(0).normal(5.0, 2.0, (64, 3)).astype("float32")
    >>> y = layer(x, training=True)
    >>> bool(abs(float(np.mean(y))) < 1e-4)
    True
    >>> np.round(layer.moving_mean.numpy(), 1).shape
    (3,)

    Reference: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep
    Network Training by Reducing Internal Covariate Shift", ICML 2015,
    https://arxiv.org/abs/1502.03167.
    """

    @applies_open_scope
    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        unbiased_variance=True,
        virtual_batch_size=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        sync_group_size=None,
        fused=None,
        axis_name=None,
        **kwargs,
    ):
        # Built anywhere a model loads (inference-only backends too); trained where kernels exist.
        require_backend(type(self).__name__, SUPPORTED_BACKENDS + INFERENCE_BACKENDS)
        super().__init__(**kwargs)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(
                f"`axis` must be an int (the channel axis); received axis={axis!r}."
            )
        self.axis = int(axis)
        self.momentum = _check_fraction("momentum", momentum, allow_none=True)
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
            raise TypeError(f"`epsilon` must be a float > 0; received epsilon={epsilon!r}.")
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0; received epsilon={epsilon!r}.")
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.unbiased_variance = bool(unbiased_variance)
        self.virtual_batch_size = _check_positive_int("virtual_batch_size", virtual_batch_size)
        self.renorm = bool(renorm)
        if renorm_clipping is not None and not self.renorm:
            raise ValueError(
                "`renorm_clipping` is only used with renorm=True; received "
                f"renorm_clipping={renorm_clipping!r} with renorm=False."
            )
        self.renorm_clipping = _check_renorm_clipping(renorm_clipping)
        self.renorm_momentum = _check_fraction("renorm_momentum", renorm_momentum)
        self.synchronized = bool(synchronized)
        self.sync_group_size = _check_positive_int("sync_group_size", sync_group_size)
        if self.sync_group_size is not None and not self.synchronized:
            raise ValueError(
                "`sync_group_size` needs synchronized=True; received "
                f"sync_group_size={sync_group_size} with synchronized=False."
            )
        if self.virtual_batch_size is not None and (self.renorm or self.synchronized):
            raise ValueError(
                "`virtual_batch_size` (ghost batches) cannot be combined with "
                "renorm=True or synchronized=True."
            )
        if fused not in (None, True, False):
            raise TypeError(f"`fused` must be None, True or False; received fused={fused!r}.")
        if fused and self.virtual_batch_size:
            raise ValueError(
                "fused=True is impossible with virtual_batch_size (each ghost batch "
                "has its own statistics); use fused=None."
            )
        self.fused = fused
        if axis_name is not None and not isinstance(axis_name, str):
            raise TypeError(f"`axis_name` must be a str or None; received axis_name={axis_name!r}.")
        if axis_name is not None and (not self.synchronized or self.sync_group_size is not None):
            raise ValueError(
                "`axis_name` names the mapped axis to synchronize over: it needs "
                "synchronized=True and no sync_group_size; received "
                f"axis_name={axis_name!r} with synchronized={self.synchronized}, "
                f"sync_group_size={self.sync_group_size}.")
        self.axis_name = axis_name
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_batches = None  # momentum=None's count
        self.moving_stddev = self.renorm_mean = self.renorm_stddev = None  # renorm's

    # ------------------------------------------------------------------ build
    def _channel_axis(self, rank: int) -> int:
        if rank < 2:
            raise ValueError(
                f"{type(self).__name__} expects inputs of rank >= 2 (batch and "
                f"channels); received rank {rank}."
            )
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"`axis`={self.axis} is out of range for inputs of rank {rank}; "
                f"expected an int in [{-rank}, {rank - 1}]."
            )
        axis = self.axis % rank
        if axis == 0 and self.virtual_batch_size is not None:
            raise ValueError("`virtual_batch_size` needs a batch axis other than `axis`=0.")
        return axis

    def build(self, input_shape):
        variable_dtype = keras.backend.standardize_dtype(self.dtype_policy.variable_dtype)
        if "float" not in variable_dtype:
            # Before any weight exists: torch refuses an integer trainable weight with its own error.
            raise TypeError(f"{type(self).__name__} needs a floating-point `dtype` (its weights are "
                            f"trained); received dtype={variable_dtype!r}.")
        input_shape = tuple(input_shape)
        rank = len(input_shape)
        axis = self._channel_axis(rank)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"The channel dimension (axis {self.axis}) of the inputs must be "
                f"known to build {type(self).__name__}; received input shape "
                f"{input_shape}."
            )
        if self.fused and axis not in (1, rank - 1):
            raise ValueError(
                f"fused=True needs the channel axis first or last after the batch "
                f"axis; received axis={self.axis} for rank {rank}."
            )
        shape = (channels,)
        # The statistics are float32 under every dtype policy: a float16
        # moving variance overflows at activations around 250.
        aggregation = self._statistics_aggregation()

        def add_statistic(name, initializer):
            return self.add_weight(
                shape=shape, name=name, initializer=initializer, dtype="float32",
                trainable=False, autocast=False, aggregation=aggregation,
            )

        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )
        self.moving_mean = add_statistic("moving_mean", self.moving_mean_initializer)
        self.moving_variance = add_statistic("moving_variance", self.moving_variance_initializer)
        if self.momentum is None:
            self.num_batches = self.add_weight(
                shape=(), name="num_batches", initializer="zeros", dtype="float32",
                trainable=False, autocast=False, aggregation=aggregation,
            )
        if self.renorm:
            # Keras' renorm weights: the moving average runs over the standard
            # deviation, and moving_variance is derived from it.
            variance_initializer = self.moving_variance_initializer

            def stddev_initializer(shape, dtype=None):
                return ops.sqrt(variance_initializer(shape, dtype="float32"))

            self.moving_stddev = add_statistic("moving_stddev", stddev_initializer)
            self.renorm_mean = add_statistic("renorm_mean", self.moving_mean_initializer)
            self.renorm_stddev = add_statistic("renorm_stddev", stddev_initializer)
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={axis: channels})
        self._positive_axis = axis

    def _statistics_aggregation(self) -> str:
        # Synchronized over all replicas, every replica computes identical
        # statistics: replica 0's write is the truth and costs nothing.
        # Otherwise the replicas' updates differ, and a MEAN aggregation keeps
        # one consistent set instead of copies that drift apart.
        if self.synchronized and self.sync_group_size is None:
            return "only_first_replica"
        return "mean"

    # ------------------------------------------------------------------- call
    def call(self, inputs, training=None, mask=None):
        inputs = self._check_inputs(inputs)
        mask = self._broadcast_mask(inputs, mask)
        axis = self._positive_axis
        gamma, beta = self._affine_parameters()
        if not (training and self.trainable):
            y = kernels.compiled(normalize_inference)(inputs, self.moving_mean.value, self.moving_variance.value,
                                                      gamma, beta, self.epsilon, channel_axis=axis)
            return ops.cast(y, self.compute_dtype)
        backend = kernels.current(f"Training {type(self).__name__}")

        channels = self.moving_mean.shape
        gamma = ops.ones(channels, "float32") if gamma is None else gamma
        beta = ops.zeros(channels, "float32") if beta is None else beta
        plan = backend.training_plan(self._request(), inputs, mask)
        if plan.one_pass:
            y, statistics = backend.normalize_one_pass(inputs, axis, gamma, beta, self.epsilon)
        else:
            statistics = backend.local_statistics(inputs, axis, mask, plan)
            statistics = backend.merge(statistics, plan)
        gamma, beta = self._move_averages(backend, statistics, gamma, beta)
        if not plan.one_pass:
            y = backend.normalize(inputs, axis, statistics, gamma, beta, self.epsilon, mask, plan)
        return ops.cast(y, self.compute_dtype)

    def _request(self) -> kernels.Request:
        return kernels.Request(
            channel_axis=self._positive_axis, fused=self.fused, virtual_batch_size=self.virtual_batch_size,
            synchronized=self.synchronized, sync_group_size=self.sync_group_size,
            axis_name=self.axis_name, renorm=self.renorm)

    def _check_inputs(self, inputs):
        inputs = ops.convert_to_tensor(inputs)
        if "float" not in keras.backend.standardize_dtype(inputs.dtype):
            raise TypeError(
                f"{type(self).__name__} expects floating-point inputs; received "
                f"dtype {keras.backend.standardize_dtype(inputs.dtype)}."
            )
        return inputs

    def _broadcast_mask(self, inputs, mask):
        """Keras' convention: the mask has the inputs' shape without the last
        axis (what ``Masking`` and ``Embedding(mask_zero=True)`` propagate),
        whatever ``axis`` is. Returned with that axis as size 1: it broadcasts
        where it is used, never materialized at the inputs' size."""
        if mask is None:
            return None
        mask = ops.convert_to_tensor(mask)
        input_shape, mask_shape = tuple(inputs.shape), tuple(mask.shape)
        rank = len(input_shape)
        expected = f"the inputs' shape without the last axis (rank {rank - 1})"
        if len(mask_shape) != rank - 1:
            raise ValueError(
                f"`mask` must have {expected}; received mask shape {mask_shape} for "
                f"inputs shape {input_shape}."
            )
        if not all(m in (1, None) or x in (1, None) or m == x
                   for m, x in zip(mask_shape, input_shape[:-1], strict=True)):
            raise ValueError(
                f"`mask` must have {expected}, or broadcast to it; received mask "
                f"shape {mask_shape} for inputs shape {input_shape}."
            )
        return ops.expand_dims(ops.cast(mask, "bool"), -1)

    def _affine_parameters(self):
        gamma = ops.cast(self.gamma, "float32") if self.scale else None
        beta = ops.cast(self.beta, "float32") if self.center else None
        return gamma, beta

    def _move_averages(self, backend, statistics, gamma, beta):
        """Feeds the batch statistics (``(C,)``, ``(G, C)`` for groups) to the averages
        (:func:`kerasbn.statistics.updated_averages`: the guard, Algorithm 2's averages, renorm's
        corrections) and returns the gamma and beta to normalize with."""
        def value(variable):
            return None if variable is None else variable.value

        averages = Averages(value(self.moving_mean), value(self.moving_variance), value(self.num_batches),
                            value(self.moving_stddev), value(self.renorm_mean), value(self.renorm_stddev))
        clipping = tuple(self.renorm_clipping.get(k) for k in ("rmin", "rmax", "dmax"))
        gamma, beta, moved = backend.compiled(updated_averages)(
            statistics, gamma, beta, averages, self.momentum, self.epsilon, self.renorm_momentum, clipping,
            unbiased=self.unbiased_variance)
        for name, new in moved._asdict().items():
            if new is not None:
                getattr(self, name).assign(new)
        return gamma, beta

    # ------------------------------------------------------------ the rest
    def compute_output_shape(self, input_shape):
        self._channel_axis(len(input_shape))
        return tuple(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "unbiased_variance": self.unbiased_variance,
                "virtual_batch_size": self.virtual_batch_size,
                "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping or None,
                "renorm_momentum": self.renorm_momentum,
                "synchronized": self.synchronized,
                "sync_group_size": self.sync_group_size,
                "fused": self.fused,
            }
        )
        if self.axis_name is not None:  # JAX-only; configs without it load anywhere
            config["axis_name"] = self.axis_name
        return config


@keras.saving.register_keras_serializable(package="kerasbn")
class SyncBatchNormalization(BatchNormalization):
    """``BatchNormalization(synchronized=True)`` under its own name.

    Under ``tf.distribute.MirroredStrategy`` or ``MultiWorkerMirroredStrategy``
    the batch statistics in training are those of the global batch (or of
    each group of ``sync_group_size`` replicas), merged from every replica's
    ``(count, mean, M2)`` with a single all-reduce per layer; gradients are
    those of single-device batch normalization on the concatenated batch.
    Outside a strategy, or with one replica, it is exactly the local layer.
    Takes every argument of :class:`BatchNormalization`.

    Example:

    >>> import tensorflow as tf, kerasbn
    >>> strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    >>> with strategy.scope():
    ...     layer = kerasbn.SyncBatchNormalization()
    >>> layer.synchronized
    True
    """

    def __init__(self, *args, synchronized=True, **kwargs):
        if not synchronized:
            raise ValueError(
                "SyncBatchNormalization is always synchronized; use "
                "kerasbn.BatchNormalization for synchronized=False."
            )
        super().__init__(*args, synchronized=True, **kwargs)
