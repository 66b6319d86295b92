"""kerasbn: batch normalization for Keras done right.

Local and synchronized batch normalization with the paper's population
statistics, and the tools around it.
"""

from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization
from kerasbn.convert import convert_sync_batchnorm
from kerasbn.keras_fixes import patch_keras_multi_worker_fit
from kerasbn.moments import local_moments, merge_moments

__all__ = [
    "BatchNormalization",
    "SyncBatchNormalization",
    "convert_sync_batchnorm",
    "local_moments",
    "patch_keras_multi_worker_fit",
    "merge_moments",
]
__version__ = "0.1.0"
