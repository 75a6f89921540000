"""Benchmarks of the supervisor (not tests): ``.venv/bin/python -m tests.bench [--quick]``."""
