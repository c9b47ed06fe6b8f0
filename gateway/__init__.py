"""The OpenAI-compatible gateway: routing, proxying, health."""
