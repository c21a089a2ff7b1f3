"""Integrations with other libraries (dllm)."""
