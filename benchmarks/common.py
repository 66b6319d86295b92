"""Shared timing helpers: alternate candidates in one process, report medians."""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def time_alternating(candidates: dict, repeats: int = 30, inner: int = 5, warmup: int = 3) -> dict:
    """Runs each candidate ``inner`` times per round, rounds interleaved.

    Interleaving spreads machine noise (other processes, frequency changes)
    evenly over the candidates, so their ratio is meaningful even when the
    absolute times are not. Returns the median seconds per call of each.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(times) for name, times in samples.items()}


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
