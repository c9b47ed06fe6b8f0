"""Beluga: CLI, settings and the contracts shared across packages."""
