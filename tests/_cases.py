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


def dyadic_encoder_problem(n, d_in, d_sae, dtype=torch.float32, seed=0):
    """An encoder problem whose pre-activations are exact in fp32 in any summation order.

    x and b_dec are multiples of 2^-2, W of 2^-5, b of 2^-7, each with at most 5-8 significant bits
    (exact in bf16 and fp16 too). Every product is a multiple of 2^-7 below 2^5 in magnitude, so a dot
    of d_in <= 1024 terms plus the biases stays below 2^17 units of 2^-7: 24 bits hold it exactly. Every
    backend then computes the exact pre-activations (ties included, so top-k order is (value desc,
    index asc) by construction) without any rounding-dependent decision. Shapes as ``encoder_problem``.
    """
    assert d_in <= 1024
    g = torch.Generator().manual_seed(seed)

    def grid(shape, std, step, cap):
        z = torch.randn(*shape, generator=g, dtype=torch.float64) * std / step
        return (z.round().clamp(-cap, cap) * step).to(dtype)

    x = grid((n, d_in), 1.0, 2.0**-2, 31)
    W = grid((d_in, d_sae), d_in**-0.5, 2.0**-5, 31)
    b = grid((d_sae,), 0.1, 2.0**-7, 255)
    bd = grid((d_in,), 0.1, 2.0**-2, 31)
    return x, W, b, bd
