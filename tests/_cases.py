"""Random SAE problems for the kernel tests (tie-free by construction: continuous random data)."""

import torch


def encoder_problem(n, d_in, d_sae, dtype=torch.float64, b_dec=True, lead=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (n,)), d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in**0.5
    b = torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.1
    bd = torch.randn(d_in, generator=g, dtype=torch.float64) * 0.1 if b_dec else None
    cast = (lambda t: t.to(dtype)) if dtype != torch.float64 else (lambda t: t)
    return cast(x), cast(W), cast(b), (cast(bd) if bd is not None else None)


def decoder_problem(n, k, d_sae, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1
    indices = torch.randint(0, d_sae, (n, k), generator=g)
    W = torch.randn(d_sae, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return values.to(dtype), indices, W.to(dtype), b.to(dtype)


def f64(*ts):
    return tuple(t.double() if t is not None and t.is_floating_point() else t for t in ts)
