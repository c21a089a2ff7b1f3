"""The engine: scheduler (plain Python) + model runner (tensors) + the step loop."""

from .engine import Engine, RequestFailed, RequestOutput
from .request import Request

__all__ = ["Engine", "Request", "RequestFailed", "RequestOutput"]
