"""The MONAI zoo 1 mm model's loader, exercised with its exact configuration at random weights."""

import numpy as np
import pytest
import torch

import synth
from synth.models.networks import build_autoencoder, build_unet, count_parameters
from synth.models.zoo import find_zoo_weights, zoo_config


@pytest.fixture(scope="module")
def zoo_folder(tmp_path_factory):
    cfg = zoo_config()
    torch.manual_seed(0)
    ae, unet = build_autoencoder(cfg.autoencoder), build_unet(cfg.unet)
    assert count_parameters(ae) == 13_766_248  # 13.8 M, as published
    assert 550e6 < count_parameters(unet) < 556e6  # 553 M
    folder = tmp_path_factory.mktemp("zoo")
    (folder / "models").mkdir()
    # fp16 on disk keeps the test's file at 1.1 GB; the loader casts into the fp32 networks.
    torch.save({k: v.half() for k, v in ae.state_dict().items()}, folder / "models" / "autoencoder.pth")
    torch.save({k: v.half() for k, v in unet.state_dict().items()}, folder / "models" / "diffusion_model.pth")
    probe = unet.state_dict()["conv_in.conv.weight"].half().float().clone()
    del ae, unet
    return folder, probe


def test_zoo_model_loads_with_exact_architecture_and_conditioning(zoo_folder):
    folder, probe = zoo_folder
    gen = synth.load_generator(folder, device="cpu")
    assert gen.config.unet["channels"] == [256, 512, 768] and gen.config.unet["in_channels"] == 7
    assert torch.equal(gen.unet.state_dict()["conv_in.conv.weight"], probe)
    assert gen.latent_shape() == (1, 3, 20, 28, 20)
    cond = synth.Condition(age=63, sex="M", volumes={"lateral_ventricles": 0.02, "brain": 0.8})
    v = gen.encode_condition(cond).numpy()[0]
    assert np.allclose(v, [1.0, (63 - 44) / 38, 0.2, 0.8])  # [gender, age, ventricles, brain], no null flag
    z = gen.sample_latent(cond, seed=0, steps=1, guidance_scale=1.0, bf16=False, progress=None)
    assert z.shape == (1, 3, 20, 28, 20) and torch.isfinite(z).all()


def test_zoo_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected models/autoencoder.pth"):
        find_zoo_weights(tmp_path)
