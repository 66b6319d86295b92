"""kerasbn: batch normalization for Keras done right.

Local and synchronized batch normalization with the paper's population
statistics, and the tools around it. Work-arounds for Keras itself live in
:mod:`kerasbn.compat`; the statistics helpers in :mod:`kerasbn.moments`.
"""

from kerasbn.backend import BackendError
from kerasbn.batch_normalization import BatchNormalization, SyncBatchNormalization
from kerasbn.construction import batch_norm_scope
from kerasbn.convert import convert_sync_batchnorm
from kerasbn.folding import fold_batch_norm
from kerasbn.population import recalibrate_statistics
from kerasbn.serving import export_for_serving

__all__ = [
    "BackendError",
    "BatchNormalization",
    "SyncBatchNormalization",
    "batch_norm_scope",
    "convert_sync_batchnorm",
    "export_for_serving",
    "fold_batch_norm",
    "recalibrate_statistics",
]
__version__ = "0.7.0"
