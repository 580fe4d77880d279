"""Placeholder filled in by the layers work of issue 3."""
__all__ = []
