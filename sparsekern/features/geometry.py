"""Feature geometry at scale: cosine neighbours of decoder / encoder directions and per-feature logits.

Every function here is a top-k over a ``[rows, cols]`` similarity matrix that is never built. A feature
set against itself (``decoder_neighbours``) goes, on CPU, through :func:`sparsekern.ops.gram_topk`, which
uses the symmetry of ``W @ W.T`` (each tile serves two row blocks: half the GEMM work). Otherwise the rows
go through :func:`sparsekern.ops.topk_encode` (``x @ W_enc + b_enc`` fused with an exact per-row
top-k, ties -> lower index, memory bounded by one tile) in chunks of ``chunk_size`` rows. Extra memory
is O(weights) for the normalised keys plus O(chunk_size * (d + k)) per chunk (its normalised / negated
query rows and candidates); the outputs are ``[rows, k]``. The ``[rows, cols]`` matrix never exists.

Cosines: every row is divided by its L2 norm; a zero row stays zero, so its cosine with anything is 0
(as ``torch.nn.functional.cosine_similarity``). Zero rows are therefore not excluded: they are
neighbours with cosine 0 wherever 0 makes the top k. Non-finite weights raise ``ValueError``.
Values are computed in float32 for float32/bfloat16/float16 weights and in float64 for float64.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..ops import validate as V
from ..ops.gram_topk import DEFAULT_BLOCK as GRAM_BLOCK
from ..ops.gram_topk import gram_topk, gram_topk_backend
from ..ops.topk_encode import topk_encode

__all__ = [
    "FeatureLogits",
    "Neighbours",
    "cosine_neighbours",
    "decoder_neighbours",
    "encoder_decoder_neighbours",
    "feature_logits",
]

# rows per op call: the op bounds its own scratch, so this only sets the progress granularity and the
# size of the per-chunk query copies (normalised / negated rows, chunk_size x d)
DEFAULT_CHUNK = 16384


class Neighbours(NamedTuple):
    """Top-k neighbours of every row.

    values:  ``[n, k]`` cosines, sorted by the ranking key (cos, or |cos| with ``absolute=True``)
             descending; ties -> lower index. With ``absolute=True`` the values keep their sign.
    indices: ``[n, k]`` int64 indices of the neighbours.
    """

    values: Float[Tensor, "n k"]
    indices: Int[Tensor, "n k"]


@dataclass(frozen=True)
class FeatureLogits:
    """Top promoted / suppressed tokens of every feature (rows of ``W_dec @ W_U``).

    promoted_values / promoted_tokens: ``[d_sae, k]``, the k largest logits, descending.
    suppressed_values / suppressed_tokens: ``[d_sae, k]``, the k most negative logits, ascending
    (most negative first). Ties -> lower token id in both.
    """

    promoted_values: Float[Tensor, "d_sae k"]
    promoted_tokens: Int[Tensor, "d_sae k"]
    suppressed_values: Float[Tensor, "d_sae k"]
    suppressed_tokens: Int[Tensor, "d_sae k"]

    def token_strings(self, model: Any, feature: int) -> tuple[list[str], list[str]]:
        """``(promoted, suppressed)`` token strings of one feature via ``model.to_str_tokens``
        (needs a model with a tokenizer)."""
        d_sae = self.promoted_tokens.shape[0]
        feature = V.int_arg("feature", feature, 0, d_sae - 1)
        conv = model.to_str_tokens
        return (list(conv(self.promoted_tokens[feature].cpu())),
                list(conv(self.suppressed_tokens[feature].cpu())))


# ---- helpers ---------------------------------------------------------------------------------------
def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    # half-precision GEMMs would round every cosine to ~3 digits: upcast (the op accumulates in fp32 anyway)
    return torch.float64 if dt == torch.float64 else torch.float32


def _matrix(name: str, t: Any, desc: str) -> Tensor:
    V.tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {desc}, got shape {tuple(t.shape)}")
    V.floating(name, t)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty {desc}, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; cosines are undefined")
    return t


def _unit_rows(W: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows divided by their L2 norm; zero rows stay zero (cosine 0 with everything)."""
    W = W.detach().to(dtype)
    norms = torch.linalg.vector_norm(W, dim=1, keepdim=True)
    return W / torch.where(norms > 0, norms, 1)  # a zero row divided by 1 stays zero; one allocation


def _chunk_arg(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return int(chunk_size)


def _drop_self(values: Tensor, indices: Tensor, row0: int) -> tuple[Tensor, Tensor]:
    """``[c, k+1]`` -> ``[c, k]``: remove the entry whose index is the row's own feature, by index
    (duplicate rows tie with it), or the last one when the row itself did not make the k+1."""
    c, kk = indices.shape
    own = torch.arange(row0, row0 + c, device=indices.device).unsqueeze(1)
    is_self = indices == own
    drop = torch.where(is_self.any(1), is_self.to(torch.int8).argmax(1), kk - 1).unsqueeze(1)
    cols = torch.arange(kk - 1, device=indices.device).expand(c, kk - 1)
    cols = cols + (cols >= drop)  # skip the dropped column (a gather: no device sync)
    return values.gather(1, cols), indices.gather(1, cols)


def _merge_abs(
    pos: tuple[Tensor, Tensor], neg: tuple[Tensor, Tensor], k: int, row0: Optional[int]
) -> tuple[Tensor, Tensor]:
    """Exact top-k by |cos| from the top-(k') of cos and of -cos (k' = k, or k+1 with self excluded).

    Any row in the top k by |cos| is in the top k' of its own sign's list, so the union holds the
    answer. Duplicate indices (cos = 0 can sit in both lists) and the row itself are masked out, then
    candidates are ordered by (|cos| desc, index asc): a sort by index followed by a stable sort by
    |cos|.
    """
    values = torch.cat((pos[0], -neg[0]), dim=1)  # signed cosines
    indices = torch.cat((pos[1], neg[1]), dim=1)
    indices, order = indices.sort(dim=1, stable=True)
    values = values.gather(1, order)
    invalid = torch.zeros_like(indices, dtype=torch.bool)
    invalid[:, 1:] = indices[:, 1:] == indices[:, :-1]
    if row0 is not None:
        own = torch.arange(row0, row0 + indices.shape[0], device=indices.device).unsqueeze(1)
        invalid |= indices == own
    key = torch.where(invalid, -1.0, values.abs())  # |cos| >= 0 > -1: masked entries sort last
    key, order = key.sort(dim=1, descending=True, stable=True)
    order = order[:, :k]
    return values.gather(1, order), indices.gather(1, order)


@torch.no_grad()
def _neighbours(
    queries_fn: Callable[[int, int], Tensor], n: int, keys_T: Tensor, k: int, absolute: bool,
    exclude_self: bool, chunk_size: int, progress: bool, desc: str,
) -> Neighbours:
    """Top-k of ``queries @ keys_T`` per query row, in row chunks; ``queries_fn(r0, r1)`` gives rows."""
    m = keys_T.shape[1]
    kk = k + 1 if exclude_self else k
    bias = torch.zeros(m, dtype=keys_T.dtype, device=keys_T.device)
    out_v = torch.empty(n, k, dtype=keys_T.dtype, device=keys_T.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=keys_T.device)
    starts = range(0, n, chunk_size)
    for r0 in tqdm(starts, total=len(starts), disable=not progress, desc=desc):
        r1 = min(n, r0 + chunk_size)
        q = queries_fn(r0, r1)
        pos = tuple(topk_encode(q, keys_T, bias, kk, relu=False))
        if absolute:
            # -(x @ W) is computed as (-x) @ W: negation is exact, so both lists carry the same |cos|
            neg = tuple(topk_encode(-q, keys_T, bias, kk, relu=False))
            v, i = _merge_abs(pos, neg, k, r0 if exclude_self else None)
        elif exclude_self:
            v, i = _drop_self(pos[0], pos[1], r0)
        else:
            v, i = pos
        out_v[r0:r1] = v
        out_i[r0:r1] = i
    return Neighbours(out_v, out_i)


# ---- public API ------------------------------------------------------------------------------------
def cosine_neighbours(
    queries: Float[Tensor, "n d"],
    keys: Float[Tensor, "m d"],
    k: int,
    *,
    absolute: bool = False,
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> Neighbours:
    """For every row of ``queries``, the ``k`` rows of ``keys`` with the largest cosine similarity.

    Args:
        queries: ``[n, d]``; keys: ``[m, d]`` (same dtype family and device).
        k: neighbours per row, ``1 <= k <= m`` (``m - 1`` with ``exclude_self``).
        absolute: rank by ``|cos|`` instead of ``cos`` (values keep their sign).
        exclude_self: skip key ``i`` for query ``i`` (needs ``n == m``: both index the same features).
            The self entry is removed by index, so a duplicate row still counts as a neighbour.
        chunk_size: query rows per :func:`~sparsekern.ops.topk_encode` call; on the symmetric path
            (``queries is keys`` with ``exclude_self``, CPU) it caps the tile size instead.
        progress: tqdm bar over the chunks (or the symmetric path's rounds).

    Returns :class:`Neighbours` with ``values [n, k]``, ``indices [n, k]`` (int64). Never builds the
    ``[n, m]`` matrix: memory is O(weights + chunk_size * (d + k)) besides the outputs.
    """
    _matrix("queries", queries, "[n, d]")
    _matrix("keys", keys, "[m, d]")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries [n, d]={tuple(queries.shape)} and keys [m, d]={tuple(keys.shape)} must share d"
        )
    V.same_device("keys", keys, "queries", queries)
    n, m = queries.shape[0], keys.shape[0]
    if exclude_self and n != m:
        raise ValueError(f"exclude_self needs as many queries as keys (one per feature), got n={n}, m={m}")
    k = V.int_arg("k", k, 1, m - 1 if exclude_self else m)
    chunk_size = _chunk_arg(chunk_size)
    dtype = _compute_dtype(queries, keys)
    unit_keys = _unit_rows(keys, dtype)
    if queries is keys and exclude_self and gram_topk_backend(keys.device) == "cpp":
        # symmetric: each tile of W @ W.T serves two row blocks, half the GEMM work of the path below
        v, i = gram_topk(unit_keys, k, absolute=bool(absolute), block=min(chunk_size, GRAM_BLOCK),
                         progress=progress, desc="cosine neighbours")
        return Neighbours(v, i)
    keys_T = unit_keys.T.contiguous()  # [d, m]: the op reads W_enc column blocks; contiguous is faster
    if queries is keys:
        unit_q = unit_keys
        del unit_keys

        def rows(r0: int, r1: int) -> Tensor:
            return unit_q[r0:r1]
    else:
        del unit_keys

        def rows(r0: int, r1: int) -> Tensor:
            return _unit_rows(queries[r0:r1], dtype)

    return _neighbours(rows, n, keys_T, k, bool(absolute), bool(exclude_self), chunk_size, progress,
                       "cosine neighbours")


def decoder_neighbours(
    W_dec: Float[Tensor, "d_sae d_out"],
    k: int,
    absolute: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> Neighbours:
    """Top-k cosine neighbours of every decoder direction among the others (the feature itself excluded).

    Args:
        W_dec: ``[d_sae, d_out]`` decoder (rows are feature directions), e.g. ``sae.W_dec``.
        k: ``1 <= k <= d_sae - 1``.
        absolute: rank by ``|cos|`` (finds anti-parallel pairs too); values keep their sign.

    Returns :class:`Neighbours` ``values [d_sae, k]`` (cosines), ``indices [d_sae, k]``: exactly the
    top k of each row of ``cos(W_dec, W_dec)`` with the diagonal removed (ties -> lower index), without
    building the ``[d_sae, d_sae]`` matrix. Zero rows have cosine 0 with everything (see module doc).
    """
    _matrix("W_dec", W_dec, "[d_sae, d_out]")
    if W_dec.shape[0] < 2:
        raise ValueError(f"W_dec has d_sae={W_dec.shape[0]} feature(s); neighbours need at least 2")
    return cosine_neighbours(W_dec, W_dec, k, absolute=absolute, exclude_self=True, chunk_size=chunk_size,
                             progress=progress)


def encoder_decoder_neighbours(
    W_enc: Float[Tensor, "d_in d_sae"],
    W_dec: Float[Tensor, "d_sae d_in"],
    k: int,
    absolute: bool = False,
    *,
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> Neighbours:
    """For each feature's encoder direction, the top-k decoder directions by cosine.

    Row ``i`` ranks ``cos(W_enc[:, i], W_dec[j])`` over features ``j``. The feature's own decoder
    direction (``j == i``) is included unless ``exclude_self`` (it is usually the best match; its
    cosine alone is ``F.cosine_similarity(W_enc.T, W_dec)``). For the reverse direction (decoder ->
    encoders) call ``cosine_neighbours(W_dec, W_enc.T, k)``.

    Args:
        W_enc: ``[d_in, d_sae]`` (SAELens layout: columns are encoder directions).
        W_dec: ``[d_sae, d_in]``. A transcoder's decoder ``[d_sae, d_out]`` only works when d_out == d_in,
            and then compares directions of two different spaces.
        k: ``1 <= k <= d_sae`` (``d_sae - 1`` with ``exclude_self``).

    Returns :class:`Neighbours` ``values [d_sae, k]``, ``indices [d_sae, k]`` (decoder feature ids).
    """
    _matrix("W_enc", W_enc, "[d_in, d_sae]")
    _matrix("W_dec", W_dec, "[d_sae, d_in]")
    if W_enc.shape[1] != W_dec.shape[0] or W_enc.shape[0] != W_dec.shape[1]:
        raise ValueError(
            f"W_enc must be [d_in, d_sae] and W_dec [d_sae, d_in]; got W_enc {tuple(W_enc.shape)} and "
            f"W_dec {tuple(W_dec.shape)}"
        )
    return cosine_neighbours(W_enc.T, W_dec, k, absolute=absolute, exclude_self=exclude_self,
                             chunk_size=chunk_size, progress=progress)


@torch.no_grad()
def feature_logits(
    sae: Any,
    model: Any,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = True,
) -> FeatureLogits:
    """The ``k`` most promoted and most suppressed tokens of every feature, from ``W_dec @ W_U``.

    Args:
        sae: an SAE / transcoder with ``W_dec [d_sae, d_out]`` (sparsekern or SAELens). Its output space
            must be the residual stream (``d_out == d_model``): an SAE on ``hook_resid_*``,
            ``hook_mlp_out``, ``hook_attn_out``, or a transcoder writing to ``hook_mlp_out``. hook_z SAEs
            are rejected (their decoder lives in z space; multiply by ``W_O`` first).
        model: anything with ``W_U [d_model, d_vocab]`` (a TransformerLens ``HookedTransformer``).
        k: ``1 <= k <= d_vocab``.

    The raw direct-logit effect ``W_dec @ W_U``: no ``b_dec``, no final LayerNorm. TransformerLens's
    ``from_pretrained`` folds the LayerNorm weights into ``W_U`` by default (``fold_ln=True``), which is
    the usual practice; the LayerNorm's input-dependent scale is not modelled.

    Returns :class:`FeatureLogits` (``[d_sae, k]`` each; values in float32, float64 if the weights are).
    """
    W_dec = getattr(sae, "W_dec", None)
    W_U = getattr(model, "W_U", None)
    _matrix("sae.W_dec", W_dec, "[d_sae, d_out]")
    _matrix("model.W_U", W_U, "[d_model, d_vocab]")
    cfg = getattr(sae, "cfg", None)
    hook = getattr(getattr(cfg, "metadata", None), "hook_name", None) or ""
    if getattr(cfg, "reshape_activations", "none") == "hook_z" or str(hook).endswith("hook_z"):
        raise ValueError(
            "feature_logits needs decoder directions in the residual stream; this SAE reads hook_z "
            "(its W_dec is [d_sae, n_heads * d_head]): map it through W_O first"
        )
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(
            f"sae.W_dec is [d_sae, d_out]={tuple(W_dec.shape)} but model.W_U is [d_model, d_vocab]="
            f"{tuple(W_U.shape)}: the SAE's output space must be the residual stream (d_out == d_model)"
        )
    V.same_device("model.W_U", W_U, "sae.W_dec", W_dec)
    d_sae, d_vocab = W_dec.shape[0], W_U.shape[1]
    k = V.int_arg("k", k, 1, d_vocab)
    chunk_size = _chunk_arg(chunk_size)
    dtype = _compute_dtype(W_dec, W_U)
    W_Uc = W_U.detach().to(dtype).contiguous()
    bias = torch.zeros(d_vocab, dtype=dtype, device=W_U.device)
    shape = (d_sae, k)
    pv = torch.empty(shape, dtype=dtype, device=W_U.device)
    pt = torch.empty(shape, dtype=torch.int64, device=W_U.device)
    sv, st = torch.empty_like(pv), torch.empty_like(pt)
    starts = range(0, d_sae, chunk_size)
    for r0 in tqdm(starts, total=len(starts), disable=not progress, desc="feature logits"):
        r1 = min(d_sae, r0 + chunk_size)
        rows = W_dec[r0:r1].detach().to(dtype)
        pv[r0:r1], pt[r0:r1] = topk_encode(rows, W_Uc, bias, k, relu=False)
        # most negative = top-k of the negated logits; (-x) @ W is exactly -(x @ W)
        nv, st[r0:r1] = topk_encode(-rows, W_Uc, bias, k, relu=False)
        sv[r0:r1] = -nv
    return FeatureLogits(pv, pt, sv, st)
