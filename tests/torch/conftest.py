"""The PyTorch session: ``KERAS_BACKEND=torch pytest tests/torch tests/shared -n 0`` (``make test``
starts it beside the TensorFlow and JAX sessions). Another backend's session collects nothing here."""

import os

if os.environ.get("KERAS_BACKEND") != "torch":
    collect_ignore_glob = ["test_*.py"]
else:
    import pytest
    import torch

    @pytest.fixture(autouse=True)
    def _values_without_autograd(request):
        """The tests of tests/library collected here read outputs with numpy (``np.asarray``), which
        torch refuses for tensors that carry autograd's graph: they run without it. Gradients on
        PyTorch are tested in tests/shared and tests/torch/test_distributed.py, with autograd."""
        function = getattr(request.node, "function", None)
        if function is not None and function.__module__.startswith("tests.library"):
            with torch.no_grad():
                yield
        else:
            yield
