"""Helpers shared by tests (scripts run in subprocesses, virtual audio devices)."""
