"""The node agent: ``node`` runs ON a lab node as root (``python3 -m
pytest_katamaran.agent.node STEP``, one JSON object out), ``client`` is its host side
over SSH.
"""
