"""Root conftest: the plugin itself is registered through the pytest11 entry point."""

# tests/plugin use pytester; it must be registered at the root to be usable there.
pytest_plugins = ["pytester"]
