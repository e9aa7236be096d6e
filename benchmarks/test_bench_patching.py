"""pytest-benchmark: sparsekern.patching vs transformer_lens.patching (exact activation patching).

The full sweeps are long on a CPU (TransformerLens: 180 / 2160 forward passes), so this suite times a
fixed sub-sweep given by ``index_df`` (the same rows for both libraries: one per layer at spread-out
positions/heads). ``sparsekern bench patching`` times sparsekern's full grid instead.
``SPARSEKERN_BENCH_QUICK=1`` uses the 2-layer toy model.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from sparsekern.bench import patching as P

QUICK = os.environ.get("SPARSEKERN_BENCH_QUICK") == "1"


@pytest.fixture(scope="module")
def built():
    return P.build(QUICK, torch.device("cpu"))


def _rows(model, fn_name, T):
    import transformer_lens.patching as tlp

    import sparsekern.patching as skp

    f = getattr(tlp, fn_name)
    axes = f.keywords["index_axis_names"]
    sizes = {"layer": model.cfg.n_layers, "pos": T, "head": model.cfg.n_heads}
    grid = skp.make_df_from_ranges([sizes[a] for a in axes], list(axes))
    per = len(grid) // model.cfg.n_layers
    return f, grid.iloc[[l * per + (l * 5 + 2) % per for l in range(model.cfg.n_layers)]].reset_index(
        drop=True
    )


@pytest.mark.benchmark(group="patching")
@pytest.mark.parametrize("impl", ["sparsekern", "transformer_lens"])
@pytest.mark.parametrize("fn_name", sorted({c.fn_name for c in P.SPECS.values()}))
def test_patching_subsweep(benchmark, built, fn_name, impl):
    import transformer_lens.patching as tlp

    import sparsekern.patching as skp

    model, _, corr, cache, metrics, _ = built
    metric = metrics["last"]
    f, df = _rows(model, fn_name, corr.shape[1])
    setter, act = f.keywords["patch_setter"], f.keywords["activation_name"]
    if impl == "sparsekern":

        def call():
            return skp.generic_activation_patch(
                model, corr, cache, metric, setter, act, index_df=df, progress=False
            )
    else:

        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return tlp.generic_activation_patch(model, corr, cache, metric, setter, act, index_df=df)

    benchmark.extra_info.update(fn=fn_name, patches=len(df))
    benchmark.pedantic(call, rounds=1 if not QUICK else 3, iterations=1)
