"""A small trained model shipped with sparsekern, with an SAE and a transcoder trained on it.

``load(device="cpu") -> (model, saes)``: a 2-layer TransformerLens ``HookedTransformer`` with a
word-level tokenizer (so ``to_tokens`` / ``to_string`` / ``utils.test_prompt`` work) that solves IOI,
palindromes and induction, and ``saes = {"resid_sae": TopKSAE on blocks.1.hook_resid_pre,
"mlp0_transcoder": TopKTranscoder blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out}``. Offline,
safetensors + JSON only (no pickle). Trained by ``scripts/train_toy.py``; numbers in
``weights/REPORT.json`` (``report()``). Tasks and tokenizer: :mod:`sparsekern.toy.data`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SAE_NAMES = ("resid_sae", "mlp0_transcoder")


def report(weights_dir: Optional[Union[str, Path]] = None) -> dict:
    """The training report (``REPORT.json``): seed, command, measured accuracy / logit diff / EV / L0."""
    return json.loads((Path(weights_dir or WEIGHTS_DIR) / "REPORT.json").read_text())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RuntimeError(f"sparsekern.toy: cannot read {path}: {e}") from None


def load(device: str = "cpu", weights_dir: Optional[Union[str, Path]] = None) -> tuple[Any, dict]:
    """The toy ``HookedTransformer`` (eval mode) and its SAEs ``{name: sparsekern SAE / transcoder}``."""
    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ..saes import SAE
    from .data import build_tokenizer

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"sparsekern.toy.load(device={device!r}): CUDA is not available here")
    d = Path(weights_dir or WEIGHTS_DIR)
    model_file = d / "model.safetensors"
    if not model_file.is_file():
        raise FileNotFoundError(f"sparsekern.toy: missing {model_file} (run python scripts/train_toy.py)")
    cfg, vocab = (_read_json(d / name) for name in ("model_cfg.json", "vocab.json"))
    try:
        state = load_file(str(model_file), device="cpu")
    except Exception as e:  # corrupted / truncated file
        raise RuntimeError(f"sparsekern.toy: cannot read {model_file}: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg, init_weights=False, device="cpu"),
                                  tokenizer=build_tokenizer(vocab), move_to_device=False)
    model.load_state_dict(state, strict=True)
    if str(device) != "cpu":
        model.to(device, print_details=False)
    model.eval()
    saes = {}
    for name in SAE_NAMES:
        try:
            saes[name] = SAE.load_from_disk(d / name, device=device)
        except Exception as e:
            raise RuntimeError(f"sparsekern.toy: cannot load {d / name}: {e}") from None
    return model, saes
