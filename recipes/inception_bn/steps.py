"""The compiled parts of a run: the device's share of the input, the training loop, the evaluation,
and what they measure.

``make_train_loop`` runs up to N training steps in one ``tf.function`` call and carries every
worker's stop vote in the step's one all-reduce; ``make_evaluate`` evaluates every example exactly
once on every replica of every worker. Nothing here knows about the run directory or the command line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from recipes.inception_bn.data import apply_distortion, to_signed_unit


def network_input(images, factors=None, strength: float = 0.0, dtype=tf.float32):
    """The device's share of the pipeline: uint8 images (and their distortion factors) to the
    network's input, in [-1, 1] and ``dtype``. Runs inside the training step, batched."""
    images = tf.cast(images, tf.float32) / 255.0
    if factors is not None and strength > 0:
        images = apply_distortion(images, factors)
    return tf.cast(to_signed_unit(images), dtype)


@dataclass(frozen=True)
class Objective:
    """The loss a replica minimizes: cross-entropy summed over its share, divided by the global batch,
    plus the L2 penalty (``weight_decay``) counted once over all replicas."""
    weight_decay: float
    global_batch: int
    replicas: int = 1

    def __call__(self, model, per_example):
        return (tf.reduce_sum(per_example) / self.global_batch
                + l2_penalty(model, self.weight_decay) / self.replicas)


@dataclass(frozen=True)
class EvalSet:
    """What ``make_evaluate`` reads: the ``split`` ("eval", or "test" beside a validation split),
    its first ``limit`` examples (None: all), ``batch_size`` at a time on each replica."""
    split: str = "eval"
    limit: int | None = None
    batch_size: int = 256


def l2_penalty(model, weight_decay):
    """``c/2 * sum(w^2)`` over convolution and classifier kernels (not biases, not BN)."""
    kernels = [w for w in model.trainable_weights
               if any(k in w.path for k in ("kernel", "depthwise_kernel", "pointwise_kernel"))]
    return weight_decay * 0.5 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in kernels])


def train_replica(model, optimizer, objective, images, labels):
    """One replica's share of a training step; returns its summed loss and correct count."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True), tf.float32)
        per_example = loss_fn(labels, logits)
        loss = objective(model, per_example)
        scaled = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
    gradients = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32))
    return tf.reduce_sum(per_example), correct


def make_train_loop(strategy, model, optimizer, objective, jit=False, stop_flag=None, prepare=None):
    """``loop(iterator, n)``: up to n training steps in one tf.function call.

    The iterator yields ``(images, labels)``, or ``(images, factors, labels)`` that
    ``prepare(images, factors)`` turns into the network's input inside the step.

    Returns the steps run, the summed loss and correct count, and the stop votes: the loop
    ends early, after the same step on every worker, once any worker's ``stop_flag`` is set
    (read each step and summed with the loss, in the step's one all-reduce). A call of one step
    runs the step's function alone: a while loop around it makes the first call (tracing and
    graph optimization) markedly slower (CHANGELOG 0.5.0).
    """
    if stop_flag is None:
        stop_flag = tf.Variable(0, trainable=False)

    def step(*batch):
        images, labels = (prepare(*batch[:-1]) if prepare else batch[0]), batch[-1]
        loss, correct = train_replica(model, optimizer, objective, images, labels)
        return tf.stack([loss, correct, tf.cast(stop_flag.read_value(), tf.float32)])

    @tf.function(jit_compile=jit or None, autograph=False)
    def one_step(batch):
        return strategy.reduce("SUM", strategy.run(step, args=batch), axis=None)

    # An explicit while loop, not AutoGraph: tracing then never depends on reading this file's source.
    @tf.function(autograph=False)
    def loop(iterator, steps):
        def body(i, totals):
            return i + 1, totals + one_step(next(iterator))

        i, totals = tf.while_loop(lambda i, totals: (i < steps) & (totals[2] == 0.0), body,
                                  (tf.constant(0), tf.zeros([3])))
        return i, totals[0], totals[1], totals[2]

    def run(iterator, steps):
        if int(steps) != 1:
            return loop(iterator, steps)
        # One step (--steps-per-loop 1, the default): no while loop around it, see the docstring.
        totals = one_step(next(iterator))
        return tf.constant(1), totals[0], totals[1], totals[2]

    return run


def make_evaluate(strategy, model, source, stop_flag, examples=EvalSet(), on_batch=None):
    """``evaluate(stoppable=False)``: loss, top-1 and top-5 accuracy on ``examples`` (:class:`EvalSet`:
    the evaluation set, or the test set held apart from a validation split).

    Every replica of every worker evaluates its share of the examples, ``examples.batch_size`` at a
    time, and the sums (loss, top-1, top-5, count) are
    all-reduced: each example is counted exactly once, the last partial batch and replicas left
    without examples included. Each pipeline's share is followed by weight-0 padding, so every
    replica always has a full batch (one shape: one trace), and the evaluation ends at the first
    step where no replica had a real example. The step's all-reduce also carries the stop votes:
    with ``stoppable``, a stop request abandons the evaluation (returns None) on every worker at the
    same batch. ``on_batch()`` is called after each step (the stall watchdog's progress).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    k = min(5, source.num_classes)
    split, batch_size = examples.split, examples.batch_size
    total = source.eval_examples if split == "eval" else source.test_examples
    limit = None if examples.limit is None else min(examples.limit, total)
    padding = tf.data.Dataset.from_tensors((tf.zeros(source.image_shape, tf.uint8), tf.constant(0), 0.0)).repeat()

    def dataset_fn(input_context):
        rows = getattr(source, split)(limit, input_context).map(lambda image, label: (image, label, 1.0))
        per_replica = input_context.get_per_replica_batch_size(batch_size * input_context.num_replicas_in_sync)
        return rows.concatenate(padding).batch(per_replica, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    data = strategy.distribute_datasets_from_function(dataset_fn)

    def replica_sums(images, labels, weights):
        logits = tf.cast(model(network_input(images, dtype=model.compute_dtype), training=False), tf.float32)
        top5 = tf.cast(tf.nn.in_top_k(labels, logits, k), tf.float32)
        top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        sums = [tf.reduce_sum(weights * t) for t in (loss_fn(labels, logits), top1, top5, weights)]
        return tf.stack([*sums, tf.cast(stop_flag.read_value(), tf.float32)])

    @tf.function(autograph=False)
    def eval_step(iterator):
        return strategy.reduce("SUM", strategy.run(replica_sums, args=next(iterator)), axis=None)

    def evaluate(stoppable=False):
        totals = np.zeros(4)
        iterator = iter(data)
        while True:
            *sums, stop_votes = eval_step(iterator).numpy()
            if on_batch is not None:
                on_batch()
            if stoppable and stop_votes > 0:
                return None
            if sums[3] == 0:  # only padding left, on every replica
                break
            totals += sums
        loss, top1, top5, count = totals
        return loss / max(count, 1), top1 / max(count, 1), top5 / max(count, 1)

    return evaluate


class TrainMeter:
    """Training loss and accuracy since the last evaluation, and the images/s."""
    def __init__(self):
        self._reset()

    def _reset(self):
        self.loss_sum, self.correct_sum, self.seen = 0.0, 0.0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def add(self, loss_sum: float, correct_sum: float, images: int) -> None:
        self.loss_sum, self.correct_sum, self.seen = self.loss_sum + loss_sum, self.correct_sum + correct_sum, \
            self.seen + images

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct_sum / max(self.seen, 1)

    def take(self) -> dict:
        seconds = time.perf_counter() - self.clock
        values = {"loss": self.loss, "accuracy": self.accuracy, "images_per_second": self.seen / seconds,
                  "seconds": seconds}
        self._reset()
        return values
