"""The backend seam is a contract: this session's backend module implements it, and nothing outside
kerasbn/kernels asks which backend runs (a fourth backend is one new module there)."""

import ast
import re
from pathlib import Path

import keras

from kerasbn import kernels

PACKAGE = Path(kernels.__file__).resolve().parents[1]


def test_this_backends_kernels_implement_the_contract():
    module = kernels.current()
    assert isinstance(module, kernels.Kernels)
    assert module.__name__ == kernels.TRAINING_MODULES[keras.backend.backend()]
    missing = [name for name in vars(kernels.Kernels) if not name.startswith("_") and not hasattr(module, name)]
    assert not missing


def test_no_module_outside_the_kernels_tests_the_backend():
    named = re.compile(r"""["'](tensorflow|jax|torch)["']""")
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.name == "backend.py":  # the list of backends itself
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and named.search(ast.unparse(node)):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders
