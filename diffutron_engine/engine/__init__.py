"""The fast engine: scheduler (plain Python) + model runner (tensors) + the step loop."""

from .engine import Engine, Result, StreamEvent
from .request import Request

__all__ = ["Engine", "Request", "Result", "StreamEvent"]
