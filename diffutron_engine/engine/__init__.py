"""The engine: scheduler (plain Python) + model runner (tensors) + the step loop."""

from .engine import Engine, RequestOutput, StepFailed, StepTrace
from .request import Request

__all__ = ["Engine", "Request", "RequestOutput", "StepFailed", "StepTrace"]
