"""Helpers for the test suite and the benchmarks: multi-process launchers, tiny runs, export
fixtures. Nothing in the training, export or launch code imports this package."""
