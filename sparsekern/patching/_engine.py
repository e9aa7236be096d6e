"""Execution engine for activation-patching sweeps: exact TransformerLens results, far fewer FLOPs.

TransformerLens runs one full forward pass per patch. Here a sweep is a list of :class:`Patch` records;
the engine
  * runs the corrupted input once, caching every layer's ``hook_resid_pre`` and (causal models) the
    keys/values, plus the corrupted logits;
  * groups patches by the first position they can change (``start``: the patched position for
    position-local patches under causal attention, else 0) and runs each group as one *staged* forward:
    a patch at layer ``l`` joins the batch at block ``l`` as a copy of the cached corrupted ``resid_pre``
    there (blocks ``< l`` are unchanged by it, so they are never recomputed), so each block runs once
    on all the patches that have reached it;
  * recomputes only positions ``>= start``: earlier positions are unchanged at every layer, so their
    keys/values come from the corrupted run (a frozen TransformerLens KV-cache entry; TransformerLens
    applies the rotary offsets) and their logits are copied from the corrupted logits to rebuild the
    ``[batch, pos, d_vocab]`` tensor the metric receives;
  * on CPU, runs a patch that only changes position ``start`` *after* its block's keys/values (``hook_z``,
    ``hook_q``, ``attn_out``, ``resid_mid``, MLP hooks, ...) through its own block at that one position
    (later positions of that block are unchanged: their keys/values come from the unpatched ``resid_pre``)
    and lets it join the batch one block later with that row replaced;
  * unembeds only the positions the metric reads: it gets a :class:`LazyLogits` (full logits for any
    operation; ``x[b, p, ...]`` indexing touches position ``p`` only), the positions read on the
    corrupted run are unembedded for a whole chunk in one GEMM, others on demand;
  * applies all patches of a hook point with one vectorised index write per hook (slice ``j`` of the
    batch is patch ``j``), keeps metric values on the device, and caps a chunk by a memory budget.
Unknown setters run one patch per forward (from the cached layer input when that is exact).
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Sequence

import torch

from ._common import Shard, as_scalar
from ._fast import fast_elementwise
from ._lazy_logits import LazyLogits, ReadLog
from ._patches import AFTER_KV_SUFFIXES, HookGroup, Patch, gather_slices, is_pattern_hook, vector_hook


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil missing
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return 2 << 30


def default_budget(device: torch.device) -> int:
    """Bytes one chunk may use: a quarter of the free memory (CPU capped at 2 GiB: larger chunks stop
    paying off once the GEMMs are big, and the logits slab then falls out of cache)."""
    avail = _available_bytes(device)
    cap = (16 << 30) if device.type == "cuda" else (2 << 30)
    return max(64 << 20, min(avail // 4, cap))


def engine_unsupported_reason(model, tokens: torch.Tensor) -> str | None:
    """Why the layer-restart engine cannot reproduce ``model.run_with_hooks(tokens)`` exactly (None if it can)."""
    try:
        from transformer_lens import HookedTransformer
    except Exception:  # pragma: no cover
        return "transformer_lens is not importable"
    if not isinstance(model, HookedTransformer):
        return f"model is a {type(model).__name__}, not a HookedTransformer"
    cfg = model.cfg
    if getattr(cfg, "n_devices", 1) != 1:
        return "the model is split across devices"
    tok = getattr(model, "tokenizer", None)
    if tok is not None and getattr(tok, "padding_side", "right") == "left":
        return "left padding: TransformerLens builds an attention mask from the tokens"
    if cfg.positional_embedding_type not in ("standard", "rotary", "alibi", "shortformer"):
        return f"positional_embedding_type={cfg.positional_embedding_type!r}"
    if tokens.dim() != 2:
        return "corrupted_tokens is not 2-D"
    return None


class Engine:
    """Cached corrupted run + batched execution of patches for one (model, corrupted_tokens).

    :meth:`run` is the whole sweep; its extension points are two methods a subclass may override (feature
    ablation does) and one argument:

    * :meth:`noop_patches` ``(patches, clean) -> [patch, ...]``: called once per :meth:`run`, before
      planning; the patches it returns are not run, their value is the metric on the corrupted run.
    * :meth:`patch_hooks` ``(items, n_rep, start, clean, length) -> fwd_hooks``: called once per forward
      of a chunk (once for the chunk's staged forward, and once per layer whose single-position patches
      first run their own block at position ``start``, then with ``length == 1``); the hooks it returns
      must write patch ``p``'s value into batch slice ``j`` for every ``(j, p)`` of ``items``.
    * ``run(..., shard=Shard(rank, world))``: plan every patch, run only this rank's chunks (see
      :class:`Shard`), leave the others' values 0.
    """

    def __init__(self, model, tokens: torch.Tensor, cache_hooks: Sequence[str] = ()):
        """Run the corrupted ``tokens`` ``[batch, pos]`` once, caching what a restart needs; the activations
        at the hook points ``cache_hooks`` are cached too (in :attr:`acts`, for :meth:`noop_patches`)."""
        from transformer_lens.utilities.activation_functions import apply_softcap

        self._softcap = apply_softcap
        self.model = model
        self.cfg = cfg = model.cfg
        self.tokens = tokens
        self.B, self.T = tokens.shape
        self.causal = cfg.attention_dir == "causal"
        # one-position block runs save FLOPs but add a block call per layer and chunk: a net loss where
        # kernel launches dominate (measured on an H100: attn_head_out_by_pos 0.78 s -> 1.13 s), so CPU only
        self.late_join = self.causal and tokens.device.type == "cpu"
        L = cfg.n_layers
        names = {f"blocks.{i}.hook_resid_pre" for i in range(L)} | {f"blocks.{L - 1}.hook_resid_post"}
        names |= set(cache_hooks)
        if self.causal:
            names |= {f"blocks.{i}.attn.hook_k" for i in range(L)} | {
                f"blocks.{i}.attn.hook_v" for i in range(L)
            }
        self.shortformer = cfg.positional_embedding_type == "shortformer"
        if self.shortformer:
            names.add("hook_pos_embed")
        with torch.no_grad():
            logits, cache = model.run_with_cache(
                tokens, names_filter=lambda n: n in names, return_type="logits"
            )
        self.logits = logits  # [B, T, V]
        self.device = logits.device
        # resid_pre[L]: the last block's output, where a patch of the last block's post-KV hooks joins
        self.resid_pre = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(L)]
        self.resid_pre.append(cache[f"blocks.{L - 1}.hook_resid_post"])
        self.k = [cache[f"blocks.{i}.attn.hook_k"] for i in range(L)] if self.causal else None
        self.v = [cache[f"blocks.{i}.attn.hook_v"] for i in range(L)] if self.causal else None
        self.pos_embed = cache["hook_pos_embed"] if self.shortformer else None
        self.acts = {n: cache[n] for n in cache_hooks if n in cache.cache_dict}
        # TransformerLens's Unembed makes W_U.T contiguous on every call (d_model x d_vocab: 154 MB for GPT-2);
        # do it once. Same F.linear, same weight layout -> bitwise the same logits.
        from transformer_lens.components.unembed import Unembed

        self._W_U_T = None
        if type(model.unembed) is Unembed and type(model.unembed).forward is Unembed.forward:
            with torch.no_grad():
                self._W_U_T = model.unembed.W_U.T.contiguous()

    def _unembed(self, x: torch.Tensor) -> torch.Tensor:
        ue = self.model.unembed
        if self._W_U_T is None:
            return ue(x)
        return ue.hook_out(torch.nn.functional.linear(ue.hook_in(x), self._W_U_T, ue.b_U))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d_model]`` final (normalised) residual -> ``[..., d_vocab]`` logits."""
        return self._softcap(self._unembed(x), self.cfg.output_logits_soft_cap)

    def lazy_logits_ok(self) -> bool:
        """Unembedding positions separately is invisible only to an unhooked, standard Unembed."""
        ue = self.model.unembed
        hooked = ue.hook_in._forward_hooks or ue.hook_out._forward_hooks
        return self._W_U_T is not None and not hooked and os.environ.get("SPARSEKERN_PATCH_LAZY", "1") != "0"

    # ---------------------------------------------------------------- forward from a layer
    def forward_from(self, layer: int, start: int, n_rep: int, fwd_hooks) -> torch.Tensor:
        """Logits ``[n_rep, B, T, V]`` of ``n_rep`` copies of the corrupted batch run from ``layer`` with
        ``fwd_hooks``; positions ``< start`` reuse the corrupted keys/values/logits (causal models only)."""
        new = self.forward_staged(start, [layer] * n_rep, fwd_hooks)
        return torch.stack([self.full_logits(new, j, start) for j in range(n_rep)])

    def full_logits(self, new: torch.Tensor, j: int, start: int) -> torch.Tensor:
        """``[B, T, V]`` logits of slice ``j``: corrupted logits before ``start``, recomputed ones after.

        Built one slice at a time so a chunk never holds ``n`` full logit tensors (for a late start
        position the recomputed part is a small fraction of them)."""
        if start == 0:
            return new[j]
        return torch.cat([self.logits[:, :start], new[j]], dim=1)

    def _kv_entry(self, layer: int, s: int, n: int):
        """Frozen KV-cache entry holding the corrupted keys/values of positions ``< s`` for ``n`` slices."""
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        if s == 0:
            return None
        return TransformerLensKeyValueCacheEntry(
            past_keys=self.k[layer][:, :s].repeat(n, 1, 1, 1),
            past_values=self.v[layer][:, :s].repeat(n, 1, 1, 1),
            frozen=True,
        )

    def forward_staged(
        self,
        start: int,
        layers: Sequence[int],
        fwd_hooks,
        unembed: bool = True,
        first_rows: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits ``[n, B, T - start, V]`` of positions ``start..T-1`` for ``n = len(layers)`` slices
        (``layers`` sorted ascending); :meth:`full_logits` adds the unchanged positions. With
        ``unembed=False``: the final normalised residual ``[n, B, T - start, d_model]`` instead.

        Slice ``j`` joins the batch at block ``layers[j]`` (``n_layers``: at the final norm) as a copy of the
        corrupted ``resid_pre`` there, with its first row (position ``start``) replaced by
        ``first_rows[j]`` ``[B, d_model]`` if given (blocks before a patch's layer are unchanged by it, so
        they are never recomputed); a hook at block ``i`` therefore sees ``#{j: layers[j] <= i}`` slices of
        ``B`` rows, the ones joined last at the end. Positions ``< start`` are not recomputed: their
        keys/values come from the corrupted run through a frozen KV-cache entry (causal attention: later
        positions cannot change them) and their logits are the corrupted logits.
        """
        model, cfg, B, T, s = self.model, self.cfg, self.B, self.T, start
        first_rows = first_rows or {}
        n_total = len(layers)
        x, sf, n_cur = None, None, 0
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks), fast_elementwise(model):
            for i in range(layers[0], cfg.n_layers + 1):
                n_new = 0
                while n_cur + n_new < n_total and layers[n_cur + n_new] == i:
                    n_new += 1
                if n_new:
                    x_new = self.resid_pre[i][:, s:].repeat(n_new, 1, 1)  # fresh: hooks may write into it
                    for k in range(n_new):
                        row = first_rows.get(n_cur + k)
                        if row is not None:
                            x_new[k * B : (k + 1) * B, 0] = row
                    x = x_new if x is None else torch.cat([x, x_new])
                    n_cur += n_new
                    if self.shortformer:
                        sf = self.pos_embed[:, s:].repeat(n_cur, 1, 1)
                if i == cfg.n_layers:
                    break
                x = model.blocks[i](
                    x, shortformer_pos_embed=sf, past_kv_cache_entry=self._kv_entry(i, s, n_cur), attention_mask=None
                )
            if cfg.normalization_type is not None:
                x = model.ln_final(x)
            new = self._logits(x) if unembed else x
        return new.view(n_total, B, T - s, new.shape[-1])

    def block_at_start(self, layer: int, start: int, n: int, fwd_hooks) -> torch.Tensor:
        """Output ``[n, B, d_model]`` of block ``layer`` at position ``start`` alone, for ``n`` copies of the
        corrupted batch with ``fwd_hooks`` (keys/values of earlier positions from the corrupted run)."""
        model, B, s = self.model, self.B, start
        with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks), fast_elementwise(model):
            x = self.resid_pre[layer][:, s : s + 1].repeat(n, 1, 1)
            sf = self.pos_embed[:, s : s + 1].repeat(n, 1, 1) if self.shortformer else None
            out = model.blocks[layer](
                x, shortformer_pos_embed=sf, past_kv_cache_entry=self._kv_entry(layer, s, n), attention_mask=None
            )
        return out[:, 0].view(n, B, -1)

    def join_layer(self, p: Patch) -> int:
        """Block at which patch ``p``'s slice enters the batched forward: ``p.layer``, or ``p.layer + 1``
        when only position ``p.start`` of block ``p.layer``'s output can change (see :meth:`block_at_start`)."""
        if self.late_join and p.single_position and p.hook.endswith(AFTER_KV_SUFFIXES):
            return p.layer + 1
        return p.layer

    # ---------------------------------------------------------------- batched known-setter patches
    def _bytes_per_patch(self, n_pos: int, n_logit_pos: int) -> int:
        cfg = self.cfg
        el = torch.finfo(self.logits.dtype).bits // 8
        d, H, dh, dm = cfg.d_model, cfg.n_heads, cfg.d_head, (cfg.d_mlp or 0)
        per_tok = 8 * d + 4 * H * dh + 3 * H * self.T + (3 if cfg.gated_mlp else 2) * dm
        V = self.logits.shape[-1]
        return el * self.B * (n_pos * per_tok + n_logit_pos * V)

    def plan(
        self,
        patches: Sequence[Patch],
        max_batch: int | None,
        budget: int,
        rows_cap: int,
        read: set[int] | None = None,
    ):
        """Chunks ``(start, [patch, ...])``: patches sharing a start position, sorted by :meth:`join_layer`.

        A chunk runs as one staged forward (see :meth:`forward_staged`), so no position or layer is computed
        for a patch that cannot change it; the chunk size is capped by ``max_batch`` patches, else by the
        memory ``budget`` and ``rows_cap`` token rows (bigger GEMMs stop paying off on CPU). ``read``: the
        logit positions unembedded per patch (None: all recomputed ones).
        """
        by_start: dict[int, list[Patch]] = {}
        for p in patches:
            by_start.setdefault(p.start, []).append(p)
        chunks = []
        for s in sorted(by_start):
            group = sorted(by_start[s], key=self.join_layer)
            if max_batch is not None:
                cap = max_batch
            else:
                n_logit = self.T - s if read is None else sum(p >= s for p in read)
                cap = min(
                    budget // max(1, self._bytes_per_patch(self.T - s, n_logit)),
                    rows_cap // (self.B * (self.T - s)),
                )
            cap = max(1, cap)
            n_chunks = math.ceil(len(group) / cap)
            size = math.ceil(len(group) / n_chunks)  # even chunks
            for k in range(0, len(group), size):
                chunks.append((s, group[k : k + size]))
        return chunks

    def patch_hooks(
        self, items: Sequence[tuple[int, Patch]], n_rep: dict[int, int], start: int, clean: dict, length: int
    ) -> list[tuple[str, Callable]]:
        """Forward hooks applying ``items`` = ``[(slice j, patch), ...]`` in one forward (extension point).

        At block ``l`` the hooked batch is ``[n_rep[l] * batch, length, ...]`` (a pattern hook:
        ``[n_rep[l] * batch, head, length, pos]``): ``n_rep[l]`` slices of the corrupted batch, holding
        positions ``start .. start + length - 1``; slice ``j`` must become patch ``p``'s activation.
        ``clean`` maps a hook name to the clean activation ``[batch, pos, ...]`` (the sweep's
        ``clean_cache``). Here: one vectorised index write per (hook, setter kind, layer).
        """
        groups: dict[tuple, HookGroup] = {}
        for j, p in items:
            g = groups.setdefault((p.hook, p.kind, p.layer), HookGroup())
            g.slots.append(j)
            g.idx.append(p.idx)
        B, dev = self.B, self.device
        hooks = []
        for (name, kind, layer), g in groups.items():
            J = torch.tensor(g.slots, device=dev)
            cols = [torch.tensor(c, device=dev) for c in zip(*g.idx)]
            src = clean[name].to(dev)
            pattern = is_pattern_hook(name)
            check = start > 0 or length != self.T  # only position-local hooks run on part of the positions
            hooks.append((name, vector_hook(kind, n_rep[layer], B, J, cols, src, start, pattern, length, check)))
        return hooks

    def run_chunk(self, start: int, chunk: Sequence[Patch], clean: dict, unembed: bool) -> torch.Tensor:
        """:meth:`forward_staged` output for ``chunk`` (sorted by :meth:`join_layer`): patches that join a
        block late first run their own block at position ``start`` (:meth:`block_at_start`)."""
        joins = [self.join_layer(p) for p in chunk]
        # slices in the batch at block l: the patches joined at or before it (joins are sorted)
        n_upto = {layer: bisect.bisect_right(joins, layer) for layer in range(self.cfg.n_layers)}
        first_rows: dict[int, torch.Tensor] = {}
        late: dict[int, list[int]] = {}
        for j, (p, jl) in enumerate(zip(chunk, joins)):
            if jl != p.layer:
                late.setdefault(p.layer, []).append(j)
        for layer, js in late.items():
            hooks = self.patch_hooks(
                [(k, chunk[j]) for k, j in enumerate(js)], {layer: len(js)}, start, clean, 1
            )
            rows = self.block_at_start(layer, start, len(js), hooks)
            first_rows.update({j: rows[k] for k, j in enumerate(js)})
        main = [(j, p) for j, (p, jl) in enumerate(zip(chunk, joins)) if jl == p.layer]
        hooks = self.patch_hooks(main, n_upto, start, clean, self.T - start)
        self.work_rows += self.B * (
            (self.T - start) * sum(self.cfg.n_layers - jl for jl in joins) + sum(len(js) for js in late.values())
        )
        return self.forward_staged(start, joins, hooks, unembed=unembed, first_rows=first_rows)

    def noop_patches(self, patches: Sequence[Patch], clean: dict) -> list[Patch]:
        """The patches of ``patches`` that change nothing (extension point; see the class docstring).

        Here: those whose clean slice equals the corrupted one bitwise (the hook is in :attr:`acts`);
        TransformerLens's forward is then the corrupted run. An override must return only such patches.
        """
        groups: dict[tuple, list[Patch]] = {}
        for p in patches:
            if p.hook in self.acts:
                groups.setdefault((p.hook, p.kind), []).append(p)
        found = []
        for (name, kind), ps in groups.items():
            cols = [torch.tensor(c, device=self.device) for c in zip(*(p.idx for p in ps))]
            a = gather_slices(kind, clean[name].to(self.device), cols)
            b = gather_slices(kind, self.acts[name], cols)
            if a.shape != b.shape:
                continue
            same = (a == b).flatten(1).all(1).tolist()
            found += [p for p, eq in zip(ps, same) if eq]
        return found

    def run(
        self,
        patches: Sequence[Patch],
        clean: dict,
        metric: Callable,
        metric_name: str,
        max_batch: int | None,
        budget: int | None,
        progress: bool,
        *,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """Metric value per patch ``[len(patches)]`` (in ``patches`` order), on the model device.

        ``clean``: hook name -> clean activation ``[batch, pos, ...]``; ``metric`` gets the patched logits
        ``[batch, pos, d_vocab]`` (a :class:`LazyLogits` where that is exact) and returns a scalar;
        ``max_batch`` patches per forward, else chunks capped by ``budget`` bytes. With ``shard``, every
        patch is planned but only the chunks ``i`` with ``shard.mine(i)`` run (no-op values are written by
        ``shard.owns_shared``); the other values are exactly 0 and the plan is recorded in ``shard.plans``.
        """
        from tqdm.auto import tqdm

        budget = default_budget(self.device) if budget is None else budget
        rows_cap = (
            1 << 30 if self.device.type == "cuda" else int(os.environ.get("SPARSEKERN_PATCH_ROWS", "2048"))
        )
        pos_of = {id(p): i for i, p in enumerate(patches)}
        # sharded: the slots of other ranks' chunks stay 0, so the ranks' outputs sum to the full sweep
        out = (torch.empty if shard is None else torch.zeros)(len(patches), device=self.device)
        # the metric on the corrupted run: the value of every no-op patch, and which positions it reads
        log = ReadLog()
        lazy = self.lazy_logits_ok()
        probe = LazyLogits(self.logits, self.T, self.logits[:, :0], {}, self._logits, log) if lazy else self.logits
        base = as_scalar(metric(probe), metric_name, self.device)
        read = set(log.read) if lazy and not log.materialized else None
        noop = self.noop_patches(patches, clean)
        if noop:
            # clean == corrupted on the patched slice: TransformerLens's forward is then the corrupted run
            if shard is None or shard.owns_shared:  # sharded: one rank fills them
                out[torch.tensor([pos_of[id(p)] for p in noop], device=self.device)] = base.to(out.dtype)
            skip = {id(p) for p in noop}
            patches = [p for p in patches if id(p) not in skip]
        self.n_noop = len(noop)
        chunks = self.plan(patches, max_batch, budget, rows_cap, read)
        if shard is not None:
            shard.record("engine", sorted(pos_of[id(p)] for p in noop),
                         [(s, [pos_of[id(p)] for p in c]) for s, c in chunks])
            noop = noop if shard.owns_shared else []
            chunks = [c for i, c in enumerate(chunks) if shard.mine(i)]
        self.work_rows = 0  # token rows x blocks computed, for the benchmark's work count
        self.logit_rows = 0  # token rows unembedded
        n_run = sum(len(c) for _, c in chunks)
        bar = tqdm(total=n_run + len(noop), initial=len(noop), disable=not progress, desc="patching")
        try:
            while chunks:
                start, chunk = chunks.pop(0)
                was_lazy = read is not None
                x = self.run_chunk(start, chunk, clean, unembed=not was_lazy)
                vals, read = self._metric_values(x, start, read, metric, metric_name)
                del x  # free before the next chunk allocates
                out[torch.tensor([pos_of[id(p)] for p in chunk], device=self.device)] = vals.to(out.dtype)
                bar.update(len(chunk))
                if was_lazy and read is None and chunks:
                    # the metric needed every position: re-plan the rest for full logits (memory budget)
                    rest = [p for _, c in chunks for p in c]
                    chunks = self.plan(rest, max_batch, budget, rows_cap, None)
        finally:
            bar.close()
        return out

    def _metric_values(self, x: torch.Tensor, start: int, read: set[int] | None, metric, metric_name):
        """Metric per slice of a chunk. ``x``: logits ``[n, B, T - start, V]`` (``read`` None) or the final
        residual ``[n, B, T - start, d]`` (lazy logits: ``read`` positions unembedded up front).
        Returns (values [n], the positions to unembed for the next chunk, None once all were needed)."""
        n = x.shape[0]
        if read is None:
            self.logit_rows += x.shape[0] * x.shape[1] * x.shape[2]
            return torch.stack(
                [as_scalar(metric(self.full_logits(x, j, start)), metric_name, self.device) for j in range(n)]
            ), None
        pos = sorted(p for p in read if p >= start)
        with torch.no_grad():
            slab = self._logits(x[:, :, [p - start for p in pos]]) if pos else None  # [n, B, len(pos), V]
        log = ReadLog()
        vals = []
        for j in range(n):
            known = {p: slab[j, :, i] for i, p in enumerate(pos)}
            vals.append(as_scalar(metric(LazyLogits(self.logits, start, x[j], known, self._logits, log)),
                                  metric_name, self.device))
        self.logit_rows += n * self.B * len(pos)
        return torch.stack(vals), (None if log.materialized else read | log.missed)
