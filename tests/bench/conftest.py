"""The real-guest fixtures of tests/integration/test_guest.py, for the benchmarks here."""

from tests.integration.test_guest import guest, netns, spawn  # noqa: F401
