"""QEMU processes the harness starts: one module per kind, one command line each.

``node`` (the lab nodes, and the testenv CLI ``python -m pytest_katamaran.qemu.node``),
``workload`` (the Kata-shaped workload VM's command line, also replayed for the
destination), ``sandbox`` (running one as Kata lays it out), ``binary`` (which QEMU the
workload runs), ``accel`` (KVM or TCG, decided by a real boot).
"""
