"""The zero-drop evidence: ``ping`` (continuous ICMP, parsed), ``disk`` (every
acknowledged guest write present on the destination disk) and ``drops`` (where a node
counted a dropped packet, read before and after each migration).
"""
