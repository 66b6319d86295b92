"""The docstring examples run as written: every module whose docstrings show ``>>>`` examples."""

import doctest
import importlib

import pytest

MODULES = ["kerasbn.batch_normalization", "kerasbn.construction", "kerasbn.convert", "kerasbn.folding",
           "kerasbn.population", "kerasbn.serving", "recipes.inception_bn.model", "recipes.inception_bn.variants"]


def test_every_module_with_examples_is_listed():
    from tests.helpers.distributed import ROOT

    shown = {".".join(p.relative_to(ROOT).with_suffix("").parts)
             for folder in ("kerasbn", "recipes") for p in (ROOT / folder).rglob("*.py")
             if ">>> " in p.read_text()}
    assert shown == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1
    assert result.failed == 0
