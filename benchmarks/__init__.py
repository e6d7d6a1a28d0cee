"""Benchmarks of the pipeline against the study's way of doing the same work."""
