import numpy as np
import pytest
import torch

import synth
from synth import Condition


def test_generate_returns_brain_with_affine_and_provenance(tiny_generator):
    brain = tiny_generator.generate(Condition(age=60, sex="M"), seed=7)
    assert brain.image.shape == (32, 32, 32) and brain.image.dtype == np.float32
    assert 0.0 <= brain.image.min() and brain.image.max() <= 1.0
    assert np.allclose(brain.affine[:3, :3], 2 * np.eye(3))
    prov = brain.metadata()
    assert prov["synthetic"] is True and "NOT FOR CLINICAL USE" in prov["notice"]
    assert prov["model"] == "tiny-test-model" and prov["seed"] == 7 and prov["steps"] == 3
    assert prov["condition"] == {"age": 60.0, "sex": "M", "diagnosis": "CN", "volumes": {}}
    assert set(brain.targets) >= {"brain", "lateral_ventricles", "hippocampus"}


def test_seeded_expectation(tiny_generator):
    """Same model, condition and seed give these exact numbers on CPU (torch 2.13)."""
    brain = tiny_generator.generate(Condition(age=60, sex="M"), seed=7)
    # 0.0: the first voxel lies outside the brain mask (synth.brain.zero_background); it decoded to 0.04403459.
    assert np.allclose(brain.image[16, 16, 14:18], [0.0, 0.64612263, 1.0, 1.0], atol=1e-5)


def test_same_seed_same_brain_other_seed_other_brain(tiny_generator):
    c = Condition(age=70, sex="F", diagnosis="MCI")
    a = tiny_generator.generate(c, seed=3).image
    b = tiny_generator.generate(c, seed=3).image
    other = tiny_generator.generate(c, seed=4).image
    assert np.array_equal(a, b)
    assert np.abs(a - other).mean() > 1e-3


def test_no_global_rng_is_used(tiny_generator):
    c = Condition(age=70, sex="F")
    torch.manual_seed(0)
    a = tiny_generator.generate(c, seed=3).image
    torch.manual_seed(123)
    np.random.seed(5)
    b = tiny_generator.generate(c, seed=3).image
    assert np.array_equal(a, b)


def test_condition_and_guidance_change_the_brain(tiny_generator):
    base = tiny_generator.generate(Condition(age=60, sex="M"), seed=7).image
    older = tiny_generator.generate(Condition(age=80, sex="M", diagnosis="AD"), seed=7).image
    guided = tiny_generator.generate(Condition(age=60, sex="M"), seed=7, guidance_scale=3.0).image
    assert np.abs(base - older).mean() > 1e-3
    assert np.abs(base - guided).mean() > 1e-3


def test_condition_vector_is_scaled_with_presence_flag(tiny_generator):
    v = tiny_generator.encode_condition(Condition(age=55, sex="M")).numpy()[0]
    assert v.shape == (6,)
    assert v[0] == pytest.approx((55 - 20) / 70) and v[1] == 1.0 and v[-1] == 1.0


def test_progress_callback_sees_every_step(tiny_generator):
    seen = []
    tiny_generator.generate(Condition(age=40, sex="F"), seed=1, steps=4, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": -1}, "`seed` must be a non-negative integer"),
        ({"seed": 1.5}, "`seed` must be a non-negative integer"),
        ({"steps": 5000}, "`steps` must be within 1-1000"),
        ({"guidance_scale": -2.0}, "`guidance_scale` must be within 0-20"),
    ],
)
def test_generate_rejects_bad_arguments(tiny_generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_generator.generate(Condition(age=40, sex="F"), **kwargs)


def test_generate_needs_a_condition(tiny_generator):
    with pytest.raises(TypeError, match="must be a synth.Condition"):
        tiny_generator.generate({"age": 40, "sex": "F"})


def test_load_by_name_from_models_dir(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(tiny_model_dir.parent))
    other = tiny_model_dir.parent / "a-segmenter"
    other.mkdir(exist_ok=True)
    (other / "config.json").write_text('{"kind": "segmenter"}')
    assert synth.available_models() == ["tiny-test-model"]
    gen = synth.load_generator("tiny-test-model", device="cpu")
    assert gen.config.name == "tiny-test-model"
    with pytest.raises(FileNotFoundError, match="shipped models: tiny-test-model"):
        synth.load_generator("no-such-model")


def test_pick_device():
    assert synth.pick_device("cpu").type == "cpu"
    assert synth.pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="`device` must be"):
        synth.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            synth.pick_device("cuda")


def test_model_config_cross_checks(tiny_model_dir):
    from synth.models import ModelConfig

    cfg = ModelConfig.load(tiny_model_dir).to_dict()
    cfg["unet"]["in_channels"] = 3
    with pytest.raises(ValueError, match="in_channels must be 8"):
        ModelConfig(**cfg)


def test_covariate_without_a_value_is_named(tiny_model_dir):
    from synth.models import ModelConfig

    cfg = ModelConfig.load(tiny_model_dir)
    cfg.normative = None  # no normative model: volumes must be given explicitly
    nets = synth.load_generator(tiny_model_dir, device="cpu")
    gen = synth.BrainGenerator(cfg, nets.autoencoder, nets.unet, device="cpu")
    with pytest.raises(ValueError, match="model covariate 'brain' has no value"):
        gen.encode_condition(Condition(age=50, sex="F"))
    v = gen.encode_condition(Condition(age=50, sex="F", volumes={"brain": 0.85, "lateral_ventricles": 0.02, "hippocampus": 0.005}))
    assert v.shape == (1, 6)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"conditioning": "film"}, "`conditioning` must be crossattn\\+concat, crossattn or concat"),
        ({"unet_cross_attention_dim": 4}, "cross_attention_dim must be 6"),
    ],
)
def test_model_config_rejects_inconsistent_wiring(tiny_model_dir, change, match):
    from synth.models import ModelConfig

    cfg = ModelConfig.load(tiny_model_dir).to_dict()
    if "conditioning" in change:
        cfg["conditioning"] = change["conditioning"]
    else:
        cfg["unet"]["cross_attention_dim"] = change["unet_cross_attention_dim"]
    with pytest.raises(ValueError, match=match):
        ModelConfig(**cfg)


def test_model_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected config.json"):
        synth.BrainGenerator.from_folder(tmp_path)


def test_brain_save_rejects_other_suffixes(tiny_generator, tmp_path):
    brain = tiny_generator.generate(Condition(age=40, sex="F"), seed=0)
    with pytest.raises(ValueError, match="expected a NIfTI path"):
        brain.save(tmp_path / "brain.png")
    assert list(tmp_path.iterdir()) == []
