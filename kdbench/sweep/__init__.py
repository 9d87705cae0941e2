"""Sweeps: ablation file -> planned trials -> executor -> SQLite results store -> report.

``python -m kdbench.sweep`` is the entry point (see ``kdbench/sweep/__main__.py``).
"""
