"""Tour 06: train a TopK SAE on a TransformerLens model's activations with sparsekern's trainer,
evaluate it, save it in SAELens's disk format, and load it back with both SAELens and sparsekern.

The training step never builds a dense [tokens, d_sae] code (sparse encode + decode, forward and
backward). A tiny random-weight model and random tokens (no downloads); with real weights swap in
`HookedTransformer.from_pretrained(...)` and a real token dataset.

Run: python python/tours/06_train_sae.py [--quick]    (--quick: a smaller run, seconds on CPU)
"""

import argparse
import tempfile
import warnings

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
from sparsekern.features import reconstruction_metrics
from sparsekern.training import TrainingConfig, train_sae

p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true", help="fewer tokens and a narrower SAE")
args = p.parse_args()

torch.manual_seed(0)
mcfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_mlp=256, d_vocab=500,
                               act_fn="gelu", seed=0)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    model = HookedTransformer(mcfg).eval()
hook = "blocks.1.hook_resid_pre"
n_seq = 512 if args.quick else 4096
tokens = torch.randint(0, mcfg.d_vocab, (n_seq, mcfg.n_ctx))  # 16k (quick) / 131k training tokens
eval_tokens = torch.randint(0, mcfg.d_vocab, (32, mcfg.n_ctx), generator=torch.Generator().manual_seed(1))

# 1) train: one call. SAELens's field names (`TrainingConfig` follows `LanguageModelSAERunnerConfig`);
#    the trainer streams activations through a bounded shuffling buffer (`ActivationStore`).
#    The same with the parts: `ActivationStore(model, tokens, hook, ...)`, `SAETrainer(cfg).fit(...)`.
cfg = TrainingConfig(architecture="topk", d_in=mcfg.d_model, d_sae=512 if args.quick else 2048, k=16,
                     lr=4e-3, train_batch_size_tokens=512, training_tokens=tokens.numel(), seed=0,
                     checkpoint_path=None)
sae = train_sae(model, tokens, hook, cfg, progress=True)
print(f"trained {type(sae).__name__}: d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, k {cfg.k}, "
      f"{tokens.numel()} tokens")

# 2) evaluate on held-out tokens: reconstruction of the activations, and the model with them spliced in
with torch.no_grad():
    _, cache = model.run_with_cache(eval_tokens, names_filter=[hook])
    x = cache[hook].reshape(-1, mcfg.d_model)
    x_hat = sae(x)
    res = (x_hat - x).pow(2).sum(-1)
    ev = 1 - res.mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
    l0 = (sae.encode(x) != 0).sum(-1).float().mean()
print(f"held-out: MSE/token {float(res.mean()):.4f}, explained variance {float(ev):.3f}, L0 {float(l0):.1f}")
m = reconstruction_metrics(model, sae, eval_tokens.split(8), hook_name=hook, progress=False).to_dict()
keys = ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_score", "kl_div_score")
print("model with the SAE spliced in:", {k: round(m[k], 4) for k in keys})

# 3) save in SAELens's format (cfg.json + sae_weights.safetensors) and load with both libraries
with tempfile.TemporaryDirectory() as folder:
    sae.save_model(folder)
    from sae_lens import SAE as SAELensSAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = SAELensSAE.load_from_disk(folder, device="cpu")
    ours = sk.SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        out_theirs, out_ours = theirs(x), ours(x)
        same_code = torch.equal(theirs.encode(x) != 0, ours.encode(x) != 0)
    diff = float((out_theirs - out_ours).abs().max())
    print(f"loaded with sae_lens ({type(theirs).__name__}) and sparsekern ({type(ours).__name__}): "
          f"max |difference| of the reconstructions {diff:.2e}, same active features: {same_code}")
    assert diff < 1e-4 and same_code
