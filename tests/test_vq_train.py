"""VQ training end to end on tiny networks and phantom volumes: resumable runs, codebook monitoring,
validation checkpoints, transformer on the codes, packaging into a loadable generator."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from synth.vq.train import TFTrainConfig, VQTrainConfig, load_vqvae_run, train_transformer, train_vqvae
from synth.vq.testing import tiny_vq_config
from tests.conftest import write_prepared

SIZE = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    data = write_prepared(root, ages=(25, 35, 45, 55, 65, 75, 30, 60, 70), size=SIZE, split="train")
    return data


def vq_cfg(run, data, **kw):
    kw = {"steps": 4, **kw}
    return VQTrainConfig(data_dir=str(data.root), run_dir=str(run), ckpt_every=2, bf16=False, lr=1e-3,
                         kmeans_volumes=3, restart_every=2, vqvae=tiny_vq_config((SIZE,) * 3).vqvae, **kw)


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_vqvae_trains_logs_codebook_usage_and_resumes(prepared, tmp_path):
    run = tmp_path / "vq"
    s = train_vqvae(vq_cfg(run, prepared, steps=2), progress=False)
    assert s["step"] == 2 and (run / "last.pt").is_file()
    s = train_vqvae(vq_cfg(run, prepared, steps=4), progress=False)
    log = rows(run / "losses.csv")
    assert s["step"] == 4 and [int(r["step"]) for r in log] == [1, 2, 3, 4]
    assert all(float(r["perplexity"]) >= 1 and 0 < int(float(r["live_codes"])) <= 16 for r in log)
    assert {"restarted", "commit", "l1"} <= set(log[0])
    model, config = load_vqvae_run(run)
    assert config["num_embeddings"] == 16
    assert model.encode(torch.rand(1, 1, SIZE, SIZE, SIZE)).shape == (1, 8, 8, 8)


def test_validation_measures_reconstruction_in_the_brain_and_keeps_the_best(prepared, tmp_path):
    run = tmp_path / "vq"
    vols = np.stack([prepared.t1(r)[None] for r in prepared.rows[:2]])
    masks = np.stack([prepared.labels(r) > 0 for r in prepared.rows[:2]])
    train_vqvae(vq_cfg(run, prepared, eval_every=2), val=(vols, masks), progress=False)
    val = rows(run / "val.csv")
    assert [int(r["step"]) for r in val] == [0, 2, 4]  # the starting point, then every 2 steps
    assert all(0 < float(r["psnr"]) < 60 and -1 <= float(r["ssim"]) <= 1 for r in val)
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["best_psnr"] == pytest.approx(max(float(r["psnr"]) for r in val), abs=1e-3)


def test_init_from_an_autoencoder_folder_and_missing_one(prepared, tmp_path, tiny_model_dir):
    from synth.models.config import ModelConfig

    ae_kwargs = ModelConfig.load(tiny_model_dir).autoencoder
    cfg = vq_cfg(tmp_path / "vq", prepared, steps=0, init_autoencoder=str(tiny_model_dir))
    cfg.vqvae = dict(cfg.vqvae, autoencoder=ae_kwargs, embedding_dim=ae_kwargs["latent_channels"])
    s = train_vqvae(cfg, progress=False)  # 0 steps: the initial weights
    from safetensors.torch import load_file

    ref = load_file(str(tiny_model_dir / "autoencoder.safetensors"))
    assert all(torch.equal(s["state_dict"][f"ae.{k}"], v.float()) for k, v in ref.items())
    live = s["state_dict"]["quantizer.codebook"]
    assert len(torch.unique(live, dim=0)) == 16  # k-means initialised: distinct codes
    cfg2 = vq_cfg(tmp_path / "vq2", prepared, steps=1, init_autoencoder=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no autoencoder"):
        train_vqvae(cfg2, progress=False)


def test_transformer_trains_on_codes_then_packages_into_a_generator(prepared, tmp_path, monkeypatch):
    import synth
    from synth.generators import available_models, load_generator
    from synth.vq.package import package_vq_model

    vq_run, tf_run = tmp_path / "vq", tmp_path / "tf"
    train_vqvae(vq_cfg(vq_run, prepared), progress=False)
    cfg = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(vq_run), run_dir=str(tf_run), steps=3, batch_size=2,
                        ckpt_every=2, bf16=False, engine="torch",
                        transformer={"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "attention": "linear",
                                     "dropout": 0.0})
    s = train_transformer(cfg, progress=False)
    assert s["step"] == 3 and (tf_run / "codes.npz").is_file()
    codes = np.load(tf_run / "codes.npz")["codes"]
    assert codes.shape == (2 * 9, 512) and codes.max() < 16
    log = rows(tf_run / "losses.csv")
    assert len(log) == 3 and all(0 < float(r["bits_per_code"]) < 8 for r in log)
    cfg.steps = 4
    assert train_transformer(cfg, progress=False)["step"] == 4  # resumed

    models = tmp_path / "models"
    package_vq_model(tf_run, models / "synthbrain-vq-2mm", version="0.0.1-test")
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    assert [(m.name, m.backend) for m in available_models(details=True)] == [("synthbrain-vq-2mm", "vq")]
    gen = load_generator("synthbrain-vq-2mm", device="cpu")
    assert gen.backend == "vq" and gen.config.weights_sha256
    cond = synth.Condition(age=60, sex="F")
    a, b = gen.generate(cond, seed=4), gen.generate(cond, seed=4)
    assert np.array_equal(a.image, b.image) and a.image.shape == (SIZE,) * 3
    assert a.provenance["backend"] == "vq" and "NOT FOR CLINICAL USE" in a.provenance["notice"]


def test_decoder_only_keeps_encoder_and_codebook_and_caches_codes_for_the_transformer(prepared, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from synth.models.config import ModelConfig

    ae_kwargs = ModelConfig.load(tiny_model_dir).autoencoder
    dec_run, tf_run = tmp_path / "dec", tmp_path / "tf"

    def cfg(steps):
        c = vq_cfg(dec_run, prepared, steps=steps, decoder_only=True, init_autoencoder=str(tiny_model_dir))
        c.vqvae = dict(c.vqvae, autoencoder=ae_kwargs, embedding_dim=ae_kwargs["latent_channels"])
        return c

    train_vqvae(cfg(1), progress=False)
    first = torch.load(dec_run / "last.pt", weights_only=False)["state_dict"]
    after = train_vqvae(cfg(3), progress=False)["state_dict"]  # resumed
    ref = load_file(str(tiny_model_dir / "autoencoder.safetensors"))
    for k, v in ref.items():
        if k.startswith(("encoder", "quant_conv_mu")):
            assert torch.equal(after[f"ae.{k}"], v.float()), k
    assert all(torch.equal(first[k], after[k]) for k in first if k.startswith("quantizer."))
    assert not torch.equal(first["ae.decoder.blocks.0.conv.weight"], after["ae.decoder.blocks.0.conv.weight"])
    assert (dec_run / "train_codes.pt").is_file()
    log = rows(dec_run / "losses.csv")
    assert float(log[-1]["restarted"]) == 0 and float(log[-1]["commit"]) == 0
    tcfg = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(dec_run), run_dir=str(tf_run), steps=1, batch_size=2,
                         bf16=False, engine="torch",
                         transformer={"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "attention": "linear",
                                      "dropout": 0.0, "window": "slab"})
    train_transformer(tcfg, progress=False)
    reused = np.load(tf_run / "codes.npz")["codes"]
    vqvae, _ = load_vqvae_run(dec_run)
    from synth.vq.train import encode_codes

    vols = np.stack([prepared.t1(r)[None] for r in prepared.subset("train", labelled=True)])
    assert np.array_equal(reused, encode_codes(vqvae, vols, torch.device("cpu")))


def test_new_transformers_get_the_wavefront_and_a_run_resumes_only_with_its_own_setting(prepared, tmp_path, monkeypatch):
    from synth.cli import main
    from synth.generators import load_generator
    from synth.vq.package import package_vq_model
    from synth.vq.train import DEFAULT_TRANSFORMER

    vq_run, tf_run = tmp_path / "vq", tmp_path / "tf"
    train_vqvae(vq_cfg(vq_run, prepared, steps=1), progress=False)
    assert DEFAULT_TRANSFORMER["wavefront"] is True and DEFAULT_TRANSFORMER["window"] == "slab"
    small = dict(DEFAULT_TRANSFORMER, d_model=16, n_layers=1, n_heads=2, d_ff=32, prior_top=4)
    cfg = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(vq_run), run_dir=str(tf_run), steps=2, batch_size=2,
                        ckpt_every=1, bf16=False, engine="torch", transformer=small)
    state = train_transformer(cfg, progress=False)
    tf = state["model_config"]["transformer"]
    assert tf["wavefront"] is True and tf["window"] == 64 and tf["code_shape"] == [8, 8, 8]
    cfg.steps, cfg.transformer = 3, dict(small, wavefront=False)
    with pytest.raises(ValueError, match="trained with wavefront=True.*fresh --run-dir"):
        train_transformer(cfg, progress=False)  # other inputs on the same weights: refused, not resumed
    cfg.transformer = small
    assert train_transformer(cfg, progress=False)["step"] == 3
    models = tmp_path / "models"
    package_vq_model(tf_run, models / "synthbrain-vq-2mm", version="0.0.1-test")
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(models))
    gen = load_generator("synthbrain-vq-2mm", device="cpu")
    assert gen.config.transformer["wavefront"] is True and gen.transformer.schedule == "wavefront"
    a = gen.generate(__import__("synth").Condition(age=60, sex="F"), seed=4)
    assert "wavefront" in a.provenance["sampler"]
    # no window, no wavefront; --no-wavefront turns it off from the command line
    none_run = tmp_path / "tf-none"
    cfg = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(vq_run), run_dir=str(none_run), steps=1, batch_size=2,
                        bf16=False, engine="torch", transformer=dict(small, window=None))
    assert train_transformer(cfg, progress=False)["model_config"]["transformer"]["wavefront"] is False
    cli_run = tmp_path / "tf-cli"
    assert main(["train-transformer", "--data", str(prepared.root), "--vq-run", str(vq_run), "--run-dir", str(cli_run),
                 "--steps", "1", "--batch-size", "2", "--d-model", "16", "--layers", "1", "--heads", "2",
                 "--engine", "torch", "--no-bf16", "--quiet", "--no-wavefront"]) == 0
    saved = torch.load(cli_run / "last.pt", weights_only=False)["model_config"]["transformer"]
    assert saved["wavefront"] is False and saved["window"] == 64


def test_a_transformer_continues_from_a_packaged_model_on_its_vqvae_and_packages_again(prepared, tmp_path, monkeypatch):
    """`--vq-run` and `--init-from` may name a packaged VQ model folder: the run codes the volumes with that
    model's VQ-VAE, starts from its transformer (architecture, weights and conditioning ranges), and packages
    into a model with the same VQ-VAE weights; a model on another codebook is refused, and so is a bad folder
    on the command line (exit 2 with what was expected)."""
    from safetensors.torch import load_file

    from synth.cli import main
    from synth.vq.package import package_vq_model
    from synth.vq.testing import make_tiny_vq_model

    base = make_tiny_vq_model(tmp_path / "models" / "base-vq", shape=(SIZE,) * 3)
    tf_run = tmp_path / "tf"
    cfg = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(base), run_dir=str(tf_run), steps=1, batch_size=2,
                        ckpt_every=1, bf16=False, engine="torch", lr=0.0, init_from=str(base),
                        transformer={"d_model": 32, "n_layers": 1, "n_heads": 4, "d_ff": 64})  # ignored: the base's
    state = train_transformer(cfg, progress=False)
    start = load_file(str(base / "transformer.safetensors"))
    assert set(state["state_dict"]) == set(start)
    assert all(torch.equal(state["state_dict"][k].float(), v.float()) for k, v in start.items())  # lr 0: the base's weights
    mc = state["model_config"]
    assert mc["vq_checkpoint"] == "vqvae.safetensors" and mc["transformer"]["d_model"] == 16
    base_cfg = __import__("synth.vq.config", fromlist=["VQModelConfig"]).VQModelConfig.load(base)
    assert mc["covariate_ranges"] == base_cfg.covariate_ranges  # the conditioning means what it meant

    cfg.steps, cfg.lr = 3, 1e-3
    assert train_transformer(cfg, progress=False)["step"] == 3  # resumed from its own checkpoint
    out = package_vq_model(tf_run, tmp_path / "models" / "continued-vq", version="0.0.2-test")
    shipped, base_vq = load_file(str(out / "vqvae.safetensors")), load_file(str(base / "vqvae.safetensors"))
    assert all(torch.equal(shipped[k], v) for k, v in base_vq.items())  # as it was: the codes the run saw
    assert "VQ-VAE of tiny-vq-model 0.0.0-test" in json.loads((out / "config.json").read_text())["reference"]
    monkeypatch.setenv("SYNTHBRAIN_MODELS", str(tmp_path / "models"))
    import synth

    brain = synth.load_generator("continued-vq", device="cpu").generate(synth.Condition(age=50, sex="M"), seed=1)
    assert brain.image.shape == (SIZE,) * 3

    other = make_tiny_vq_model(tmp_path / "models" / "other-vq", seed=5, shape=(SIZE,) * 3)
    bad = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(other), run_dir=str(tmp_path / "tf-bad"), steps=1,
                        batch_size=2, bf16=False, engine="torch", init_from=str(base))
    with pytest.raises(ValueError, match="another codebook"):
        train_transformer(bad, progress=False)

    with pytest.raises(FileNotFoundError, match="VQ model folder"):
        train_transformer(TFTrainConfig(data_dir=str(prepared.root), vq_run=str(base), run_dir=str(tmp_path / "tf-none"),
                                        steps=1, bf16=False, engine="torch", init_from=str(tmp_path / "nothing")), progress=False)
    regridded = tmp_path / "models" / "regridded-vq"  # the same codebook, a transformer for another code grid
    shutil.copytree(base, regridded)
    meta = json.loads((regridded / "config.json").read_text())
    meta["transformer"]["code_shape"], meta["transformer"]["seq_len"] = [4, 4, 4], 64
    (regridded / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="grid"):
        train_transformer(TFTrainConfig(data_dir=str(prepared.root), vq_run=str(base), run_dir=str(tmp_path / "tf-grid"),
                                        steps=1, bf16=False, engine="torch", init_from=str(regridded)), progress=False)
    with pytest.raises(ValueError, match="has no checkpoint 'best.pt'"):
        package_vq_model(tf_run, tmp_path / "nowhere", vq_checkpoint="best.pt")

    monkeypatch.chdir(tmp_path)
    for bad in (["--vq-run", "base-vq", "--init-from", str(tmp_path / "nothing")], ["--vq-run", str(tmp_path / "nothing")]):
        code = main(["train-transformer", "--data", str(prepared.root), *bad, "--run-dir", str(tmp_path / "tf-cli"), "--steps", "1"])
        assert code == 2


def test_init_from_keeps_the_base_models_attention_blocks(prepared, tmp_path):
    """A wavefront base model's slab blocks and wavefront inputs are kept, whatever the run's own settings say."""
    from synth.vq.testing import make_tiny_vq_model

    base = make_tiny_vq_model(tmp_path / "wave-vq", shape=(SIZE,) * 3, wavefront=True)
    cfg = TFTrainConfig(data_dir=str(prepared.root), vq_run=str(base), run_dir=str(tmp_path / "tf"), steps=1, batch_size=2,
                        bf16=False, engine="torch", init_from=str(base), transformer={"d_model": 16})  # no window here
    mc = train_transformer(cfg, progress=False)["model_config"]["transformer"]
    assert mc["wavefront"] is True and mc["window"] == (SIZE // 2) ** 2
