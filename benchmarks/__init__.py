"""Benchmarks: the fused GRAO loss against the eager reference and peer projects.

- ``python -m benchmarks.compare --device cpu|cuda`` prints the comparison table and writes
  CSV / JSON / Markdown results and PNG plots under ``benchmarks/results/<device>/``.
- ``pytest benchmarks/ --benchmark-only`` runs the pytest-benchmark suite on small shapes.
- ``python benchmarks/gpu_check.py`` is the one prepared GPU call (CUDA tests + headline shapes).

See ``benchmarks/README.md`` for what is measured and how.
"""
