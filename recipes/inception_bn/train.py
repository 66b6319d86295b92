"""Train BN-Inception (or its no-BN baseline) in one of the paper's variants.

    python -m recipes.inception_bn.train --variant bn-x5 --dataset imagenet2012 \\
        --data-dir ~/imagenet --run-dir runs/bn-x5

Uses every visible GPU (MirroredStrategy), or every machine in TF_CONFIG
(MultiWorkerMirroredStrategy; the run directory must then be on a
filesystem all workers share); BN is synchronized over the global batch
when there is more than one replica unless --no-sync-bn. The run directory
gets TensorBoard logs (logs/), history.csv (one row per evaluation: step,
loss, accuracy, learning rate, images/s), checkpoints (checkpoints/) and, at
the end, a SavedModel with BN folded (export/). Rerunning the same command
resumes from the last checkpoint; SIGTERM or Ctrl-C stops within a step or
two, saves the step reached (every worker the same step) and exits with 130
(see recipes/inception_bn/stopping.py). A lost or frozen worker, or no step
for --stall-timeout seconds, ends every worker with one line and status 138:
rerun every worker to resume (recipes/inception_bn/failures.py).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # First, before TensorFlow starts a thread: every thread inherits the blocked stop signals.
    from recipes.inception_bn.stopping import block_stop_signals

    block_stop_signals()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from recipes.inception_bn import ending  # noqa: E402
from recipes.inception_bn.command_line import parse_args  # noqa: E402
from recipes.inception_bn.ending import PeerLost  # noqa: E402
from recipes.inception_bn.run import Run  # noqa: E402

__all__ = ["main", "parse_args", "train"]


def train(args, stop) -> None:
    """The run, as its outline: set up (the cluster formed, the checkpoint restored), begin, train
    (with evaluations and checkpoints), finish.

    What ends it early is raised as an ``ending.RunEnded`` (refused, interrupted, a lost peer, a
    cluster that did not form) and turned into its exit status and line by :func:`main`; the stall
    watchdog and the signal thread's forced exit end the process through ``ending.end_process``.
    """
    run = Run(args, stop)
    try:
        run.begin()
        run.loop()
        run.finish()
    except tf.errors.OpError as error:
        if not run.lost_peer(error):
            raise
        raise PeerLost(run.lost_peer_message(error)) from None
    finally:
        run.watchdog.stop()


def main(argv=None) -> int:
    from recipes.inception_bn.stopping import StopRequest
    from recipes.requirements import require_recipe_extra

    require_recipe_extra()
    args = parse_args(argv)
    with StopRequest() as stop:
        return ending.main(lambda: train(args, stop))


if __name__ == "__main__":
    sys.exit(main())
