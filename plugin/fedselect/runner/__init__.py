"""Runners: build a federation from a config, run it (simulation or cross-silo), record it."""
