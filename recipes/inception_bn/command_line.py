"""The recipe's command line: every flag, its default and its check (one line and status 2 when wrong)."""

from __future__ import annotations

import argparse

from recipes.inception_bn import cluster, failures, plateau
from recipes.inception_bn.data import DEFAULT_IMAGE_SIZE, SOURCES
from recipes.inception_bn.model import STEMS
from recipes.inception_bn.variants import VARIANTS, variants_help


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m recipes.inception_bn.train",
        description="Train BN-Inception (or its no-BN baseline) in one of the paper's variants.",
        epilog="variants:\n" + variants_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, choices=list(VARIANTS), metavar="NAME",
                        help="training variant (listed below)")
    parser.add_argument("--dataset", default="imagenet2012", choices=SOURCES)
    parser.add_argument("--data-dir", help="imagenet2012: the directory holding ILSVRC2012_img_train.tar and "
                        "ILSVRC2012_img_val.tar; fashion_mnist: the idx files (default: Debian's "
                        "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--prepared-dir", help="where tfds writes the prepared imagenet2012 "
                        "(default: tfds' ~/tensorflow_datasets)")
    parser.add_argument("--run-dir", required=True, help="checkpoints, logs, history and export go here")
    parser.add_argument("--steps", type=int, help="training steps (default: 30 epochs)")
    parser.add_argument("--batch-size", type=int, default=32, help="per replica (default 32, the paper's)")
    parser.add_argument("--image-size", type=int,
                        help="input size (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGE_SIZE.items()) + ")")
    parser.add_argument("--stem", choices=STEMS,
                        help="the layers before the first inception module: the paper's (imagenet: 8x "
                        "downsampling) or one for 28-32 px images (small: 2x) (default: small for fashion_mnist, "
                        "imagenet otherwise); see docs/recipes.md")
    parser.add_argument("--width-multiplier", type=float, default=1.0, help="scales every layer's filters")
    parser.add_argument("--bn-momentum", type=float, default=0.99,
                        help="BN moving-average momentum (0.99; 0.9 suits runs of a few thousand steps)")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                        help="BN statistics over the global batch (default: when more than one replica)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="mixed_float16 on GPUs (with loss scaling), mixed_bfloat16 on CPUs")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between evaluations and checkpoints")
    parser.add_argument("--steps-per-loop", type=int, default=1,
                        help="training steps per tf.function call (GPUs then wait less on Python); evaluations, "
                        "checkpoints stay exact at loop boundaries; a stop request ends a loop after the current step")
    parser.add_argument("--eval-examples", type=int, help="evaluate on the first N examples (default: all)")
    parser.add_argument("--validation-examples", type=int, default=0, metavar="N",
                        help="fashion_mnist: hold the last N training examples out as the validation set the "
                        "evaluations read; the test set is then read once, at the end, with the weights of the "
                        "best validation accuracy (finished.json) (default 0: evaluate on the test set)")
    parser.add_argument("--plateau-window", type=int, metavar="STEPS",
                        help="stop when the validation accuracy has not improved (by more than "
                        "--plateau-min-delta) for STEPS steps; --steps is then the cap (recipes/inception_bn/plateau.py)")
    parser.add_argument("--plateau-min-delta", type=float, default=plateau.DEFAULT_MIN_DELTA,
                        help=f"the least gain that counts as an improvement (default {plateau.DEFAULT_MIN_DELTA})")
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up")
    parser.add_argument("--cpu-replicas", type=int, default=1,
                        help="split the CPU into N logical devices, one replica each (no GPUs needed)")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    parser.add_argument("--data-service", metavar="grpc://HOST:PORT",
                        help="run the training input's host part on a tf.data service (its dispatcher's "
                        "address; start one with python -m recipes.inception_bn.data_service)")
    parser.add_argument("--recalibrate-steps", type=int, default=0,
                        help="after training, set BN's population statistics exactly from N training batches "
                        "(the paper's Algorithm 2; kerasbn.recalibrate_statistics) before the last evaluation "
                        "and the export (default 0: keep the moving averages)")
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip the SavedModel export")
    parser.add_argument("--stall-timeout", type=float, default=failures.DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                        help="exit (status 138, retryable) when no training loop, evaluation batch or checkpoint "
                        f"completes for this long (default {failures.DEFAULT_STALL_TIMEOUT:g}: above the first step's "
                        "tracing and a checkpoint; raise it if one loop of --steps-per-loop steps can take "
                        "longer; 0: never)")
    parser.add_argument("--startup-timeout", type=float, default=cluster.DEFAULT_STARTUP_TIMEOUT, metavar="SECONDS",
                        help="with TF_CONFIG: exit (status 138, retryable) when the workers have not all answered "
                        f"each other within this long (default {cluster.DEFAULT_STARTUP_TIMEOUT:g}, torchrun's "
                        "--rdzv-timeout; 0: wait forever); see recipes/inception_bn/cluster.py")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights, and the training stream: each epoch's order and every augmentation "
                        "draw (a function of the position in the stream, so a resume continues it exactly)")
    parser.add_argument("--partitions", type=int, metavar="K",
                        help="imagenet2012: read the training files in K canonical partitions, fixed for the run "
                        "(K divides the global batch, the workers divide K; default: the largest divisor of the "
                        "global batch up to 16); see docs/recipes.md")
    parser.add_argument("--deterministic", action="store_true",
                        help="TensorFlow's op determinism: a run stopped and resumed ends with bit-identical weights "
                        "to the uninterrupted run (same machine); not with --data-service")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.stem is None:
        args.stem = "small" if args.dataset == "fashion_mnist" else "imagenet"
    if args.recalibrate_steps < 0:
        parser.error("--recalibrate-steps must be at least 0")
    for name in ("batch_size", "eval_every", "cpu_replicas", "steps_per_loop"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if not args.stall_timeout >= 0:
        parser.error("--stall-timeout must be at least 0 (0: never)")
    if not args.startup_timeout >= 0:
        parser.error("--startup-timeout must be at least 0 (0: never)")
    if not 0 <= args.bn_momentum < 1:
        parser.error("--bn-momentum must be in [0, 1)")
    if args.width_multiplier <= 0:
        parser.error("--width-multiplier must be positive")
    if args.data_service is not None:
        from recipes.inception_bn.data_service import SERVICE_SOURCES, check_address

        try:
            check_address(args.data_service)
        except ValueError as error:
            parser.error(str(error))
        if args.dataset not in SERVICE_SOURCES:
            parser.error(f"--data-service serves {' and '.join(SERVICE_SOURCES)}; {args.dataset} is held in "
                         "every trainer's memory, there is nothing to offload")
        if args.partitions is not None:
            parser.error("--partitions cannot be combined with --data-service: the service deals the training "
                         "files to whichever of its workers asks next")
        if args.deterministic:
            parser.error("--deterministic cannot be combined with --data-service: the service hands out its "
                         "input to whichever trainer asks first, so the order of the batches is not reproducible")
    if args.deterministic and args.jit:
        parser.error("--deterministic cannot be combined with --jit: TensorFlow has no deterministic XLA "
                     "implementation of MaxPool's gradient, which every variant's network runs; drop one of them")
    if args.validation_examples < 0:
        parser.error("--validation-examples must be at least 0")
    if args.validation_examples and args.dataset != "fashion_mnist":
        parser.error("--validation-examples holds out part of fashion_mnist's training set; "
                     f"{args.dataset} evaluates on its own evaluation split")
    if args.plateau_window is not None and args.plateau_window < 1:
        parser.error("--plateau-window must be at least 1 step")
    if not args.plateau_min_delta >= 0:
        parser.error("--plateau-min-delta must be at least 0")
    if args.partitions is not None and args.dataset != "imagenet2012":
        parser.error(f"--partitions is for imagenet2012's training files; {args.dataset} is read by position")
    return args
