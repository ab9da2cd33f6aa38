"""Suites: one YAML per suite."""
