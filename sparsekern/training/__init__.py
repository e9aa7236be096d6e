"""SAE / transcoder training on sparsekern's sparse kernels (imported only when used).

``TrainingConfig`` (SAELens field names), ``SAETrainer`` (one SAE), ``MultiSAETrainer`` /
``train_saes`` (several SAEs from one forward pass), ``ActivationStore`` (TransformerLens activations
through a bounded shuffling buffer, or pre-cached safetensors shards) and ``train_sae``.
"""

from .config import TrainingConfig
from .trainer import SAETrainer

__all__ = ["TrainingConfig", "SAETrainer"]
