"""katamaran: zero-packet-drop live migration of Kata Containers VMs."""

__version__ = "0.1.0"
