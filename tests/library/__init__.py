"""Tests of kerasbn, the library."""
