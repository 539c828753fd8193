"""Benchmarks: commands that measure katamaran and write JSON under benchmarks/results/.

Not part of the timed test run; each module has its own ``python -m`` entry.
"""
