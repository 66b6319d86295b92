"""The paper's training variants (section 4.2), as data.

Each variant says how the network is built and trained; ``train.py`` reads
nothing else. The learning rates are the paper's, for a mini-batch of 32
(``REFERENCE_BATCH``). The accelerated variants (section 4.2.1) decay the
learning rate 6x faster, use 5x less L2 weight decay, no dropout and
lighter photometric distortion; every BN variant drops LRN.

Scaling rule for other batch sizes and replica counts (``schedule``):
the learning rate grows linearly with the *global* batch
(``batch_size * replicas``; Goyal et al. 2017), ``lr = lr_32 * global / 32``,
with a linear warm-up over ``warmup_epochs`` when that is above 1
(large batches diverge without it); decay is counted in epochs, so the
schedule per example seen does not change; L2 and momentum stay as they are.
Synchronized BN keeps the statistics those of the global batch, so BN's
behaviour does not change with the replica count either.

Not in the paper's table: ``inception-x5`` and ``inception-x30`` are the
no-BN network at BN-x5's and BN-x30's learning rates, the controls that
show the higher rates need BN.
"""

from __future__ import annotations

import dataclasses

import keras

REFERENCE_BATCH = 32
# GoogLeNet: the learning rate falls 4% every 8 epochs; TF-slim's weight decay 4e-5.
BASE_DECAY_RATE = 0.96
BASE_DECAY_EPOCHS = 8.0
BASE_WEIGHT_DECAY = 4e-5


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the paper's comparison.

    Attributes:
        name: command-line name.
        description: one line, for ``--help`` and the tables.
        batch_norm: BN before every non-linearity (and no LRN).
        activation: the network's non-linearity.
        learning_rate: initial learning rate at a global batch of 32.
        decay_epochs: epochs per ``decay_rate`` factor of exponential decay.
        decay_rate: the factor.
        weight_decay: L2 coefficient ``c`` of the loss term ``c/2 * sum(w^2)``
            over convolution and classifier kernels (not biases, not BN's
            gamma and beta).
        dropout: rate before the classifier.
        distortion: strength of the photometric distortions (1 = GoogLeNet's).
        momentum: SGD momentum.
        in_paper: a row of the paper's table (False for the control).
    """

    name: str
    description: str
    batch_norm: bool
    activation: str
    learning_rate: float
    decay_epochs: float
    weight_decay: float
    dropout: float
    distortion: float
    decay_rate: float = BASE_DECAY_RATE
    momentum: float = 0.9
    in_paper: bool = True

    @property
    def lrn(self) -> bool:
        return not self.batch_norm

    def build_model(self, num_classes, input_shape, width_multiplier=1.0, synchronized=False,
                    bn_momentum=0.99, stem="imagenet"):
        """The network this variant trains."""
        from recipes.inception_bn.model import bn_inception, inception

        if self.batch_norm:
            return bn_inception(num_classes, input_shape, activation=self.activation,
                                synchronized=synchronized, width_multiplier=width_multiplier,
                                dropout=self.dropout, bn_momentum=bn_momentum, stem=stem,
                                name=self.name.replace("-", "_"))
        return inception(num_classes, input_shape, activation=self.activation,
                         width_multiplier=width_multiplier, dropout=self.dropout, lrn=self.lrn,
                         stem=stem, name=self.name.replace("-", "_"))

    def build_for_training(self, source, plan, width_multiplier, stem, bn_momentum, warmup_epochs, strategy):
        """The network, its SGD optimizer (built: its slots exist before a checkpoint restores them)
        and the learning-rate schedule, created in ``strategy``'s scope for ``plan``'s global batch."""
        schedule = self.schedule(plan.global_batch, source.train_examples, warmup_epochs)
        with strategy.scope():
            model = self.build_model(source.num_classes, source.image_shape, width_multiplier,
                                     plan.synchronized, bn_momentum, stem)
            optimizer = keras.optimizers.SGD(schedule, momentum=self.momentum)
            if keras.mixed_precision.global_policy().name == "mixed_float16":
                optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
        return model, optimizer, schedule

    def scaled_learning_rate(self, global_batch: int) -> float:
        """The initial learning rate for ``global_batch`` (linear scaling rule)."""
        return self.learning_rate * global_batch / REFERENCE_BATCH

    def schedule(self, global_batch: int, epoch_size: int, warmup_epochs: float = 0.0):
        """The learning rate as a function of the step (a Keras schedule).

        Args:
            global_batch: examples per step, over all replicas.
            epoch_size: training examples per epoch.
            warmup_epochs: linear warm-up from the batch-32 learning rate
                (0: none).
        """
        if global_batch < 1 or epoch_size < 1:
            raise ValueError(f"global_batch and epoch_size must be positive, got {global_batch}, {epoch_size}.")
        steps_per_epoch = epoch_size / global_batch
        return StepSchedule(
            initial_learning_rate=self.scaled_learning_rate(global_batch),
            decay_steps=self.decay_epochs * steps_per_epoch,
            decay_rate=self.decay_rate,
            warmup_steps=warmup_epochs * steps_per_epoch,
            warmup_from=self.learning_rate,
        )


@keras.saving.register_keras_serializable(package="recipes")
class StepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Exponential decay ``lr * rate ** (step / decay_steps)`` after a linear warm-up.

    Args:
        initial_learning_rate: the rate the warm-up reaches at ``warmup_steps``.
        decay_steps: steps per factor of ``decay_rate`` (counted from step 0).
        decay_rate: the factor.
        warmup_steps: length of the linear warm-up (0: none).
        warmup_from: the rate at step 0 when warming up.

    Example:

    >>> round(float(StepSchedule(0.1, 10, 0.5)(10)), 6)
    0.05
    """

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, warmup_steps=0.0, warmup_from=0.0):
        if decay_steps <= 0 or not 0 < decay_rate <= 1:
            raise ValueError(f"decay_steps must be > 0 and decay_rate in (0, 1], got {decay_steps}, {decay_rate}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = float(decay_steps)
        self.decay_rate = float(decay_rate)
        self.warmup_steps = float(warmup_steps)
        self.warmup_from = float(warmup_from)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        decayed = self.initial_learning_rate * keras.ops.power(self.decay_rate, step / self.decay_steps)
        if self.warmup_steps <= 0:
            return decayed
        fraction = keras.ops.minimum(step / self.warmup_steps, 1.0)
        warm = self.warmup_from + (self.initial_learning_rate - self.warmup_from) * fraction
        return keras.ops.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "decay_rate": self.decay_rate, "warmup_steps": self.warmup_steps,
                "warmup_from": self.warmup_from}


_BASE_LR = 0.0015
_FAST_DECAY_EPOCHS = BASE_DECAY_EPOCHS / 6      # section 4.2.1: decay 6x faster
_LOW_WEIGHT_DECAY = BASE_WEIGHT_DECAY / 5       # section 4.2.1: L2 reduced 5x
_REDUCED_DISTORTION = 0.5

VARIANTS = {v.name: v for v in (
    Variant("inception", "Inception, no BN: LRN, dropout 0.4 (the baseline)", batch_norm=False,
            activation="relu", learning_rate=_BASE_LR, decay_epochs=BASE_DECAY_EPOCHS,
            weight_decay=BASE_WEIGHT_DECAY, dropout=0.4, distortion=1.0),
    Variant("bn-baseline", "Inception with BN before each non-linearity, same schedule", batch_norm=True,
            activation="relu", learning_rate=_BASE_LR, decay_epochs=BASE_DECAY_EPOCHS,
            weight_decay=BASE_WEIGHT_DECAY, dropout=0.4, distortion=1.0),
    Variant("bn-x5", "BN, learning rate x5, 4.2.1's changes", batch_norm=True, activation="relu",
            learning_rate=_BASE_LR * 5, decay_epochs=_FAST_DECAY_EPOCHS, weight_decay=_LOW_WEIGHT_DECAY,
            dropout=0.0, distortion=_REDUCED_DISTORTION),
    Variant("bn-x30", "BN, learning rate x30, 4.2.1's changes", batch_norm=True, activation="relu",
            learning_rate=_BASE_LR * 30, decay_epochs=_FAST_DECAY_EPOCHS, weight_decay=_LOW_WEIGHT_DECAY,
            dropout=0.0, distortion=_REDUCED_DISTORTION),
    Variant("bn-x5-sigmoid", "BN-x5 with sigmoid instead of ReLU", batch_norm=True, activation="sigmoid",
            learning_rate=_BASE_LR * 5, decay_epochs=_FAST_DECAY_EPOCHS, weight_decay=_LOW_WEIGHT_DECAY,
            dropout=0.0, distortion=_REDUCED_DISTORTION),
    Variant("inception-x5", "control: no BN at BN-x5's learning rate", batch_norm=False, activation="relu",
            learning_rate=_BASE_LR * 5, decay_epochs=BASE_DECAY_EPOCHS, weight_decay=BASE_WEIGHT_DECAY,
            dropout=0.4, distortion=1.0, in_paper=False),
    Variant("inception-x30", "control: no BN at BN-x30's learning rate", batch_norm=False, activation="relu",
            learning_rate=_BASE_LR * 30, decay_epochs=BASE_DECAY_EPOCHS, weight_decay=BASE_WEIGHT_DECAY,
            dropout=0.4, distortion=1.0, in_paper=False),
)}
PAPER_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.in_paper)


def get_variant(name: str) -> Variant:
    """The variant called ``name``; ValueError listing the names otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}") from None


def variants_help() -> str:
    return "\n".join(f"  {v.name:<14} {v.description} (lr {v.learning_rate:g} at batch {REFERENCE_BATCH})"
                     for v in VARIANTS.values())
