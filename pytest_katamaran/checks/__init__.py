"""The zero-drop evidence: ``ping`` (continuous ICMP, parsed) and ``disk`` (every
acknowledged guest write present on the destination disk).
"""
