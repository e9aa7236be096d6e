"""Checkpoint formats other than SAELens's, read into SAELens-style ``(cfg_dict, state_dict)``.

``sparsekern.SAE.load_sparsify`` / ``load_circuit_tracer`` / ``load_gemma_scope_npz`` build the SAEs; the
readers here only read, check and rename (``cfg_dict`` holds the file's dtype and the ``device`` read to).

* EleutherAI sparsify: folder with ``cfg.json`` + ``sae.safetensors`` (``encoder.weight [F, d_in]``,
  ``encoder.bias [F]``, ``W_dec [F, d_in]``, ``b_dec [d_in]``, optional ``W_skip [d_in, d_in]``).
* circuit-tracer single-layer transcoder: one safetensors per layer (``W_enc [F, d_model]``,
  ``W_dec [F, d_model]``, ``b_enc``, ``b_dec``, optional ``W_skip``, ``activation_function.threshold``
  or ``k``).
* Gemma Scope: ``params.npz`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``,
  ``threshold``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..constants import dtype_to_str, sae_lens_version
from .deprecated import sae_alias
from .sae_lens_format import check_device, read_json, read_safetensors, safetensors_shapes

SPARSIFY_CFG_FILENAME = "cfg.json"
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"

PathLike = Union[str, Path]
CfgAndState = tuple[dict[str, Any], dict[str, Tensor]]


def _require(tensors: dict[str, Any], keys: tuple[str, ...], source: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{source} lacks tensors {missing} (found {sorted(tensors)})")


def _metadata(**meta: Any) -> dict[str, Any]:
    """A cfg.json ``metadata`` dict written by this SAELens version (so it is not taken for a pre-6 one)."""
    return {"sae_lens_version": sae_lens_version(), "sae_lens_training_version": sae_lens_version(), **meta}


def _finish(cfg: dict[str, Any], state: dict[str, Tensor], device: str) -> CfgAndState:
    # contiguous: the renamed tensors include transposed views (W_enc = encoder.weight.T), and a module's
    # parameters should not be views of another layout
    state = {k: v.contiguous() for k, v in state.items()}
    return {**cfg, "dtype": dtype_to_str(state["W_enc"].dtype), "device": device}, state


def _sparsify_hooks(folder: str, transcode: bool) -> tuple[Optional[str], Optional[str]]:
    """sparsify hookpoint folder name (HF module path) -> TransformerLens hook names, where known."""
    if folder == "embed_tokens":
        return "hook_embed", None
    m = re.fullmatch(r"(?:.*\.)?layers[._](\d+)(\.mlp)?", folder)
    if m is None:
        return None, None
    layer, mlp = m.group(1), m.group(2)
    if mlp and transcode:
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    return (f"blocks.{layer}.hook_mlp_out" if mlp else f"blocks.{layer}.hook_resid_post"), None


def read_sparsify(
    path: PathLike,
    *,
    hook_name: Optional[str] = None,
    hook_name_out: Optional[str] = None,
    device: str = "cpu",
) -> CfgAndState:
    """An EleutherAI sparsify folder -> cfg of a ``TopKSAE`` / ``TopKTranscoder`` / ``TopKSkipTranscoder``.

    Semantics as sparsify's ``SparseCoder``: ``pre = relu(encoder(x - b_dec))`` (no ``- b_dec`` when
    ``transcode``), top-``k``, ``out = top_acts @ W_dec + b_dec (+ x @ W_skip.T)``. An autoencoder with a
    skip connection becomes a ``TopKSkipTranscoder`` with ``b_dec`` folded into ``b_enc``. Hook names are
    inferred from the folder name (``layers.N`` -> ``blocks.N.hook_resid_post``, ``layers.N.mlp``
    transcoder -> ``blocks.N.ln2.hook_normalized`` / ``blocks.N.hook_mlp_out``) unless given.
    (SAELens's own sparsify converter keys ``apply_b_dec_to_input`` off
    ``normalize_decoder`` instead; this follows sparsify's code.)
    """
    path = Path(path)
    raw = read_json(path / SPARSIFY_CFG_FILENAME)
    if raw.get("activation", "topk") != "topk":
        raise NotImplementedError(
            f"{path}: sparsify activation {raw.get('activation')!r} (only 'topk' is supported)"
        )
    for flag in ("signed", "embed_skip", "gram_lookup"):
        if raw.get(flag):
            raise NotImplementedError(f"{path}: sparsify option {flag}=True is not supported")
    if "k" not in raw:
        raise ValueError(f"{path / SPARSIFY_CFG_FILENAME} has no 'k'")
    source = path / SPARSIFY_WEIGHTS_FILENAME
    shapes = safetensors_shapes(source)  # checked before any tensor is read
    _require(shapes, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), source)
    if len(shapes["encoder.weight"]) != 2 or len(shapes["W_dec"]) != 2:
        raise ValueError(f"{source}: encoder.weight / W_dec must be 2-D [num_latents, d_in]")
    d_sae, d_in = shapes["encoder.weight"]
    expected = raw.get("num_latents") or (raw.get("d_in", d_in) * raw.get("expansion_factor", 0)) or d_sae
    if raw.get("d_in", d_in) != d_in or expected != d_sae:
        raise ValueError(
            f"{source}: encoder.weight is {shapes['encoder.weight']} but cfg.json says d_in="
            f"{raw.get('d_in')}, num_latents={expected}"
        )
    sd = read_safetensors(source, device)
    transcode = bool(raw.get("transcode", False))
    state = {
        "W_enc": sd["encoder.weight"].T,
        "b_enc": sd["encoder.bias"],
        "W_dec": sd["W_dec"],
        "b_dec": sd["b_dec"],
    }
    guess_in, guess_out = _sparsify_hooks(path.name, transcode)
    parent_cfg = path.parent / "config.json"
    model_name = read_json(parent_cfg).get("model") if parent_cfg.is_file() else None
    meta = {"hook_name": hook_name or guess_in, "hf_hook_name": path.name, "model_name": model_name}
    cfg: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "k": int(raw["k"])}
    if not transcode and "W_skip" not in sd:
        cfg.update(architecture="topk", apply_b_dec_to_input=True)
    else:
        if not transcode:  # (x - b_dec) W + b == x W + (b - b_dec W): a transcoder with a folded bias
            W64 = state["W_enc"].double()
            state["b_enc"] = (state["b_enc"].double() - state["b_dec"].double() @ W64).to(
                state["b_enc"].dtype
            )
        if "W_skip" in sd:
            state["W_skip"] = sd["W_skip"]
        meta["hook_name_out"] = hook_name_out or (guess_out if transcode else meta["hook_name"])
        cfg.update(
            architecture="topk_skip_transcoder" if "W_skip" in sd else "topk_transcoder",
            apply_b_dec_to_input=False,
            d_out=sd["W_dec"].shape[1],
        )
    cfg["metadata"] = _metadata(**meta)
    return _finish(cfg, state, device)


def read_circuit_tracer(
    path: PathLike,
    *,
    hook_name: Optional[str] = None,
    hook_name_out: Optional[str] = None,
    device: str = "cpu",
) -> CfgAndState:
    """A circuit-tracer ``SingleLayerTranscoder`` safetensors file -> cfg of a sparsekern transcoder.

    ``activation_function.threshold`` -> ``JumpReLU(Skip)Transcoder`` with ``apply_relu=False``
    (circuit-tracer's JumpReLU is ``pre * (pre > threshold)``, no ReLU); a ``k`` tensor ->
    ``TopK(Skip)Transcoder`` with ``apply_relu=False``; neither -> ReLU ``(Skip)Transcoder``. The input is
    not shifted by ``b_dec``; ``W_skip`` acts on the raw input.
    """
    path = Path(path)
    shapes = safetensors_shapes(path)  # checked before any tensor is read
    _require(shapes, ("W_enc", "W_dec", "b_enc", "b_dec"), path)
    if len(shapes["W_enc"]) != 2 or len(shapes["W_dec"]) != 2:
        raise ValueError(f"{path}: W_enc / W_dec must be 2-D [d_transcoder, d_model]")
    check_device(device, path)
    sd = read_safetensors(path, device)
    d_sae, d_in = sd["W_enc"].shape
    state = {"W_enc": sd["W_enc"].T, "b_enc": sd["b_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    cfg: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "d_out": sd["W_dec"].shape[-1],
        "apply_b_dec_to_input": False,
    }
    skip = "W_skip" in sd
    if skip:
        state["W_skip"] = sd["W_skip"]
    if "activation_function.threshold" in sd:
        thr = sd["activation_function.threshold"]
        state["threshold"] = thr.reshape(()).expand(d_sae).clone() if thr.numel() == 1 else thr
        cfg.update(
            architecture="jumprelu_skip_transcoder" if skip else "jumprelu_transcoder", apply_relu=False
        )
    elif "k" in sd:
        cfg.update(
            architecture="topk_skip_transcoder" if skip else "topk_transcoder",
            k=int(sd["k"]),
            apply_relu=False,
        )
    else:
        cfg["architecture"] = "skip_transcoder" if skip else "transcoder"
    cfg["metadata"] = _metadata(hook_name=hook_name, hook_name_out=hook_name_out)
    return _finish(cfg, state, device)


def read_gemma_scope_npz(
    path: PathLike,
    *,
    transcoder: bool = False,
    hook_name: Optional[str] = None,
    hook_name_out: Optional[str] = None,
    device: str = "cpu",
) -> CfgAndState:
    """A Gemma Scope ``params.npz`` -> cfg of a ``JumpReLUSAE`` (``apply_b_dec_to_input=False``), or with
    ``transcoder=True`` a ``JumpReLUTranscoder`` (Gemma Scope transcoders). JumpReLU is
    ``relu(pre) * (pre > threshold)`` as in Gemma Scope and SAELens. Shapes are checked before any
    tensor is made. (SAELens's ``from_pretrained`` also rescales the *embedding* SAEs by ``sqrt(d_in)``;
    this reader does not.)
    """
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gemma Scope params file not found: {path}")
    check_device(device, path)
    try:
        with np.load(path, allow_pickle=False) as data:  # never unpickle
            arrays = {("W_" + k[2:] if k.startswith("w_") else k): np.asarray(data[k]) for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"could not read {path} as a .npz archive (truncated or corrupt?): {e}") from None
    names = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    _require(arrays, names, path)
    shapes = {k: tuple(arrays[k].shape) for k in names}
    if len(shapes["W_enc"]) != 2 or len(shapes["W_dec"]) != 2:
        raise ValueError(
            f"{path}: W_enc and W_dec must be 2-D (W_enc [d_in, d_sae], W_dec [d_sae, d_out]); got {shapes}"
        )
    d_in, d_sae = shapes["W_enc"]
    d_out = shapes["W_dec"][-1]
    want = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_out),
        "b_enc": (d_sae,),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
    }
    if shapes != want:
        raise ValueError(f"{path}: tensor shapes {shapes} do not fit together (expected {want})")
    for k in names:
        if arrays[k].dtype.kind != "f":
            raise ValueError(f"{path}: {k} has dtype {arrays[k].dtype}, expected floating point")
    state = {k: torch.from_numpy(arrays[k]).to(device) for k in names}
    meta = {"hook_name": hook_name}
    cfg: dict[str, Any] = {"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False}
    if transcoder:
        meta["hook_name_out"] = hook_name_out
        cfg.update(architecture="jumprelu_transcoder", d_out=d_out)
    elif d_out != d_in:
        raise ValueError(f"{path}: W_dec maps to {d_out} != d_in={d_in}; load it with transcoder=True")
    else:
        cfg["architecture"] = "jumprelu"
    cfg["metadata"] = _metadata(**meta)
    return _finish(cfg, state, device)


def __getattr__(name: str) -> Any:
    # the old load_* names (they built SAEs here): deprecated aliases of the SAE classmethods
    return sae_alias(__name__, name)
