"""Tests of the recipes (recipes/)."""
