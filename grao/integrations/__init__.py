"""Adapters that run GRAO inside other training frameworks (optional dependencies, imported on demand)."""
