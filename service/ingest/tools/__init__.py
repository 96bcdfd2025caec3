"""Operator tools behind `scripts/` (thin entry points) and the local dev stack. Not loaded by the service."""
