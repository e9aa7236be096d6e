"""Train the toy model shipped as ``sparsekern.toy``, then a TopK SAE and a TopK transcoder on it.

A 2-layer ``HookedTransformer`` with a word-level tokenizer built in code, trained (seeded, CPU) on a
synthetic mix: IOI name templates, palindromes (digits ``|`` reversed digits) and induction
sequences. Then, with ``sparsekern.training``: a TopK SAE on ``blocks.1.hook_resid_pre`` and a TopK
transcoder ``blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out``. Writes safetensors + JSON
(SAELens folders for the SAEs) and ``REPORT.json`` with the measured numbers.

Run: python scripts/train_toy.py [--out sparsekern/toy/weights] [--quick]
     (--quick: a tiny model, a few steps, into a temp dir; checks the pipeline in well under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsekern.toy import data as D  # noqa: E402
from sparsekern.toy import evaluate as E  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def model_config(quick: bool, d_vocab: int) -> dict:
    if quick:
        return dict(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=24, d_vocab=d_vocab,
                    act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                    model_name="sparsekern-toy-quick", seed=0)
    return dict(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=24, d_vocab=d_vocab,
                act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                model_name="sparsekern-toy", seed=0)


def sample_texts(rng: random.Random, n: int, ioi_pool, flags: list | None = None) -> list[str]:
    """``n`` texts of the mix (1/2 IOI with the answer, 1/4 palindromes, 1/4 induction); ``flags``
    (if given) gets True for the IOI texts."""
    out = []
    for _ in range(n):
        r = rng.random()
        if flags is not None:
            flags.append(r < 0.5)
        if r < 0.5:
            p = rng.choice(ioi_pool)
            out.append(f"{p.text} {p.io}")
        elif r < 0.75:
            out.append(D.palindrome(rng))
        else:
            out.append(D.induction(rng))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default=None, help="output folder (default: sparsekern/toy/weights; --quick: a temp dir)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny model and few steps (pipeline check)")
    ap.add_argument("--steps", type=int, default=None, help="model training steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.time()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sparsekern.training import TrainingConfig, train_sae

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    vocab = D.vocabulary()
    tok = D.build_tokenizer(vocab)
    mcfg_d = model_config(args.quick, len(vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**mcfg_d), tokenizer=tok)
    ctx = mcfg_d["n_ctx"]
    steps = args.steps or (40 if args.quick else 1200)
    batch = 32 if args.quick else 128
    torch.set_num_threads(1)  # fastest for this size on a shared 2-core box; also reproducible
    rng = random.Random(args.seed)
    ioi_train = D.ioi_prompts("train", n=4000, seed=args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * max(0.1, 1 - s / steps))
    model.train()
    t0 = time.time()
    for step in range(steps):
        flags: list = []
        toks = E.encode(tok, sample_texts(rng, batch, ioi_train, flags), ctx)
        logits = model(toks[:, :-1])
        tgt = toks[:, 1:]
        w = (tgt != tok.pad_token_id).float()
        last = w.sum(1).long() - 1  # the IOI answer is the last target: weight it up
        w[torch.arange(batch), last] += 4.0 * torch.tensor(flags, dtype=torch.float)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            msg = ""
            if step % 500 == 0 and step:
                model.eval()
                msg = f"  ioi test {E.ioi_metrics(model, tok, D.ioi_prompts('test', seed=5))}"
                model.train()
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s){msg}", flush=True)
    model.eval()
    model_metrics = E.task_metrics(model, tok)
    print("model:", json.dumps(model_metrics))

    # SAE + transcoder on the trained model, with sparsekern.training
    sae_rng = random.Random(args.seed + 7)
    ioi_all = ioi_train + D.ioi_prompts("test", seed=args.seed + 2)
    n_seq = 400 if args.quick else 6000
    sae_tokens = E.encode(tok, sample_texts(sae_rng, n_seq, ioi_all), ctx)
    d_model = mcfg_d["d_model"]
    d_sae = 128 if args.quick else 1024
    n_tok = int(sae_tokens.numel())
    common = dict(lr=4e-3, train_batch_size_tokens=1024, training_tokens=n_tok * 3,
                  seed=args.seed, checkpoint_path=None, lr_scheduler_name="cosineannealing",
                  lr_warm_up_steps=0 if args.quick else 20, lr_decay_steps=0)
    store_kw = dict(exclude_special_tokens=True)
    sae_hook = "blocks.1.hook_resid_pre"
    sae_cfg = TrainingConfig(architecture="topk", d_in=d_model, d_sae=d_sae, k=16, **common)
    sae = train_sae(model, sae_tokens, sae_hook, sae_cfg, progress=False, **store_kw)
    tc_in, tc_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc_cfg = TrainingConfig(architecture="topk", d_in=d_model, d_sae=d_sae, k=16, transcoder=True,
                            hook_name_out=tc_out, **common)
    tc = train_sae(model, sae_tokens, tc_in, tc_cfg, progress=False, **store_kw)
    eval_tokens = E.encode(tok, sample_texts(random.Random(args.seed + 99), 256, ioi_all), ctx)
    sae_metrics = {
        "resid_sae": {"hook_name": sae_hook, "d_sae": d_sae, "k": 16,
                      **E.sae_metrics(model, sae, eval_tokens, sae_hook, None, tok)},
        "mlp0_transcoder": {"hook_name": tc_in, "hook_name_out": tc_out, "d_sae": d_sae, "k": 16,
                            **E.sae_metrics(model, tc, eval_tokens, tc_in, tc_out, tok)},
    }
    print("saes:", json.dumps(sae_metrics))

    # write
    tmp = None
    if args.out:
        out = Path(args.out)
    elif args.quick:
        tmp = tempfile.mkdtemp(prefix="sparsekern-toy-")
        out = Path(tmp)
    else:
        out = ROOT / "sparsekern" / "toy" / "weights"
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "model_cfg.json").write_text(json.dumps(mcfg_d, indent=1))
    (out / "vocab.json").write_text(json.dumps(vocab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TopK transcoder: a sparsekern addition SAELens cannot load
        sae.save_model(out / "resid_sae")
        tc.save_model(out / "mlp0_transcoder")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report = {
        "command": "python scripts/train_toy.py" + (" --quick" if args.quick else "")
        + (f" --steps {args.steps}" if args.steps else "") + (f" --seed {args.seed}" if args.seed else ""),
        "seed": args.seed, "model_steps": steps, "batch_size": batch,
        "torch": torch.__version__, "train_seconds": round(time.time() - t_start, 1),
        "model": model_metrics, "saes": sae_metrics, "weights_bytes": size,
    }
    (out / "REPORT.json").write_text(json.dumps(report, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t_start:.0f}s")
    from sparsekern.toy import load

    t1 = time.time()
    m2, saes2 = load(weights_dir=out)
    dt = time.time() - t1
    print(f"reloaded in {dt:.2f}s: {sorted(saes2)}")
    with torch.no_grad():
        same = torch.allclose(m2(eval_tokens[:4]), model(eval_tokens[:4]), atol=1e-4)
    assert same, "reloaded model differs"
    if args.quick:
        assert size < 10e6
    if tmp:
        shutil.rmtree(tmp)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
