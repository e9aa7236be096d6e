"""SAE / transcoder training on sparsekern's sparse kernels (imported only when used).

* ``TrainingConfig``: one run's settings, SAELens field names, validated on construction;
* ``SAETrainer``: ``step(x, y=None)``, ``fit(batches)``, ``to_inference()``, ``save_checkpoint(path)``,
  ``SAETrainer.resume(path)``;
* ``ActivationStore``: TransformerLens activations (or cached safetensors shards) through a bounded
  shuffling buffer; ``cache_activations`` writes such shards;
* ``MultiSAETrainer`` / ``train_saes``: several SAEs from one forward pass; ``train_sae``: one call.
"""

from .activations import ActivationStore, cache_activations
from .api import train_sae, train_saes
from .config import TrainingConfig
from .multi import MultiSAETrainer
from .trainer import SAETrainer

__all__ = [
    "ActivationStore",
    "MultiSAETrainer",
    "SAETrainer",
    "TrainingConfig",
    "cache_activations",
    "train_sae",
    "train_saes",
]
