"""Fused activation patching: the ``transformer_lens.patching`` API, batched (issue 4)."""
