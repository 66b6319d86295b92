"""The docstring examples run as written."""

import doctest

import kerasbn.batch_normalization


def test_docstring_examples_run():
    result = doctest.testmod(kerasbn.batch_normalization, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0
