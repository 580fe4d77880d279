"""Cross-check table cases for normalisation, dropout, embedding, reshaping and fan-out/join."""
from table_base import LayerCase  # noqa: F401

NORM_CASES = []
