"""Benchmarks (`make bench`, `make soak`). Nothing here is imported by the worker."""
