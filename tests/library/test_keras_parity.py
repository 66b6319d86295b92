"""Keras' own BatchNormalization test file, run whole with kerasbn's layer in its place.

The test file comes from the installed Keras at test time (a temporary copy
with ``layers.BatchNormalization`` replaced); nothing of Keras' is copied into
this repository. kerasbn's layer with ``unbiased_variance=False`` claims to be
Keras' layer: every one of Keras' tests must pass on it.
"""

import re
import sys
from pathlib import Path

import keras
import pytest

from tests.helpers import forkserver

KERAS_TEST = (Path(keras.__file__).parent / "src" / "layers" / "normalization"
              / "batch_normalization_test.py")

PREAMBLE = '''\
import keras as _keras
import kerasbn as _kerasbn


@_keras.saving.register_keras_serializable(package="kerasbn_parity")
class KerasbnBatchNormalization(_kerasbn.BatchNormalization):
    """kerasbn's layer with Keras' biased moving variance."""

    def __init__(self, *args, unbiased_variance=False, **kwargs):
        super().__init__(*args, unbiased_variance=unbiased_variance, **kwargs)


'''


@pytest.mark.slow
@pytest.mark.skipif(not KERAS_TEST.exists(), reason="this Keras ships no BN test file")
def test_keras_batch_normalization_test_file_passes_whole(tmp_path):
    source = KERAS_TEST.read_text()
    patched, replaced = re.subn(r"\blayers\.BatchNormalization\b", "KerasbnBatchNormalization", source)
    assert replaced >= 10, "Keras' test file no longer names layers.BatchNormalization"
    test_file = tmp_path / "test_keras_bn_with_kerasbn.py"
    test_file.write_text(PREAMBLE + patched)
    result = forkserver.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
         "--rootdir", str(tmp_path), str(test_file)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**__import__("os").environ, "KERAS_BACKEND": "tensorflow",
             "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"Keras' BN tests on kerasbn: {summary}\n{result.stdout[-6000:]}"
    assert re.search(r"\b(\d+) passed\b", summary), summary
    assert "failed" not in summary and "error" not in summary, summary
