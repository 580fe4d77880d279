"""Cross-check table cases for convolution and pooling (part of tests/table.py's one table)."""
from table_base import LayerCase  # noqa: F401

CONV_CASES = []
