"""Training steps lower the loss on tiny data made here; runs resume from their checkpoints."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synth.train.autoencoder import AETrainConfig, train_autoencoder
from synth.train.diffusion import LDMTrainConfig, augmented_cache_name, train_diffusion

TINY_AE = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 2, "channels": [8, 8],
    "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
TINY_UNET = {
    "spatial_dims": 3, "channels": [8, 8], "attention_levels": [False, True], "num_res_blocks": 1,
    "num_head_channels": 8, "norm_num_groups": 4, "with_conditioning": True,
}


def phantoms(n=6, size=16, seed=0):
    """Ellipsoid 'brains' with a dark 'ventricle' whose size varies: (N, 1, S, S, S) in [0, 1]."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 3, indexing="ij"))
    vols, rows = [], []
    for i in range(n):
        r = rng.uniform(0.6, 0.9)
        v = rng.uniform(0.1, 0.35)
        brain = ((g**2).sum(0) < r**2).astype(np.float32) * 0.8
        brain[(g**2).sum(0) < v**2] = 0.2
        vols.append(brain[None])
        icv = 1e6
        rows.append({"age": 20 + 10 * i, "sex": "FM"[i % 2], "icv": icv, "brain": icv * r**3 / 0.75,
                     "gm": icv * 0.45 * r, "wm": icv * 0.35 * r,
                     "lateral_ventricles": icv * v**3 / 10, "hippocampus": icv * 0.005})
    return np.stack(vols), rows


def test_autoencoder_training_lowers_loss_and_resumes(tmp_path):
    vols, _ = phantoms()
    cfg = AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=40, lr=3e-3, bf16=False,
                        ckpt_every=20, autoencoder=dict(TINY_AE))
    torch.manual_seed(0)
    state = train_autoencoder(cfg, volumes=vols, progress=False)
    assert state["step"] == 40
    with open(tmp_path / "ae" / "losses.csv") as f:
        l1 = [float(r["l1"]) for r in csv.DictReader(f)]
    assert len(l1) == 40
    assert np.mean(l1[-5:]) < 0.7 * np.mean(l1[:5])
    # Resume: a longer run continues from step 40 instead of starting over.
    cfg.steps = 45
    state = train_autoencoder(cfg, volumes=vols, progress=False)
    assert state["step"] == 45
    with open(tmp_path / "ae" / "losses.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps[-6:] == [40, 41, 42, 43, 44, 45][-6:] or steps[-5:] == [41, 42, 43, 44, 45]


def _fixed_batch_loss(unet_state, unet_kwargs, latents, cond):
    from monai.networks.schedulers import DDPMScheduler

    from synth.models.networks import build_unet

    unet = build_unet(unet_kwargs)
    unet.load_state_dict(unet_state)
    unet.eval()
    sched = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205)
    g = torch.Generator().manual_seed(0)
    z0 = torch.from_numpy(latents)
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (len(z0),), generator=g)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    c = torch.from_numpy(cond)
    x = torch.cat([zt, c[:, :, None, None, None].expand(-1, -1, *zt.shape[2:])], 1)
    with torch.no_grad():
        return F.mse_loss(unet(x, timesteps=t, context=c[:, None, :]), noise).item()


def test_diffusion_training_lowers_loss_and_records_model_config(tmp_path):
    vols, rows = phantoms(n=8)
    ae_cfg = AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=5, bf16=False, autoencoder=dict(TINY_AE))
    train_autoencoder(ae_cfg, volumes=vols, progress=False)
    cfg = LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "ldm"), steps=1,
                         batch_size=4, lr=2e-3, bf16=False, unet=dict(TINY_UNET))
    torch.manual_seed(0)
    first = train_diffusion(cfg, rows=rows, volumes=vols, progress=False)
    cfg.steps = 80
    last = train_diffusion(cfg, rows=rows, volumes=vols, progress=False)
    assert last["step"] == 80
    mc = last["model_config"]
    assert mc["unet"]["in_channels"] == 2 + 6 and mc["unet"]["cross_attention_dim"] == 6
    assert set(mc["normative"]["coefs"]) >= {"hippocampus", "lateral_ventricles"}
    from synth.train.diffusion import covariate_matrix

    latents = np.load(tmp_path / "ldm" / "latents.npz")["latents"][:8] * mc["latent_scale"]
    cond = covariate_matrix(rows, mc["covariates"], mc["covariate_ranges"])
    before = _fixed_batch_loss(first["state_dict"], mc["unet"], latents.astype(np.float32), cond)
    after = _fixed_batch_loss(last["state_dict"], mc["unet"], latents.astype(np.float32), cond)
    assert after < 0.8 * before


def test_packaged_model_generates(tmp_path):
    import synth
    from synth.train.package import package_model

    vols, rows = phantoms(n=8)
    # The packaged grid is the 2 mm brain grid (80 x 96 x 80): two downsamplings keep it cheap.
    ae = dict(TINY_AE, channels=[4, 4, 4], attention_levels=[False] * 3)
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=2, bf16=False,
                                    autoencoder=ae), volumes=vols, progress=False)
    final = train_diffusion(LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "ldm"),
                                           steps=2, batch_size=2, bf16=False, unet=dict(TINY_UNET), snap_every=1),
                            rows=rows, volumes=vols, progress=False)
    folder = package_model(tmp_path / "ae", tmp_path / "ldm", tmp_path / "model", name="t", version="0", steps=2)
    # every snap_every steps the EMA weights are kept, and a snapshot packages like the run's last.pt
    assert sorted(p.name for p in (tmp_path / "ldm" / "snaps").iterdir()) == ["step_000001.pt", "step_000002.pt"]
    last_snap = torch.load(tmp_path / "ldm" / "snaps" / "step_000002.pt", weights_only=False)
    assert last_snap["step"] == 2 and "optimizer" not in last_snap
    assert all(torch.equal(last_snap["ema_state_dict"][k], v) for k, v in final["ema_state_dict"].items())
    early = package_model(tmp_path / "ae", tmp_path / "ldm" / "snaps" / "step_000001.pt", tmp_path / "early",
                          name="t", version="0", steps=2)
    from synth.io import read_json
    from safetensors.torch import load_file

    assert ", UNet 1 steps" in read_json(early / "config.json")["reference"]
    assert ", UNet 2 steps" in read_json(folder / "config.json")["reference"]
    first_snap = torch.load(tmp_path / "ldm" / "snaps" / "step_000001.pt", weights_only=False)
    packed = load_file(str(early / "unet.safetensors"))
    assert all(torch.equal(packed[k], v.to(packed[k].dtype)) for k, v in first_snap["ema_state_dict"].items())
    assert any(not torch.equal(first_snap["ema_state_dict"][k], v) for k, v in last_snap["ema_state_dict"].items())
    gen = synth.load_generator(folder, device="cpu")
    brain = gen.generate(synth.Condition(age=50, sex="F"), seed=0, bf16=False)
    assert brain.image.shape == (80, 96, 80)
    from safetensors import safe_open

    with safe_open(str(folder / "unet.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype in (torch.float16, torch.int64) for k in f.keys())


def test_decoder_only_finetune_keeps_the_encoder(tmp_path):
    vols, _ = phantoms()
    base = AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=10, bf16=False, autoencoder=dict(TINY_AE))
    first = train_autoencoder(base, volumes=vols, progress=False)
    ft = AETrainConfig(data_dir="", run_dir=str(tmp_path / "ft"), steps=30, lr=3e-3, bf16=False,
                       autoencoder=dict(TINY_AE), init_from=str(tmp_path / "ae"), decoder_only=True)
    tuned = train_autoencoder(ft, volumes=vols, progress=False)
    from synth.train.package import _autoencoder_history

    assert first["init_step"] is None and tuned["init_step"] == 10
    assert _autoencoder_history(tuned) == "autoencoder 10 steps + decoder fine-tune 30 steps (encoder frozen)"
    assert _autoencoder_history(first) == "autoencoder 10 steps"
    older = {k: v for k, v in tuned.items() if k != "init_step"}  # a run from before init_step was recorded
    assert _autoencoder_history(older) == _autoencoder_history(tuned)
    moved = dict(older, config=dict(older["config"], init_from=str(tmp_path / "gone")))
    assert _autoencoder_history(moved) == "autoencoder unknown steps + decoder fine-tune 30 steps (encoder frozen)"
    for k, v in first["ema_state_dict"].items():
        if k.startswith(("encoder.", "quant_conv_mu.", "quant_conv_log_sigma.")):
            assert torch.equal(tuned["state_dict"][k], v), k
    assert any(not torch.equal(tuned["state_dict"][k], v) for k, v in first["ema_state_dict"].items() if k.startswith("decoder."))
    with open(tmp_path / "ft" / "losses.csv") as f:
        l1 = [float(r["l1"]) for r in csv.DictReader(f)]
    assert np.mean(l1[-5:]) < np.mean(l1[:5])


def test_decoder_only_cached_latents_train_exactly_as_encoding_every_step(tmp_path):
    vols, _ = phantoms()
    vols[:, :, :6] *= np.linspace(0.3, 1.0, 6)[:, None, None]  # lopsided, so a mirrored latent differs
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=5, bf16=False,
                                    autoencoder=dict(TINY_AE)), volumes=vols, progress=False)
    runs = {}
    for cache in (True, False):
        cfg = AETrainConfig(data_dir="", run_dir=str(tmp_path / f"ft-{cache}"), steps=12, lr=3e-3, bf16=False,
                            batch_size=2, autoencoder=dict(TINY_AE), init_from=str(tmp_path / "ae"),
                            decoder_only=True, cache_latents=cache)
        state = train_autoencoder(cfg, volumes=vols, progress=False)
        with open(tmp_path / f"ft-{cache}" / "losses.csv") as f:
            runs[cache] = ([float(r["loss"]) for r in csv.DictReader(f)], state["state_dict"])
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-6)
    # The two paths encode in different batch shapes, so conv kernels round differently (by ~1e-7), and
    # Adam, which divides by the gradient's running RMS, can turn that into ~1e-5 on a weight whose
    # gradient is near zero (1.6e-5 was seen on an AVX2-only CPU). 12 steps at lr 3e-3 move weights by
    # up to ~4e-2, so 1e-4 still tells a different training apart while holding across CPU kernels.
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-3, atol=1e-4)


def test_latent_noise_changes_decoder_training_and_needs_a_frozen_encoder(tmp_path):
    vols, _ = phantoms()
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=5, bf16=False,
                                    autoencoder=dict(TINY_AE)), volumes=vols, progress=False)
    losses = {}
    for noise, cache in ((0.0, True), (0.5, True), (0.5, False)):
        run = tmp_path / f"ft-{noise}-{cache}"
        cfg = AETrainConfig(data_dir="", run_dir=str(run), steps=6, lr=3e-3, bf16=False, autoencoder=dict(TINY_AE),
                            init_from=str(tmp_path / "ae"), decoder_only=True, latent_noise=noise, cache_latents=cache)
        train_autoencoder(cfg, volumes=vols, progress=False)
        with open(run / "losses.csv") as f:
            losses[noise, cache] = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses[0.0, True][0] != losses[0.5, True][0]  # same seed, same first volume: only the noise differs
    np.testing.assert_allclose(losses[0.5, True], losses[0.5, False], rtol=1e-4)  # cached or not, the same noisy run
    with pytest.raises(ValueError, match="needs `decoder_only`"):
        AETrainConfig(data_dir="", run_dir="", latent_noise=0.1)


TINY_DISC = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": 4, "num_layers_d": 2, "norm": "INSTANCE"}


def test_adversarial_patch_loss_starts_late_trains_the_discriminator_and_resumes(tmp_path):
    vols, _ = phantoms()
    run = tmp_path / "adv"
    cfg = AETrainConfig(data_dir="", run_dir=str(run), steps=8, lr=3e-3, bf16=False, ckpt_every=4,
                        autoencoder=dict(TINY_AE), adv_weight=0.1, adv_start=3, discriminator=dict(TINY_DISC))
    state = train_autoencoder(cfg, volumes=vols, progress=False)
    with open(run / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["adv"]) for r in rows[:3]] == [0.0] * 3 and [float(r["disc"]) for r in rows[:3]] == [0.0] * 3
    assert all(float(r["adv"]) > 0 and float(r["disc"]) > 0 for r in rows[3:])
    saved = torch.load(run / "last.pt", weights_only=False)
    assert saved["step"] == 8 and "discriminator" in saved and "disc_optimizer" in saved
    assert set(state["discriminator"]) == set(saved["discriminator"])
    # The discriminator is trained, not only used: the same seed with the loss never switched on
    # (adv_start = steps) leaves it at its initial weights.
    idle = AETrainConfig(data_dir="", run_dir=str(tmp_path / "idle"), steps=8, lr=3e-3, bf16=False,
                         autoencoder=dict(TINY_AE), adv_weight=0.1, adv_start=8, discriminator=dict(TINY_DISC))
    untouched = train_autoencoder(idle, volumes=vols, progress=False)["discriminator"]
    moved = [k for k, v in saved["discriminator"].items() if v.is_floating_point() and not torch.equal(untouched[k], v)]
    assert len(moved) > 0
    # Resume: continues from step 8 with the saved discriminator.
    cfg.steps = 10
    assert train_autoencoder(cfg, volumes=vols, progress=False)["step"] == 10
    # Without the adversarial term the same seed trains a different decoder.
    plain = AETrainConfig(data_dir="", run_dir=str(tmp_path / "plain"), steps=8, lr=3e-3, bf16=False,
                          autoencoder=dict(TINY_AE))
    base = train_autoencoder(plain, volumes=vols, progress=False)
    assert any(not torch.equal(base["state_dict"][k], saved["state_dict"][k]) for k in base["state_dict"] if k.startswith("decoder."))


def test_decoder_adversarial_fine_tune_on_crops_and_sampled_latents(tmp_path):
    from synth.train.autoencoder import crop, load_latent_bank, random_crop_corner

    vols, _ = phantoms()
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=5, bf16=False,
                                    autoencoder=dict(TINY_AE)), volumes=vols, progress=False)
    g = torch.Generator().manual_seed(0)
    bank = {"latents": torch.randn(3, 2, 8, 8, 8, generator=g), "seeds": [0, 1, 2]}  # latent grid of the 16^3 phantoms
    torch.save(bank, tmp_path / "bank.pt")

    def run(name, **kw):
        cfg = AETrainConfig(data_dir="", run_dir=str(tmp_path / name), steps=6, lr=3e-3, bf16=False, autoencoder=dict(TINY_AE),
                            init_from=str(tmp_path / "ae"), decoder_only=True, adv_weight=0.5, discriminator=dict(TINY_DISC),
                            **kw)
        state = train_autoencoder(cfg, volumes=vols, progress=False)
        with open(tmp_path / name / "losses.csv") as f:
            return state, [(float(r["adv"]), float(r["disc"])) for r in csv.DictReader(f)]

    whole, whole_losses = run("whole")
    cropped, crop_losses = run("crop", disc_crop=16)  # the whole 16^3 phantom: the same run as no crop
    assert crop_losses == whole_losses
    sampled, sampled_losses = run("bank", disc_crop=16, adv_latents=str(tmp_path / "bank.pt"), snap_every=3)
    assert all(a > 0 and d > 0 for a, d in sampled_losses)
    assert sampled_losses[0] != whole_losses[0]  # the discriminator also judged a rendered sampled latent
    decoder = [k for k in whole["state_dict"] if k.startswith("decoder.")]
    assert any(not torch.equal(whole["state_dict"][k], sampled["state_dict"][k]) for k in decoder)
    encoder = [k for k in whole["state_dict"] if k.startswith("encoder.")]
    assert all(torch.equal(whole["state_dict"][k], sampled["state_dict"][k]) for k in encoder)  # still frozen
    snaps = sorted(p.name for p in (tmp_path / "bank" / "snaps").iterdir())
    assert snaps == ["step_000003.pt", "step_000006.pt"]
    snap = torch.load(tmp_path / "bank" / "snaps" / "step_000006.pt", weights_only=False)
    assert snap["step"] == 6 and all(torch.equal(snap["ema_state_dict"][k], v) for k, v in sampled["ema_state_dict"].items())
    # Crops: a cube inside the volume, the same place for every channel.
    rng = np.random.default_rng(0)
    for _ in range(20):
        corner = random_crop_corner((20, 24, 20), 16, rng)
        assert all(0 <= c <= n - 16 for c, n in zip(corner, (20, 24, 20)))
        assert crop(torch.zeros(1, 1, 20, 24, 20), corner, 16).shape == (1, 1, 16, 16, 16)
    # A bank of another latent grid, or no bank, is refused with what was expected.
    torch.save(torch.zeros(2, 2, 4, 4, 4), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"must hold \(N, 2, 8, 8, 8\) latents"):
        load_latent_bank(tmp_path / "small.pt", (2, 8, 8, 8))
    with pytest.raises(FileNotFoundError, match="no latent bank"):
        load_latent_bank(tmp_path / "none.pt", (2, 8, 8, 8))
    with pytest.raises(ValueError, match="needs `decoder_only` and `adv_weight`"):
        AETrainConfig(data_dir="", run_dir="", adv_latents=str(tmp_path / "bank.pt"))
    with pytest.raises(ValueError, match="at least 24 voxels for a 3-layer discriminator"):
        AETrainConfig(data_dir="", run_dir="", disc_crop=20)
    AETrainConfig(data_dir="", run_dir="", disc_crop=24)  # the smallest cube a 3-layer PatchDiscriminator takes
    AETrainConfig(data_dir="", run_dir="", disc_crop=16, discriminator=dict(TINY_DISC))  # 2 layers: 16 is enough
    with pytest.raises(ValueError, match="`snap_every` must be at least 1"):
        AETrainConfig(data_dir="", run_dir="", snap_every=0)
    with pytest.raises(ValueError, match="`snap_every` must be at least 1"):
        LDMTrainConfig(data_dir="", ae_run="", run_dir="", snap_every=0)


def test_adversarial_settings_are_checked():
    with pytest.raises(ValueError, match="`adv_weight` and `adv_start` must be >= 0"):
        AETrainConfig(data_dir="", run_dir="", adv_weight=-0.1)


def test_loss_log_keeps_old_rows_when_a_resumed_run_adds_columns(tmp_path):
    from synth.train.common import LossLog

    log = LossLog(tmp_path / "losses.csv", ["loss", "lr"])
    log.log(1, loss=0.5, lr=1e-3)
    log.close()
    log = LossLog(tmp_path / "losses.csv", ["loss", "adv", "lr"])
    log.log(2, loss=0.4, adv=0.2, lr=1e-3)
    log.close()
    with open(tmp_path / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert rows[0]["loss"] == "0.5" and rows[0]["adv"] == "" and rows[1]["adv"] == "0.2"


def test_covariates_can_include_a_diagnosis():
    from synth.train.diffusion import covariate_matrix, covariate_ranges

    _, rows = phantoms(n=3)
    rows[1]["diagnosis"] = "AD"
    names = ["age", "diagnosis_CN", "diagnosis_AD"]
    m = covariate_matrix(rows, names, covariate_ranges(rows, names))
    assert m[:, 1].tolist() == [1.0, 0.0, 1.0] and m[:, 2].tolist() == [0.0, 1.0, 0.0] and (m[:, -1] == 1).all()
    with pytest.raises(ValueError, match="unknown covariate 'weight'"):
        covariate_matrix(rows, ["weight"], {})


def _tiny_packaged_model(tmp_path, vols, rows):
    from synth.train.package import package_model

    ae = dict(TINY_AE, channels=[4, 4, 4], attention_levels=[False] * 3)
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=2, bf16=False, autoencoder=ae),
                      volumes=vols, progress=False)
    train_diffusion(LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "ldm"), steps=2,
                                   batch_size=2, bf16=False, unet=dict(TINY_UNET)), rows=rows, volumes=vols, progress=False)
    return package_model(tmp_path / "ae", tmp_path / "ldm", tmp_path / "model", name="tiny", version="0.1",
                         steps=3, guidance_scale=2.0)


def test_training_continues_from_a_packaged_model_and_packages_with_it(tmp_path):
    """A shipped model is a starting point: the UNet trains on from its weights with its conditioning
    scale kept; a decoder fine-tune starts from its autoencoder; the parts package back together."""
    import synth
    from synth.models.config import ModelConfig
    from synth.train.common import model_folder_weights
    from synth.train.package import package_model

    vols, rows = phantoms(n=8)
    folder = _tiny_packaged_model(tmp_path, vols, rows)
    shipped = ModelConfig.load(folder)
    # Other subjects would give other covariate ranges and latent scale; a continued run keeps the model's.
    vols2, rows2 = phantoms(n=9, seed=1)
    cfg = LDMTrainConfig(data_dir="", ae_run=str(folder), run_dir=str(tmp_path / "ldm2"), steps=1, batch_size=2,
                         lr=1e-12, bf16=False, init_from=str(folder))
    state = train_diffusion(cfg, rows=rows2, volumes=vols2, progress=False)
    mc = state["model_config"]
    assert mc["covariate_ranges"] == shipped.covariate_ranges and mc["latent_scale"] == shipped.latent_scale
    assert mc["init_from"] == "tiny 0.1"
    unet0, _ = model_folder_weights(folder, "unet")
    assert all(torch.allclose(state["state_dict"][k].float(), v, atol=1e-6) for k, v in unet0.items())

    ae_cfg = AETrainConfig(data_dir="", run_dir=str(tmp_path / "dec"), steps=3, lr=1e-2, bf16=False,
                           init_from=str(folder), decoder_only=True, autoencoder=shipped.autoencoder)
    ae_state = train_autoencoder(ae_cfg, volumes=vols, progress=False)
    ae0, _ = model_folder_weights(folder, "autoencoder")
    enc = [k for k in ae0 if k.startswith("encoder.")]
    dec = [k for k in ae0 if k.startswith("decoder.")]
    assert all(torch.equal(ae_state["state_dict"][k], ae0[k]) for k in enc)
    assert any(not torch.equal(ae_state["state_dict"][k], ae0[k]) for k in dec)
    assert ae_state["init_step"] == "tiny 0.1"

    out = package_model(tmp_path / "dec", folder, tmp_path / "model2", name="tiny", version="0.2")
    cfg2 = ModelConfig.load(out)
    assert cfg2.sampling == shipped.sampling  # the packaged UNet's sampling settings travel with it
    assert "decoder fine-tune 3 steps" in cfg2.reference and "UNet of tiny 0.1" in cfg2.reference
    unet2, _ = model_folder_weights(out, "unet")
    assert unet2.keys() == unet0.keys() and all(torch.equal(unet2[k], unet0[k]) for k in unet0)
    brain = synth.load_generator(out, device="cpu").generate(synth.Condition(age=50, sex="F"), seed=0, bf16=False)
    assert brain.image.shape == (80, 96, 80)
    # the UNet run continued from the model packages with the model's sampling settings, not the defaults
    cfg3 = ModelConfig.load(package_model(folder, tmp_path / "ldm2", tmp_path / "model3", name="tiny", version="0.3"))
    assert cfg3.sampling == shipped.sampling and shipped.sampling["guidance_scale"] == 2.0
    assert "from tiny 0.1" in cfg3.reference


def test_packaging_refuses_an_autoencoder_of_another_layout(tmp_path):
    from synth.train.package import package_model

    vols, rows = phantoms(n=8)
    folder = _tiny_packaged_model(tmp_path, vols, rows)
    other = dict(TINY_AE, channels=[8, 8, 8], attention_levels=[False] * 3)
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae8"), steps=1, bf16=False, autoencoder=other),
                      volumes=vols, progress=False)
    with pytest.raises(ValueError, match="not the one the UNet"):
        package_model(tmp_path / "ae8", folder, tmp_path / "bad", name="t", version="0")
    assert not (tmp_path / "bad" / "config.json").exists()


def test_autoencoder_weights_from_a_model_folder_a_run_folder_or_a_checkpoint(tmp_path):
    from synth.train.common import autoencoder_weights, model_folder_weights

    vols, rows = phantoms(n=8)
    folder = _tiny_packaged_model(tmp_path, vols, rows)
    ema = torch.load(tmp_path / "ae" / "last.pt", map_location="cpu", weights_only=False)["ema_state_dict"]
    from_run, from_ckpt = autoencoder_weights(tmp_path / "ae"), autoencoder_weights(tmp_path / "ae" / "last.pt")
    assert all(torch.equal(from_run[k], ema[k].float()) and torch.equal(from_ckpt[k], from_run[k]) for k in ema)
    packaged = autoencoder_weights(folder)
    assert packaged.keys() == model_folder_weights(folder, "autoencoder")[0].keys()
    assert all(v.dtype == torch.float32 for v in packaged.values())
    with pytest.raises(FileNotFoundError, match="no autoencoder at"):
        autoencoder_weights(tmp_path / "nowhere")
    from synth.train.common import autoencoder_config, load_autoencoder_parts

    for where in (tmp_path / "ae", tmp_path / "ae" / "last.pt", folder):  # one read, the same parts
        cfg, weights = load_autoencoder_parts(where)
        assert cfg == autoencoder_config(where)
        ref = autoencoder_weights(where)
        assert weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in ref)
    with pytest.raises(FileNotFoundError, match="no autoencoder"):
        load_autoencoder_parts(tmp_path / "nowhere")


def test_augment_scan_is_mild_deterministic_and_keeps_the_outside_empty():
    from synth.train.augment import AugmentConfig, augment_scan

    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 32)] * 3, indexing="ij"))
    ball = ((g ** 2).sum(0) < 0.6 ** 2).astype(np.float32) * 0.8
    a = augment_scan(ball, np.random.default_rng(3))
    np.testing.assert_array_equal(a, augment_scan(ball, np.random.default_rng(3)))
    assert a.shape == ball.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert not np.array_equal(a, augment_scan(ball, np.random.default_rng(4)))
    assert np.abs(a - ball).max() > 0.1  # it moved the boundary
    # mild: the volume of the ball (its intensity sum, gamma aside) changes by a few per cent at most
    plain = augment_scan(ball, np.random.default_rng(3), AugmentConfig(max_log_gamma=0.0))
    assert abs(plain.sum() / ball.sum() - 1) < 0.12
    assert (plain[g.__abs__().max(0) > 0.85] == 0).all()  # far outside stays empty
    # the defaults warp only: the intensities deep inside are untouched (no gamma) and the ball stays where it
    # was (no rotation, scale or shift; registered scans hardly vary in pose), while the old settings move it
    assert np.median(a[(g ** 2).sum(0) < 0.3 ** 2]) == pytest.approx(0.8, abs=1e-3)
    old = AugmentConfig(max_rotation_deg=3, max_scale=0.03, max_shift=1, max_log_gamma=0.1)

    def centre(x):
        return (np.argwhere(x > 0.4) * 1.0).mean(0)

    shifts = [np.abs(centre(augment_scan(ball, np.random.default_rng(k), c)) - centre(ball)).max()
              for c in (AugmentConfig(), old) for k in range(4)]
    assert max(shifts[:4]) < 0.5 * max(shifts[4:])
    off = AugmentConfig(max_rotation_deg=0, max_scale=0, max_shift=0, max_warp=0, max_log_gamma=0)
    np.testing.assert_allclose(augment_scan(ball, np.random.default_rng(0), off), ball, atol=1e-5)  # the identity
    with pytest.raises(ValueError, match=r"expects an \(X, Y, Z\) volume, got shape \(1, 32, 32, 32\)"):
        augment_scan(ball[None], np.random.default_rng(0))


def test_augment_copies_are_the_same_in_parallel_and_each_copy_has_its_own_generator():
    from synth.train.augment import augment_copies, augment_scan

    vols, _ = phantoms(n=3, size=16)
    serial = list(augment_copies(vols, 3, seed=5))
    assert len(serial) == 3 and all(c.shape == vols.shape and c.dtype == np.float32 for c in serial)
    rng = np.random.default_rng([5, 1, 2])  # copy k: its own generator, over the scans in order
    np.testing.assert_array_equal(serial[2], np.stack([augment_scan(v[0], rng)[None] for v in vols]))
    assert not np.array_equal(serial[0], serial[1])
    parallel = list(augment_copies(vols, 3, seed=5, workers=2))  # spawned processes
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    with pytest.raises(ValueError, match=r"expects \(N, 1, X, Y, Z\) scans, got shape \(3, 16, 16, 16\)"):
        next(augment_copies(vols[:, 0], 1))


def test_diffusion_training_takes_copies_made_beforehand(tmp_path):
    from synth.train.augment import augment_copies

    vols, rows = phantoms(n=8)
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=1, bf16=False,
                                    autoencoder=dict(TINY_AE)), volumes=vols, progress=False)

    def run(name, **kw):
        cfg = LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / name), steps=1,
                             batch_size=2, bf16=False, unet=dict(TINY_UNET), augment=2, seed=1)
        train_diffusion(cfg, rows=rows, volumes=vols, progress=False, **kw)
        return np.load(tmp_path / name / augmented_cache_name(cfg))["latents"]

    made = np.concatenate(list(augment_copies(vols, 2, seed=1)))
    made_latents = run("given", augmented=made)
    np.testing.assert_array_equal(made_latents, run("inside"))
    with pytest.raises(ValueError, match="augmented holds 8 volumes; augment=2 copies of 8 scans make 16"):
        run("short", augmented=made[:8])
    # other augmentation settings: other copies, cached under their own name (a run never mixes them up)
    cfg = LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "given"), steps=2,
                         batch_size=2, bf16=False, unet=dict(TINY_UNET), augment=2, seed=1,
                         augment_options={"max_log_gamma": 0.1})
    gamma_name = augmented_cache_name(cfg)
    assert gamma_name != augmented_cache_name(LDMTrainConfig("", "", "", augment=2, seed=1))
    assert gamma_name == augmented_cache_name(LDMTrainConfig("", "", "", augment=2, seed=1, augment_options={"max_log_gamma": 0.1}))
    # ... and a run trained on one kind of copies does not resume on another, nor on none
    with pytest.raises(ValueError, match=r"trained with augment=2 with \{.*'max_log_gamma': 0.0.*resuming it with augment=2 "
                                         r"with \{.*'max_log_gamma': 0.1"):
        train_diffusion(cfg, rows=rows, volumes=vols, progress=False)
    assert not (tmp_path / "given" / gamma_name).exists()  # refused before any copy was made or encoded
    with pytest.raises(ValueError, match="resuming it with no augmentation"):
        train_diffusion(LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "given"), steps=2,
                                       batch_size=2, bf16=False, unet=dict(TINY_UNET), seed=1), rows=rows, volumes=vols,
                        progress=False)
    cfg.run_dir = str(tmp_path / "gamma")
    train_diffusion(cfg, rows=rows, volumes=vols, progress=False)
    plain = np.load(tmp_path / "gamma" / gamma_name)["latents"]
    assert plain.shape == made_latents.shape and not np.allclose(plain, made_latents)
    cfg.augment_options = {"max_gamma": 0.0}
    cfg.run_dir = str(tmp_path / "typo")
    with pytest.raises(TypeError, match="max_gamma"):
        train_diffusion(cfg, rows=rows, volumes=vols, progress=False)
    assert not (tmp_path / "typo").exists()  # refused before anything was encoded or written


def test_diffusion_training_with_augmented_copies_caches_them_and_resumes(tmp_path):
    vols, rows = phantoms(n=8)
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=2, bf16=False,
                                    autoencoder=dict(TINY_AE)), volumes=vols, progress=False)
    cfg = LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "ldm"), steps=2,
                         batch_size=2, bf16=False, unet=dict(TINY_UNET), augment=2)
    first = train_diffusion(cfg, rows=rows, volumes=vols, progress=False)
    base = np.load(tmp_path / "ldm" / "latents.npz")["latents"]
    aug = np.load(tmp_path / "ldm" / augmented_cache_name(cfg))["latents"]
    assert base.shape[0] == 16 and aug.shape == (32, *base.shape[1:])  # 2 copies x 8 scans x (scan, mirror)
    assert not np.allclose(aug[:16], base)  # the copies are new latents, not the scans again
    assert first["config"]["augment"] == 2
    # the settings as resolved go with the run, and with a model packaged from it
    assert first["model_config"]["augmentation"] == {"copies": 2, "max_rotation_deg": 0.0, "max_scale": 0.0, "max_shift": 0.0,
                                                     "max_warp": 1.5, "warp_spacing": 16, "max_log_gamma": 0.0}
    from synth.models.config import ModelConfig
    from synth.train.package import package_model

    folder = package_model(tmp_path / "ae", tmp_path / "ldm", tmp_path / "model", name="t", version="0")
    assert "UNet 2 steps with 2 augmented copies a scan (max_warp 1.5, warp_spacing 16)" in ModelConfig.load(folder).reference
    # the latent scale is the scans' own, whatever the augmentation
    plain = train_diffusion(LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / "ldm0"),
                                           steps=1, batch_size=2, bf16=False, unet=dict(TINY_UNET)),
                            rows=rows, volumes=vols, progress=False)
    assert first["model_config"]["latent_scale"] == pytest.approx(plain["model_config"]["latent_scale"])
    cfg.steps = 4  # resumes on the cached copies (volumes not needed again)
    cache = tmp_path / "ldm" / augmented_cache_name(cfg)
    stamp = cache.stat().st_mtime_ns
    assert train_diffusion(cfg, rows=rows, volumes=vols, progress=False)["step"] == 4
    assert cache.stat().st_mtime_ns == stamp
    # a checkpoint from before the settings were recorded resumes, with a warning that says it is unchecked
    state = torch.load(tmp_path / "ldm" / "last.pt", weights_only=False)
    del state["model_config"]["augmentation"]
    torch.save(state, tmp_path / "ldm" / "last.pt")
    cfg.steps = 5
    with pytest.warns(UserWarning, match="predates the record of its augmentation settings"):
        assert train_diffusion(cfg, rows=rows, volumes=vols, progress=False)["step"] == 5


def test_gpu_script_refuses_a_negative_number_of_copies(tmp_path, capsys):
    """scripts/train_gpu.py: ``--augment -1`` or ``augment --copies 0`` exit 2 with a one-line reason, before
    anything is unpacked or started."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpu", Path(__file__).resolve().parents[1] / "scripts" / "train_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = ["run", "--pack", str(tmp_path / "pack.xz"), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    for argv, word in ((run + ["--augment", "-1"], "--augment"), (["augment", "--work", str(tmp_path / "w"), "--copies", "0"], "--copies")):
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2
        assert word in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_diffusion_gap_probe_logs_heldout_against_training_error_without_changing_training(tmp_path):
    """``gap_every``: the EMA UNet's denoising error on held-out against training latents goes to gap.csv
    every N steps, once per step across a resume, and the training itself is the same as without it."""
    vols, rows = phantoms(n=8)
    held_vols, held_rows = phantoms(n=3, seed=5)
    train_autoencoder(AETrainConfig(data_dir="", run_dir=str(tmp_path / "ae"), steps=2, bf16=False,
                                    autoencoder=dict(TINY_AE)), volumes=vols, progress=False)

    def cfg(name, steps, **kw):
        return LDMTrainConfig(data_dir="", ae_run=str(tmp_path / "ae"), run_dir=str(tmp_path / name), steps=steps,
                              batch_size=2, bf16=False, unet=dict(TINY_UNET), ckpt_every=1, **kw)

    plain = train_diffusion(cfg("plain", 4), rows=rows, volumes=vols, progress=False)
    probed = train_diffusion(cfg("probed", 3, gap_every=2), rows=rows, volumes=vols, progress=False,
                             heldout_rows=held_rows, heldout_volumes=held_vols)
    probed = train_diffusion(cfg("probed", 4, gap_every=2), rows=rows, volumes=vols, progress=False,
                             heldout_rows=held_rows, heldout_volumes=held_vols)
    assert all(torch.equal(plain["state_dict"][k], v) for k, v in probed["state_dict"].items())
    with open(tmp_path / "probed" / "gap.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert [int(r["step"]) for r in logged] == [2, 4]
    for r in logged:
        for t in (50, 200):
            train, held = float(r[f"train_t{t}"]), float(r[f"heldout_t{t}"])
            assert train > 0 and held > 0 and float(r[f"ratio_t{t}"]) == pytest.approx(held / train, rel=1e-4)
    # the training subjects as their own "held-out" set: the same latents, conditions and noise, ratio 1
    same = train_diffusion(cfg("same", 2, gap_every=2), rows=rows, volumes=vols, progress=False,
                           heldout_rows=rows, heldout_volumes=vols)
    with open(tmp_path / "same" / "gap.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert same["step"] == 2 and float(row["ratio_t50"]) == pytest.approx(1.0) and float(row["ratio_t200"]) == pytest.approx(1.0)
    assert float(logged[0]["ratio_t50"]) != pytest.approx(1.0)  # new brains are not the training ones
    with pytest.raises(ValueError, match="`gap_every` needs held-out subjects"):
        train_diffusion(cfg("none", 2, gap_every=1), rows=rows, volumes=vols, progress=False)
    with pytest.raises(ValueError, match="`gap_every` must be at least 1"):
        cfg("zero", 2, gap_every=0)
