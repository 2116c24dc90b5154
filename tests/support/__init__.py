"""Tiny models and datasets for the tests, importable as ``support.<module>:<name>``."""
