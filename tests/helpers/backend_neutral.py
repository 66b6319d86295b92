"""The library's tests that hold on every backend (the Keras-level tools: conversion, the scope,
folding, recalibration): written once in tests/library, run there by TensorFlow's session, and
collected again by the JAX and PyTorch sessions, whose test_tools.py star-import this module."""

from tests.library.test_after_training import (
    test_bn_affine_matches_the_paper,
    test_folding_keeps_the_inference_function,
    test_recalibration_is_algorithm_2,
)
from tests.library.test_convert import (
    test_conversion_is_complete_and_keeps_arguments_weights_and_outputs,
)
from tests.library.test_other_models import (
    test_a_scope_builds_kerasbn_layers_everywhere_and_only_inside_it,
    test_converted_models_load_back_converted_with_no_scope,
    test_models_built_in_the_scope_load_back_as_built,
    test_recalibration_covers_every_bn_with_algorithm_2,
)

__all__ = [
    "test_bn_affine_matches_the_paper",
    "test_folding_keeps_the_inference_function",
    "test_recalibration_is_algorithm_2",
    "test_conversion_is_complete_and_keeps_arguments_weights_and_outputs",
    "test_a_scope_builds_kerasbn_layers_everywhere_and_only_inside_it",
    "test_converted_models_load_back_converted_with_no_scope",
    "test_models_built_in_the_scope_load_back_as_built",
    "test_recalibration_covers_every_bn_with_algorithm_2",
]
