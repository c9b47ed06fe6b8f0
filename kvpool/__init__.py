"""Python API over the native KV pool (issue 3)."""
