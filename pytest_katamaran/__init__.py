"""pytest_katamaran: fixtures that boot QEMU nodes and prove zero-drop live migration."""
