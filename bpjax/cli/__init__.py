"""The ``bpjax`` command: ``train``, ``evaluate``, ``predict`` and ``gradcheck``, one module each."""
from .main import main

__all__ = ["main"]
