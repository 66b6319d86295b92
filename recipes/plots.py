"""The recipes' figures: drawn off-screen (no display on a training machine), saved whole, closed."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def saved_figure(path, *grid, dpi: int = 120, **figure_args):
    """``with saved_figure(path, figsize=(7, 4)) as axes:`` draw; the figure is laid out,
    written to ``path`` when the block ends (nothing is written if it raises) and always closed.
    ``grid`` and ``figure_args`` go to ``plt.subplots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **figure_args)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
