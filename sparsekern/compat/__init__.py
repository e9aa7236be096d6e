"""Drop-in replacements for third-party SAE / transcoder classes, computed with sparsekern ops.

* :mod:`sparsekern.compat.transcoder_circuits` -- Jacob Dunefsky's ``SparseAutoencoder``
  (GPT-2 small transcoders), loadable without his package or wandb.
"""

from . import transcoder_circuits

__all__ = ["transcoder_circuits"]
