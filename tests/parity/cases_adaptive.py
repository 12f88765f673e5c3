"""Parity rows: see cases.py."""

CASES = []
ERRORS = []
