"""Labs on this one machine: ``local`` (two netns nodes, two real QEMUs, katamaran as
processes), used by the integration tests, the demo and the benchmark.
"""
