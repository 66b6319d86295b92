"""kerasbn: batch normalization for Keras done right.

Local and synchronized batch normalization with the paper's population
statistics, and the tools around it.
"""

from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization
from kerasbn.convert import convert_sync_batchnorm
from kerasbn.folding import fold_batch_norm
from kerasbn.keras_fixes import patch_keras_multi_worker_fit
from kerasbn.moments import local_moments, merge_moments
from kerasbn.population import recalibrate_statistics
from kerasbn.serving import export_for_serving

__all__ = [
    "BatchNormalization",
    "SyncBatchNormalization",
    "convert_sync_batchnorm",
    "export_for_serving",
    "fold_batch_norm",
    "local_moments",
    "patch_keras_multi_worker_fit",
    "recalibrate_statistics",
    "merge_moments",
]
__version__ = "0.1.0"
