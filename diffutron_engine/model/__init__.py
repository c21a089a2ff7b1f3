"""Our own forward passes over the weights of loaded checkpoints."""

from .modernbert import KVPool, ModernBert

__all__ = ["KVPool", "ModernBert"]
