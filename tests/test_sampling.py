"""DPM-Solver++(2M), guidance intervals, the fused decoder and fused attention: exact where they must be."""

import copy

import numpy as np
import pytest
import torch

import synth
from synth.models.fast import SubpixelUpConv, fuse_upsample_convs
from synth.sampling import dpm_solver_pp_2m, dpm_timesteps


def _schedule():
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205,
                         clip_sample=False)


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
def test_timesteps_run_from_pure_noise_to_zero_and_decrease(spacing):
    acp = _schedule().alphas_cumprod
    for steps in (2, 8, 20, 200):
        ts = dpm_timesteps(acp, steps, spacing)
        assert ts[0] == 999 and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))
        # log-SNR spacing asks for more distinct levels near 0 than 200 steps of 1000 have: fewer then
        assert len(ts) == steps if steps <= 20 or spacing == "time" else 150 <= len(ts) <= steps
    assert dpm_timesteps(acp, 1, spacing) == [999]
    with pytest.raises(ValueError, match="`steps` must be within 1-1000"):
        dpm_timesteps(acp, 0, spacing)
    with pytest.raises(ValueError, match="`spacing` must be logsnr or time"):
        dpm_timesteps(acp, 5, "karras")


def test_dpm_solver_recovers_the_data_point_of_a_known_distribution():
    """Data = a single point m: the exact noise prediction is (x - alpha m) / sigma, and any consistent
    solver must land on m from any noise, whatever the number of steps."""
    acp = _schedule().alphas_cumprod
    m = torch.tensor([0.7, -1.2, 2.0])

    def eps(x, t, guided):
        a = float(acp[t])
        return (x - a**0.5 * m) / (1 - a) ** 0.5

    for steps in (3, 8, 25):
        x = dpm_solver_pp_2m(eps, torch.randn(3, generator=torch.Generator().manual_seed(steps)), acp,
                             dpm_timesteps(acp, steps))
        torch.testing.assert_close(x, m, atol=1e-4, rtol=0)


def test_dpm_solver_follows_the_exact_ode_of_a_gaussian_distribution():
    """Data ~ N(mu, s^2): the exact noise prediction and the probability-flow ODE's end point are known in
    closed form. DPM-Solver++(2M) in 20 steps lands on it; DDIM (first order) in 20 steps does not."""
    sched = _schedule()
    acp = sched.alphas_cumprod
    mu, s = 0.5, 0.3

    def eps(x, t, guided):
        a = float(acp[t])
        return (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * s**2 + 1 - a)

    noise = torch.randn(256, generator=torch.Generator().manual_seed(0))
    a_T = float(acp[-1])
    exact = mu + s * (noise - a_T**0.5 * mu) / (a_T * s**2 + 1 - a_T) ** 0.5
    dpm = dpm_solver_pp_2m(eps, noise.clone(), acp, dpm_timesteps(acp, 20))
    sched.set_timesteps(20)
    x = noise.clone()
    for t in sched.timesteps:
        x, _ = sched.step(eps(x, int(t), True), t, x)
    err_dpm, err_ddim = (dpm - exact).abs().max().item(), (x - exact).abs().max().item()
    assert err_dpm < 0.01 and err_dpm < err_ddim / 5, (err_dpm, err_ddim)


def test_guidance_flags_reach_the_model_per_step():
    sched = _schedule()
    seen = []

    def eps(x, t, guided):
        seen.append((t, guided))
        return torch.zeros_like(x)

    ts = dpm_timesteps(sched.alphas_cumprod, 4)
    dpm_solver_pp_2m(eps, torch.zeros(2), sched.alphas_cumprod, ts, guided=[True, True, False, False])
    assert seen == list(zip(ts, [True, True, False, False]))
    with pytest.raises(ValueError, match="one entry per step"):
        dpm_solver_pp_2m(eps, torch.zeros(2), sched.alphas_cumprod, ts, guided=[True])


@pytest.mark.parametrize("shape", [(5, 6, 4), (1, 1, 1), (3, 8, 2)])
def test_subpixel_upconv_equals_nearest_upsample_then_conv(shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, *shape)
    ref = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(SubpixelUpConv(conv)(x), ref, atol=1e-5, rtol=1e-5)
    # a channels-last input (as the pipeline's decoder runs) gives the same values, in channels-last
    y = SubpixelUpConv(conv)(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) or min(shape) == 1
    with pytest.raises(ValueError, match="3x3x3 convolution"):
        SubpixelUpConv(torch.nn.Conv3d(3, 4, 3, padding=1, stride=2))


def test_fused_decoder_gives_the_same_image(tiny_generator):
    ae = tiny_generator.autoencoder
    fused = copy.deepcopy(ae.decoder)
    assert fuse_upsample_convs(fused) == 1  # the tiny model has one upsampling level
    z = torch.randn(1, *tiny_generator.latent_shape()[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ae.decode_stage_2_outputs(z)[0, 0].clamp(0, 1).numpy()
    np.testing.assert_allclose(tiny_generator.decode(z), ref, atol=1e-5)


def test_fused_attention_gives_the_same_noise_prediction(tiny_model_dir):
    from synth.models.networks import build_unet

    gen = synth.load_generator(tiny_model_dir, device="cpu")
    plain = build_unet(gen.config.unet).eval()
    plain.load_state_dict(gen.unet.state_dict())
    assert any(getattr(m, "use_flash_attention", False) for m in gen.unet.modules())
    assert not any(getattr(m, "use_flash_attention", False) for m in plain.modules())
    z = torch.randn(gen.latent_shape(), generator=torch.Generator().manual_seed(2))
    x, ctx = gen._unet_inputs(z, gen.encode_condition(synth.Condition(age=40, sex="F")))
    t = torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(gen.unet(x, timesteps=t, context=ctx), plain(x, timesteps=t, context=ctx),
                                   atol=1e-5, rtol=1e-4)


def test_samplers_and_guidance_interval_are_deterministic_and_recorded(tiny_generator):
    cond = synth.Condition(age=70, sex="F", diagnosis="AD")
    a = tiny_generator.generate(cond, seed=5, sampler="dpm++2m", steps=4, guidance_scale=2.0)
    b = tiny_generator.generate(cond, seed=5, sampler="dpm++2m", steps=4, guidance_scale=2.0)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.provenance["sampler"] == "DPM-Solver++(2M)" and a.provenance["steps"] == 4
    d = tiny_generator.generate(cond, seed=5, sampler="ddim", steps=4, guidance_scale=2.0)
    assert d.provenance["sampler"] == "DDIM" and not np.array_equal(a.image, d.image)
    with pytest.raises(ValueError, match="`sampler` must be one of ddim, dpm\\+\\+2m"):
        tiny_generator.generate(cond, seed=5, sampler="euler")


def test_guidance_only_where_the_interval_says(tiny_generator):
    """Guidance outside the interval is the plain conditional model: an empty interval equals scale 1."""
    cond = synth.Condition(age=70, sex="F", diagnosis="AD")
    kw = dict(steps=4, bf16=False, progress=None, sampler="dpm++2m")
    cfg_off = tiny_generator.sample_latent(cond, 5, guidance_scale=1.0, **kw)
    empty = tiny_generator.sample_latent(cond, 5, guidance_scale=3.0, guidance_interval=(2000, 2000), **kw)
    full = tiny_generator.sample_latent(cond, 5, guidance_scale=3.0, guidance_interval=(0, 999), **kw)
    torch.testing.assert_close(empty, cfg_off)
    assert not torch.allclose(full, cfg_off)


def test_epsilon_scaling_divides_the_noise_prediction_and_is_recorded(tiny_model_dir):
    """``sampling.eps_scale`` divides every guided noise prediction. One DDIM step at t = 0 returns
    (z - sqrt(1 - a) * eps / s) / sqrt(a): affine in 1 / s, so z(1) - z(2) = 2 (z(2) - z(4))."""
    gen = synth.load_generator(tiny_model_dir, device="cpu")
    cond = synth.Condition(age=60, sex="M")
    kw = dict(steps=1, guidance_scale=2.0, bf16=False, progress=None, sampler="ddim")
    z1, z2, z4 = (gen.sample_latent(cond, 3, eps_scale=s, **kw) for s in (1.0, 2.0, 4.0))
    assert not torch.allclose(z1, z2)
    d = z1 - z2  # float32 cancellation: compare norms, not elements
    assert float((d - 2 * (z2 - z4)).norm() / d.norm()) < 1e-3
    torch.testing.assert_close(gen.sample_latent(cond, 3, **kw), z1)  # the config's default is 1
    plain = gen.generate(cond, seed=3, steps=2)
    assert "eps_scale" not in plain.provenance
    gen.config.sampling["eps_scale"] = 1.02
    a, b = gen.generate(cond, seed=3, steps=2), gen.generate(cond, seed=3, steps=2)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.provenance["eps_scale"] == 1.02 and not np.array_equal(a.image, plain.image)
    fast = gen.generate(cond, seed=3, sampler="dpm++2m", steps=2)  # the DPM-Solver path scales too
    gen.config.sampling["eps_scale"] = 1.0
    assert not np.array_equal(fast.image, gen.generate(cond, seed=3, sampler="dpm++2m", steps=2).image)
    gen.config.sampling["eps_scale"] = 3
    with pytest.raises(ValueError, match="`eps_scale` must be within 0.5-2, got 3"):
        gen.generate(cond, seed=3, steps=2)


def test_fast_preset_comes_from_the_config_and_explicit_values_win(tiny_model_dir):
    gen = synth.load_generator(tiny_model_dir, device="cpu")
    with pytest.raises(ValueError, match="has no fast sampling preset"):
        gen.sampling_options(fast=True)
    gen.config.sampling["fast"] = {"sampler": "dpm++2m", "steps": 2, "guidance_interval": [300, 999]}
    opts = gen.sampling_options(fast=True)
    assert opts["sampler"] == "dpm++2m" and opts["steps"] == 2 and opts["guidance_interval"] == [300, 999]
    assert gen.sampling_options(steps=5, fast=True)["steps"] == 5
    assert gen.sampling_options()["sampler"] == "ddim"  # the default is untouched
    brain = gen.generate(synth.Condition(age=50, sex="M"), seed=1, fast=True)
    assert brain.provenance["sampler"] == "DPM-Solver++(2M)" and brain.provenance["steps"] == 2


def test_shipped_model_default_and_fast_preset():
    gen_cfg = synth.load_generator(device="cpu").config.sampling
    assert gen_cfg["sampler"] == "ddim" and gen_cfg["steps"] == 20
    assert gen_cfg["fast"]["sampler"] == "dpm++2m" and gen_cfg["fast"]["steps"] == 8


def test_onednn_conv3d_same_result_same_state_dict_and_falls_back_where_it_must():
    from synth.models.fast import OneDNNConv3d, use_onednn_convs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(8, 4, 1, stride=2))
    plain = copy.deepcopy(net)
    keys = list(net.state_dict())
    assert use_onednn_convs(net) == 2 and all(isinstance(m, OneDNNConv3d) for m in (net[0], net[2]))
    assert list(net.state_dict()) == keys
    x = torch.randn(1, 3, 6, 5, 4)  # batch 1, small: PyTorch itself would take its slow reference path
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the ordinary (bf16) path
        assert net(x).dtype == torch.bfloat16
    xg = x.clone().requires_grad_(True)  # training: gradients flow as through a plain Conv3d
    net(xg).sum().backward()
    plain_x = x.clone().requires_grad_(True)
    plain(plain_x).sum().backward()
    torch.testing.assert_close(xg.grad, plain_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net[0].weight.grad, plain[0].weight.grad, atol=1e-4, rtol=1e-4)


def test_generator_unet_uses_onednn_convs(tiny_model_dir):
    from synth.models.fast import OneDNNConv3d

    gen = synth.load_generator(tiny_model_dir, device="cpu")
    convs = [m for m in gen.unet.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(isinstance(m, OneDNNConv3d) for m in convs)
