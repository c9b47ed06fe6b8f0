"""vLLM side of Beluga: model preparation, the worker launcher (and, next, the KV connector)."""
