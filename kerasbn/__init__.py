"""kerasbn: batch normalization for Keras done right.

Local and synchronized batch normalization with the paper's population
statistics, and the tools around it.
"""

from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization
from kerasbn.moments import local_moments, merge_moments

__all__ = [
    "BatchNormalization",
    "SyncBatchNormalization",
    "local_moments",
    "merge_moments",
]
__version__ = "0.1.0"
