"""The shared runtime: what every process needs and nothing process-specific.

The model-package format and its verification (``package``, ``signing``), the ONNX classifier and its
tokenisation (``inference``, ``batching``, ``absa_models``), the numerics that must agree across processes
(``numeric``: softmax, confidence bins; ``window_stats``: how a window of predictions is summarised), the
settings classes (``settings``), paths (``paths``), Kafka helpers (``kafka_io``), logging (``logs``) and the
exception base (``errors``).

Rule: ``runtime`` imports only ``schemas`` and third-party packages. ``worker``, ``drift`` and ``training``
stand above it side by side and never import each other (``tests/test_layout.py`` walks the import graph).
"""
