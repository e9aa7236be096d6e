"""One training step against SAELens's own training SAE classes with the same weights."""

import pytest
import torch

from sparsekern.training import SAETrainer, TrainingConfig
from sparsekern.training.trainer import build_module

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import TrainStepInput  # noqa: E402


def _pair(arch, dtype, **kw):
    d_in, d_sae = 12, 48
    cfg = TrainingConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        k=5,
        dtype=dtype,
        seed=1,
        jumprelu_bandwidth=0.3,
        l0_coefficient=0.1,
        **kw,
    )
    mine = build_module(cfg)
    mine.initialize_weights(1)
    if arch == "topk":
        sl = sae_lens.TopKTrainingSAE(
            sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=5, dtype=dtype)
        )
    elif arch == "batchtopk":
        sl = sae_lens.BatchTopKTrainingSAE(
            sae_lens.BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=5, dtype=dtype)
        )
    else:
        sl = sae_lens.JumpReLUTrainingSAE(
            sae_lens.JumpReLUTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, dtype=dtype, jumprelu_bandwidth=0.3, l0_coefficient=0.1
            )
        )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in mine.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            p.copy_(noise.abs() * 0.3 if name == "threshold" else noise * 0.3)
    sl.load_state_dict({**sl.state_dict(), **{k: v.clone() for k, v in mine.state_dict().items()}})
    return cfg, mine, sl


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_one_step_loss_and_grads_match_sae_lens(arch, dtype):
    cfg, mine, sl = _pair(arch, dtype)
    dt = getattr(torch, dtype)
    x = torch.randn(32, cfg.d_in, generator=torch.Generator().manual_seed(9), dtype=dt)
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead[::3] = True
    coeffs = {"l0": 0.1, "l1": 1.0}
    out = mine.forward_train(x, x, dead, coeffs)
    out.loss.backward()
    ref = sl.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={"l0": 0.1},
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    ref.loss.backward()
    # Tolerance, from the precision of what is compared. Both libraries compute the same formulas in
    # `dtype` with different kernels (sparse encode/decode vs dense matmuls), so a value differs by the
    # reordering of its sums: n roundings of relative size u on sum|terms|, n <= N + d_in + k + d_out =
    # 32 + 12 + 5 + 12 ~ 60 (a weight gradient sums over the N rows chains through d_in, k and d_out).
    # Here |loss| ~ 120, |grad| <= 17 and sum|terms| <= ~3 * 17 for any gradient entry, so with
    # independent roundings |err| ~ sqrt(n) * u * sum|terms|:
    # float32 (u = 6e-8): <= 2.4e-5 for a gradient entry, 1.7e-4 for the loss (seen: 3e-6 / 0), under
    # atol + rtol |value| = 1e-4 + 1e-4 |value| (1e-4 near zero, 1.2e-2 for the loss);
    # float64 (u = 1.1e-16): the same estimate is ~5e-14 (seen: <= 7e-15); 1e-9 keeps a wide margin.
    # The seeded draw has no pre-activation within rounding of a top-k boundary or the JumpReLU
    # threshold (a flip there would be an O(1) difference, which no tolerance should absorb).
    tol = 1e-4 if dtype == "float32" else 1e-9
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=tol, atol=tol)
    for k, v in ref.losses.items():
        torch.testing.assert_close(out.losses[k].detach(), v.detach(), rtol=tol, atol=tol, msg=k)
    sl_params = dict(sl.named_parameters())
    for name, p in mine.named_parameters():
        # threshold is a float32 parameter in both libraries: its gradient (|g| <= ~3 here) is rounded to
        # float32 once in each, so they differ by <= 1 ulp = 2^-23 |g| <= 4e-7 < 1e-6 (seen: 2.4e-7)
        t = max(tol, 1e-6) if name == "threshold" else tol
        torch.testing.assert_close(p.grad, sl_params[name].grad, rtol=t, atol=t, msg=f"grad {name}")
    if arch == "batchtopk":
        torch.testing.assert_close(mine.topk_threshold, sl.topk_threshold)


def test_init_matches_sae_lens_seeded():
    """Same seed, same draw: W_dec kaiming-uniform rows at decoder_init_norm, W_enc = W_dec.T."""
    tr = SAETrainer(TrainingConfig(architecture="topk", d_in=10, d_sae=40, k=4, seed=7))
    torch.manual_seed(7)
    sl = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=10, d_sae=40, k=4))
    ours = torch.empty(40, 10)
    torch.nn.init.kaiming_uniform_(ours, generator=torch.Generator().manual_seed(7))
    # float32 defaults of assert_close (rtol 1.3e-6, atol 1e-5): the rows are rescaled w / ||w|| * 0.1,
    # a norm of 10 squares and one division and multiplication, <= ~13 u = 8e-7 relative
    torch.testing.assert_close(tr.sae.W_dec.norm(dim=-1), torch.full((40,), 0.1))
    torch.testing.assert_close(tr.sae.W_enc, tr.sae.W_dec.T)
    torch.testing.assert_close(tr.sae.W_dec, ours / ours.norm(dim=-1, keepdim=True) * 0.1)
    torch.testing.assert_close(sl.W_dec.norm(dim=-1), tr.sae.W_dec.norm(dim=-1))


@pytest.mark.parametrize("name", ["constant", "cosineannealing"])
@pytest.mark.parametrize("warm,decay", [(0, 0), (5, 0), (0, 7), (4, 6), (1, 1)])
def test_lr_schedule_matches_sae_lens(name, warm, decay):
    from sae_lens.training.optim import get_lr_scheduler

    from sparsekern.training.schedule import lr_factor

    cfg = TrainingConfig(
        d_in=4,
        d_sae=8,
        k=2,
        lr=1e-3,
        lr_end=2e-4,
        lr_scheduler_name=name,
        lr_warm_up_steps=warm,
        lr_decay_steps=decay,
        train_batch_size_tokens=1,
        training_tokens=30,
    )
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_lr_scheduler(
        name,
        opt,
        training_steps=30,
        lr=cfg.lr,
        warm_up_steps=warm,
        decay_steps=decay,
        lr_end=cfg.lr_end,
        num_cycles=1,
    )
    # float64 both: ours is a closed form (a few roundings); torch's schedulers update the lr recursively,
    # one multiplication by a ratio of closed forms per step, so after 30 steps they differ by <= ~3 * 30
    # * 1.1e-16 ~ 1e-14 relative. rel=1e-6 is far above that (an off-by-one step would differ by >= 1/7).
    for step in range(30):
        assert cfg.lr * lr_factor(step, cfg) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12
        ), step
        opt.step()
        sched.step()


def test_coefficient_warm_up_matches_sae_lens():
    from sae_lens.training.optim import CoefficientScheduler

    from sparsekern.training.schedule import coefficient

    s = CoefficientScheduler(warm_up_steps=4, final_value=2.5)
    for step in range(8):  # float64, one or two roundings each: approx's rel=1e-6 is far above them
        assert coefficient(step, 2.5, 4) == pytest.approx(s.value)
        s.step()


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu", "gated"])
def test_to_sae_lens_config_builds_the_same_architecture(arch):
    cfg = TrainingConfig(architecture=arch, d_in=6, d_sae=12, k=3)
    sl_cfg = cfg.to_sae_lens()
    assert sl_cfg.architecture() == arch and sl_cfg.d_sae == 12


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "standard", "gated"])
def test_whole_run_matches_sae_lens_trainer(arch, tmp_path):
    """Same init, same batches (float64): SAELens's SAETrainer and ours end with the same SAE."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer as SLTrainer

    import sparsekern

    steps, n, n_norm = 16, 64, 2
    cfg = TrainingConfig(
        architecture=arch,
        d_in=12,
        d_sae=48,
        k=4,
        dtype="float64",
        seed=3,
        lr=3e-3,
        lr_warm_up_steps=3,
        lr_decay_steps=4,
        l1_warm_up_steps=4,
        l0_warm_up_steps=4,
        l1_coefficient=0.5,
        l0_coefficient=0.05,
        jumprelu_bandwidth=0.2,
        dead_feature_window=2,
        train_batch_size_tokens=n,
        training_tokens=n * steps,
        normalize_activations="expected_average_only_in",
        n_batches_for_norm_estimate=n_norm,
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 12, generator=g, dtype=torch.float64) * 3 + 0.5 for _ in range(steps + n_norm)]
    ours = SAETrainer(cfg)
    sl_sae = getattr(
        sae_lens,
        {
            "topk": "TopKTrainingSAE",
            "batchtopk": "BatchTopKTrainingSAE",
            "jumprelu": "JumpReLUTrainingSAE",
            "gated": "GatedTrainingSAE",
            "standard": "StandardTrainingSAE",
        }[arch],
    )(cfg.to_sae_lens())
    sl_sae.load_state_dict(
        {**sl_sae.state_dict(), **{k: v.clone() for k, v in ours.sae.state_dict().items()}}
    )
    sl_cfg = SAETrainerConfig(
        total_training_samples=n * steps,
        train_batch_size_samples=n,
        lr=cfg.lr,
        lr_end=cfg.lr_end,
        lr_warm_up_steps=3,
        lr_decay_steps=4,
        dead_feature_window=2,
        n_batches_for_norm_estimate=n_norm,
    )
    sl = SLTrainer(sl_cfg, sl_sae, iter(batches))
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        sl.fit()
    sl_sae.save_inference_model(tmp_path / "sl")
    expected = sparsekern.SAE.load_from_disk(tmp_path / "sl", dtype="float64")

    ours.estimate_scaling_factor(batches[:n_norm])
    got = ours.fit(batches[n_norm:], progress=False)
    exp_sd = expected.state_dict()
    # float64 runs with the same data and init: the float64 parameters differ by the reordering of sums
    # per step (~1e-14 relative) carried through 16 Adam steps (seen: <= 1.5e-13 relative over the five
    # architectures); rtol 1e-7 keeps a wide margin. The JumpReLU threshold is a float32 parameter in
    # both libraries (exported as float64): each step rounds it to float32, and where the two updates
    # straddle a rounding boundary the thresholds part by one ulp, so after `steps` steps they differ by
    # <= steps ulps = steps * 2^-23 relative (seen: 1 ulp = 8e-8, which rtol 1e-7 only just holds).
    thr_rtol = steps * torch.finfo(torch.float32).eps
    for k, v in got.state_dict().items():
        rtol = thr_rtol if k == "threshold" else 1e-7
        torch.testing.assert_close(v, exp_sd[k], rtol=rtol, atol=1e-9, msg=k)
