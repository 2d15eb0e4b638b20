"""The ``sentiment`` command line: one click group above the worker, drift and training rooms."""
