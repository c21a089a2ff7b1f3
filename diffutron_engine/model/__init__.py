"""Model runners: our own forward passes over the weights of loaded checkpoints."""

from .modernbert import KVPool, ModernBertRunner

__all__ = ["KVPool", "ModernBertRunner"]
