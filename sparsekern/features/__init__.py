"""Feature-level research helpers built on the sparse ops."""

from .top_examples import top_activating_examples

__all__ = ["top_activating_examples"]
