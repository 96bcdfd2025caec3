"""Benchmarks: each runs the competitor or the limit side by side in the same run and reports the ratio."""
