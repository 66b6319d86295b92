"""The main job: the paper's two experiments on Fashion-MNIST, on a CPU, in about 7 minutes on 2 cores.

1. Figure 1 (``recipes.figure1``): a sigmoid MLP with and without BN: test
   accuracy and the drift of one sigmoid's input distribution.
2. The BN-Inception comparison (``recipes.inception_bn.compare``): the paper's
   five variants plus the no-BN network at BN-x5's and BN-x30's learning rates, on
   the network ``make reproduce`` trains (width x0.25, Fashion-MNIST's 28 px through
   the small stem), same data, same steps;
   a Figure-2-style plot and the paper's table (steps to reach the no-BN
   baseline's best accuracy).

    python -m recipes.demo [--run-dir runs/demo] [--steps 600] [--data-dir DIR]

Rerunning resumes: finished runs are not trained again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from recipes.inception_bn.variants import VARIANTS  # noqa: E402

DEMO_VARIANTS = ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid")


def main(argv=None) -> int:
    from recipes.requirements import require_recipe_extra

    require_recipe_extra()
    parser = argparse.ArgumentParser(prog="python -m recipes.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=600, help="training steps per BN-Inception variant")
    parser.add_argument("--figure1-steps", type=int, default=5000)
    parser.add_argument("--data-dir", help="the Fashion-MNIST idx files (default: Debian's location)")
    parser.add_argument("--variants", default=",".join(DEMO_VARIANTS),
                        help="comma-separated BN-Inception variants (default: the paper's five; "
                        "inception-x5,inception-x30 add the no-BN network at BN-x5's and BN-x30's rates)")
    args = parser.parse_args(argv)
    assert set(DEMO_VARIANTS) <= set(VARIANTS)
    unknown = [name for name in args.variants.split(",") if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose among {', '.join(VARIANTS)}")
    from recipes.fashion_mnist import DatasetNotFoundError, load_fashion_mnist

    try:
        load_fashion_mnist(args.data_dir)
    except DatasetNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from recipes.figure1 import train as figure1
    from recipes.inception_bn import compare

    run_dir = Path(args.run_dir)
    # Several variants at once, each on its share of the cores (at most 4 processes' memory):
    # on 2 cores two single-threaded runs train more images/s together than one on both.
    jobs = min(4, compare.usable_cores(), len(args.variants.split(",")))
    start = time.perf_counter()
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    print("== Figure 1: sigmoid MLP with and without BN", flush=True)
    figure1.main(["--run-dir", str(run_dir / "figure1"), "--steps", str(args.figure1_steps), *data])
    print(f"\n== BN-Inception variants (width x0.25, 28x28 Fashion-MNIST, small stem, batch 32, {args.steps} steps "
          "each)",
          flush=True)
    compare.main(["--run-dir", str(run_dir / "inception_bn"), "--dataset", "fashion_mnist",
                  "--variants", args.variants, "--title", "Scaled-down BN-Inception on Fashion-MNIST",
                  "--steps", str(args.steps), "--batch-size", "32", "--image-size", "28", "--stem", "small",
                  "--width-multiplier", "0.25", "--bn-momentum", "0.9", "--eval-every", "100", "--eval-examples", "1000",
                  "--steps-per-loop", "10", "--jobs", str(jobs), *data])
    print(f"\nDemo done in {(time.perf_counter() - start) / 60:.1f} min. Plots and tables:\n"
          f"  {run_dir / 'figure1' / 'figure1.png'}\n  {run_dir / 'inception_bn' / 'compare.png'}\n"
          f"  {run_dir / 'inception_bn' / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
