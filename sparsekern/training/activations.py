"""``ActivationStore``: model activations (or cached shards) through a bounded shuffling buffer.

Sources of tokens (``[n_seq, ctx]`` int):

* a tensor; an iterable of ``[b, ctx]`` tensors (read once: one epoch); or a file, ``.npy`` (memory-
  mapped) or ``.safetensors`` (tensor ``tokens_key``, default ``"tokens"``, or the only tensor; read by
  slices), so the dataset is never loaded whole.

The model (TransformerLens ``HookedTransformer``) runs on ``store_batch_size_prompts`` sequences at a
time, caching only ``hook_names`` and stopping after the last block it needs. Each position becomes a
row ``[sum of hook dims]`` (``hook_z``-style ``[..., n_heads, d_head]`` hooks are flattened). With
``exclude_special_tokens`` (SAELens's option, default False as in SAELens: BOS positions are kept) the
positions whose token is BOS/EOS/PAD (``True``) or in the given id list are dropped.

Buffer: at most ``buffer_size_tokens`` rows (default ``16 * train_batch_size_tokens``;
``max_rows_held`` records the most it ever held). Rows enter once; when full, the buffer is shuffled
and batches of ``train_batch_size_tokens`` rows are taken from it until it is half empty; at the end of
the data the rest is shuffled and yielded (the last batch may be short unless ``drop_last``). So one
pass (``iter(store)``) yields every kept position exactly once. Batches are a tensor ``[B, d]`` for one
hook, a tuple of ``[B, d_h]`` (same rows) for several: ``(x, y)`` for a transcoder reading
``[hook_in, hook_out]``.

Cached activations: :meth:`ActivationStore.from_cached` reads safetensors shards, each holding one
``[rows, d_h]`` tensor per hook name (what :func:`cache_activations` writes), slice by slice.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..hook_names import stop_layer

TokenSource = Union[Tensor, str, Path, Iterable[Tensor]]


def check_hooks(model: Any, hook_names: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming any hook ``model`` does not have (before anything runs)."""
    hooks = getattr(model, "hook_dict", None)
    if hooks is None:
        raise TypeError(
            f"model must be a TransformerLens HookedTransformer (with .hook_dict), got {type(model)}"
        )
    for h in hook_names:
        if h not in hooks:
            close = difflib.get_close_matches(h, list(hooks), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"hook {h!r} is not a hook of this model{hint}")


def check_context(model: Any, ctx: int, where: str = "tokens") -> None:
    """Raise a ``ValueError`` if sequences of ``ctx`` positions exceed ``model.cfg.n_ctx`` (the model
    could not embed them: positional embeddings stop at ``n_ctx``). Models without ``cfg.n_ctx`` pass."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and ctx > n_ctx:
        raise ValueError(
            f"{where}: sequences of {ctx} positions are longer than the model's n_ctx={n_ctx}; cut them to "
            f"at most {n_ctx} positions (e.g. tokens[:, :{n_ctx}]) or split them into shorter sequences"
        )


def _unreadable(path: Path, what: str, e: BaseException) -> ValueError:
    """The error for a file that exists but cannot be read: names the file and what went wrong."""
    return ValueError(
        f"{path}: cannot read {what} ({type(e).__name__}: {e}); is the file truncated or corrupted?"
    )


def _token_chunks(
    tokens: TokenSource, batch: int, key: str
) -> tuple[Callable[[], Iterator[Tensor]], Optional[int]]:
    """``(function returning a fresh iterator of [b, ctx] token chunks (one epoch), ctx or None)``; ``ctx``
    is known up front for tensors and files, not for iterables."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(
                f"tokens must be an int tensor [n_seq, ctx], got {tokens.dtype} {tuple(tokens.shape)}"
            )
        return (lambda: (tokens[i : i + batch] for i in range(0, tokens.shape[0], batch))), tokens.shape[1]
    if isinstance(tokens, (str, Path)):
        path = Path(tokens)
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} not found")
        if path.suffix == ".npy":
            import numpy as np

            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as e:
                raise _unreadable(path, "the tokens", e) from e
            if arr.ndim != 2:
                raise ValueError(f"{path}: tokens must be [n_seq, ctx], got shape {arr.shape}")
            return (lambda: (
                torch.from_numpy(np.array(arr[i : i + batch])).long() for i in range(0, arr.shape[0], batch)
            )), int(arr.shape[1])
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
                    name = key if key in keys else (keys[0] if len(keys) == 1 else None)
                    if name is None:
                        raise ValueError(f"{path}: no tensor {key!r} and more than one tensor ({keys})")
                    shape = f.get_slice(name).get_shape()
            except (SafetensorError, OSError) as e:
                raise _unreadable(path, "the tokens", e) from e
            if len(shape) != 2:
                raise ValueError(f"{path}: tokens must be [n_seq, ctx], got shape {shape}")

            def gen() -> Iterator[Tensor]:
                try:
                    with safe_open(str(path), framework="pt") as f:
                        sl = f.get_slice(name)
                        for i in range(0, shape[0], batch):
                            yield sl[i : i + batch].long()
                except (SafetensorError, OSError) as e:
                    raise _unreadable(path, "the tokens", e) from e

            return gen, int(shape[1])
        raise ValueError(f"token file {path}: expected .npy or .safetensors")
    once = iter(tokens)
    return (lambda: (t if t.dim() == 2 else t.unsqueeze(0) for t in once)), None


class ActivationStore:
    """Batches of activations for training (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokens: TokenSource,
        hook_names: Union[str, Sequence[str]],
        *,
        train_batch_size_tokens: int = 4096,
        store_batch_size_prompts: int = 16,
        buffer_size_tokens: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 42,
        exclude_special_tokens: Union[bool, Sequence[int]] = False,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        drop_last: bool = False,
        tokens_key: str = "tokens",
        _rows_source: Optional[Callable[[], Iterator[Tensor]]] = None,
        _dims: Optional[list[int]] = None,
    ):
        self.hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not self.hook_names:
            raise ValueError("hook_names is empty")
        if model is not None:
            check_hooks(model, self.hook_names)
        for name, v in (
            ("train_batch_size_tokens", train_batch_size_tokens),
            ("store_batch_size_prompts", store_batch_size_prompts),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.batch_size = train_batch_size_tokens
        self.buffer_size = (
            buffer_size_tokens if buffer_size_tokens is not None else 16 * train_batch_size_tokens
        )
        if self.buffer_size < train_batch_size_tokens:
            raise ValueError(
                f"buffer_size_tokens ({self.buffer_size}) must be >= train_batch_size_tokens "
                f"({train_batch_size_tokens})"
            )
        self.model, self.shuffle, self.seed, self.drop_last = model, shuffle, seed, drop_last
        self.device, self.dtype = torch.device(device), dtype
        self.epoch = 0
        self.max_rows_held = 0
        self.dims = _dims
        if _rows_source is not None:
            self._rows = _rows_source
        else:
            self._tokens, ctx = _token_chunks(tokens, store_batch_size_prompts, tokens_key)
            if ctx is not None:
                check_context(model, ctx)  # before any work, not as a shape error deep in the model
            self._special = self._special_ids(exclude_special_tokens)
            self._rows = self._model_rows

    def _special_ids(self, exclude: Union[bool, Sequence[int]]) -> Optional[Tensor]:
        if exclude is False:
            return None
        if exclude is True:
            tok = getattr(self.model, "tokenizer", None)
            ids = (
                {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
                if tok
                else set()
            )
            ids.discard(None)
            return torch.tensor(sorted(ids), dtype=torch.long)
        return torch.tensor(list(exclude), dtype=torch.long)

    # ---- sources of rows -------------------------------------------------------------------------
    @torch.no_grad()
    def _model_rows(self) -> Iterator[Tensor]:
        stop = stop_layer(self.hook_names)
        for toks in self._tokens():
            check_context(self.model, int(toks.shape[-1]), "a batch of tokens")
            dev = getattr(getattr(self.model, "cfg", None), "device", None) or "cpu"
            toks = toks.to(dev)
            kw = {"stop_at_layer": stop} if stop is not None else {}
            _, cache = self.model.run_with_cache(toks, names_filter=self.hook_names, **kw)
            parts = [cache[h].reshape(toks.shape[0] * toks.shape[1], -1) for h in self.hook_names]
            if self.dims is None:
                self.dims = [p.shape[1] for p in parts]
            rows = torch.cat(parts, dim=1)
            if self._special is not None and self._special.numel():
                keep = ~torch.isin(toks.reshape(-1), self._special.to(toks.device))
                rows = rows[keep]
            yield rows

    def _split(self, rows: Tensor) -> Union[Tensor, tuple[Tensor, ...]]:
        if len(self.hook_names) == 1:
            return rows
        return tuple(torch.split(rows, self.dims, dim=1))

    # ---- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Union[Tensor, tuple[Tensor, ...]]]:
        """One epoch: every kept position once, in buffer-shuffled batches."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        C, B = self.buffer_size, self.batch_size
        buf: Optional[Tensor] = None

        def shuffled(t: Tensor) -> Tensor:
            return t[torch.randperm(t.shape[0], generator=g).to(t.device)] if self.shuffle else t

        for acts in self._rows():
            acts = acts.to(self.device, self.dtype or acts.dtype)
            while acts.shape[0]:
                rows = 0 if buf is None else buf.shape[0]
                if rows >= C:
                    buf = shuffled(buf)
                    while buf.shape[0] > C // 2 and buf.shape[0] >= B:
                        yield self._split(buf[:B])
                        buf = buf[B:]
                    continue
                piece, acts = acts[: C - rows], acts[C - rows :]
                buf = piece if buf is None else torch.cat([buf, piece])
                self.max_rows_held = max(self.max_rows_held, buf.shape[0])
        if buf is not None and buf.shape[0]:
            buf = shuffled(buf)
            for i in range(0, buf.shape[0], B):
                if self.drop_last and buf.shape[0] - i < B:
                    break
                yield self._split(buf[i : i + B])

    def batches(self, n_batches: Optional[int] = None) -> Iterator[Union[Tensor, tuple[Tensor, ...]]]:
        """``n_batches`` batches (``None``: forever), starting new epochs as needed (re-iterable sources)."""
        done = 0
        while n_batches is None or done < n_batches:
            got = False
            for b in self:
                got = True
                yield b
                done += 1
                if n_batches is not None and done >= n_batches:
                    return
            if not got:
                return

    # ---- cached activations ----------------------------------------------------------------------
    @classmethod
    def from_cached(
        cls,
        shards: Union[str, Path, Sequence[Union[str, Path]]],
        hook_names: Union[str, Sequence[str]],
        *,
        read_rows: int = 8192,
        **kwargs: Any,
    ) -> "ActivationStore":
        """A store over safetensors shards (a folder of ``*.safetensors`` in name order, or a list).

        Each shard holds one ``[rows, d_h]`` tensor per hook in ``hook_names`` (same rows); they are
        read ``read_rows`` rows at a time.
        """
        from safetensors import SafetensorError, safe_open

        if isinstance(shards, (str, Path)) and Path(shards).is_dir():
            files = sorted(Path(shards).glob("*.safetensors"))
        elif isinstance(shards, (str, Path)):
            files = [Path(shards)]
        else:
            files = [Path(s) for s in shards]
        if not files:
            raise FileNotFoundError(f"no .safetensors shards in {shards}")
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        dims = None
        for fpath in files:
            if not fpath.is_file():
                raise FileNotFoundError(f"activation shard {fpath} not found")
            try:
                with safe_open(str(fpath), framework="pt") as f:
                    keys = list(f.keys())
                    shapes = [f.get_slice(h).get_shape() for h in names if h in keys]
            except (SafetensorError, OSError) as e:
                raise _unreadable(fpath, "the cached activations", e) from e
            missing = [h for h in names if h not in keys]
            if missing:
                raise ValueError(f"{fpath}: no activations for hooks {missing} (has {keys})")
            if len({s[0] for s in shapes}) != 1 or any(len(s) != 2 for s in shapes):
                raise ValueError(f"{fpath}: hook tensors must be [rows, d] with equal rows, got {shapes}")
            d = [s[1] for s in shapes]
            if dims is not None and d != dims:
                raise ValueError(f"{fpath}: hook widths {d} differ from the first shard's {dims}")
            dims = d

        def rows() -> Iterator[Tensor]:
            for fpath in files:
                try:
                    with safe_open(str(fpath), framework="pt") as f:
                        sls = [f.get_slice(h) for h in names]
                        n = sls[0].get_shape()[0]
                        for i in range(0, n, read_rows):
                            yield torch.cat([s[i : i + read_rows] for s in sls], dim=1)
                except (SafetensorError, OSError) as e:  # e.g. a shard cut short after the check above
                    raise _unreadable(fpath, "the cached activations", e) from e

        return cls(None, None, names, _rows_source=rows, _dims=dims, **kwargs)


def cache_activations(
    model: Any,
    tokens: TokenSource,
    hook_names: Union[str, Sequence[str]],
    out_dir: Union[str, Path],
    *,
    shard_size_tokens: int = 65536,
    store_batch_size_prompts: int = 16,
    exclude_special_tokens: Union[bool, Sequence[int]] = False,
) -> list[Path]:
    """Run ``model`` over ``tokens`` and write ``[rows, d_h]`` activations per hook to safetensors
    shards ``out_dir/shard_00000.safetensors``... in token order (read them with ``from_cached``)."""
    from safetensors.torch import save_file

    store = ActivationStore(
        model,
        tokens,
        hook_names,
        train_batch_size_tokens=shard_size_tokens,
        store_batch_size_prompts=store_batch_size_prompts,
        exclude_special_tokens=exclude_special_tokens,
        shuffle=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, b in enumerate(store):
        parts = (b,) if isinstance(b, Tensor) else b
        p = out / f"shard_{i:05d}.safetensors"
        save_file({h: t.contiguous() for h, t in zip(store.hook_names, parts)}, str(p))
        paths.append(p)
    return paths
