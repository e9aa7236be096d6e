"""SAE / transcoder training on sparsekern's sparse kernels (imported only when used).

* ``TrainingConfig``: one run's settings, SAELens field names, validated on construction;
* ``SAETrainer``: ``step(x, y=None)``, ``fit(batches)``, ``to_inference()``, ``save_checkpoint(path)``,
  ``SAETrainer.resume(path)``;
* ``ActivationStore``: TransformerLens activations (or cached safetensors shards) through a bounded
  shuffling buffer; ``cache_activations`` writes such shards;
* ``MultiSAETrainer`` / ``train_saes``: several SAEs from one forward pass; ``train_sae``: one call;
* seams for extensions (``sparsekern.distributed`` uses only these): ``TrainingModule`` / ``StepOutput``
  (:mod:`.base`, the training modules' base), ``Reducer`` (what a step combines across processes),
  ``split_batch``, ``with_model_info``, ``build_module``; ``NonFiniteError`` (a refused step).

Example::

    from sparsekern.training import TrainingConfig, train_sae
    cfg = TrainingConfig(architecture="topk", d_in=768, d_sae=24576, k=32, training_tokens=50_000_000)
    sae = train_sae(model, tokens, "blocks.8.hook_resid_pre", cfg)   # tokens: [n_seq, ctx] or a file
    sae.save_model("out/")       # SAELens disk format; sae_lens.SAE.load_from_disk("out/") loads it

    trainer = SAETrainer(cfg)                  # or step by step, on your own activations
    for x in batches: metrics = trainer.step(x)   # x [N, d_in]; metrics["loss"], ["l0"], ...
    trainer.save_checkpoint("ck/"); trainer = SAETrainer.resume("ck/")
"""

from .activations import ActivationStore, cache_activations
from .api import train_sae, train_saes, with_model_info
from .base import StepOutput, TrainingModule
from .config import TrainingConfig
from .guards import NonFiniteError
from .multi import MultiSAETrainer
from .reducer import Reducer
from .trainer import SAETrainer, build_module, split_batch

__all__ = [
    "ActivationStore",
    "MultiSAETrainer",
    "NonFiniteError",
    "Reducer",
    "SAETrainer",
    "StepOutput",
    "TrainingConfig",
    "TrainingModule",
    "build_module",
    "cache_activations",
    "split_batch",
    "train_sae",
    "train_saes",
    "with_model_info",
]
