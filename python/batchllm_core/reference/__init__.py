"""Plain-Python references of native structures, for tests and benchmark ratios (never on a hot path)."""
from .prefix_tree import ReferencePlan, ReferencePrefixTree

__all__ = ["ReferencePlan", "ReferencePrefixTree"]
