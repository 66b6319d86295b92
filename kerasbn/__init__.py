"""kerasbn: batch normalization for Keras done right.

Local and synchronized batch normalization with the paper's population
statistics, and the tools around it, on Keras' TensorFlow, JAX and PyTorch backends
(inference on its numpy and OpenVINO backends too).
The statistics every backend shares live in :mod:`kerasbn.statistics`, each
backend's kernels in :mod:`kerasbn.kernels`; work-arounds for Keras itself
(TensorFlow) in :mod:`kerasbn.compat`.
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
