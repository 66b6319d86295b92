"""Shared by the tests: reference computations, model zoos, worker scripts, the fork server."""
