import json

import nibabel as nib
import numpy as np
import pytest
import torch

from synth.cli import main
from synth.grid import Grid


def _gen(tiny_model_dir, out, *extra):
    return main(["generate", "--age", "72", "--sex", "F", "--diagnosis", "AD", "--seed", "3", "--out", str(out),
                 "--model", str(tiny_model_dir), "--quiet", *extra])


def test_generate_writes_nifti_and_sidecar(tiny_model_dir, tmp_path):
    out = tmp_path / "brain.nii.gz"
    assert _gen(tiny_model_dir, out) == 0
    img = nib.load(str(out))
    grid = Grid((32, 32, 32), 2.0, (-31, -31, -31))
    assert np.allclose(img.affine, grid.affine) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    descrip = img.header["descrip"].tobytes().decode()
    assert "SYNTHETIC" in descrip and "not for clinical use" in descrip
    meta = json.loads((tmp_path / "brain.json").read_text())
    assert meta["condition"] == {"age": 72.0, "sex": "F", "diagnosis": "AD", "volumes": {}}
    assert meta["seed"] == 3 and meta["model"] == "tiny-test-model" and meta["synth_version"]
    assert "NOT FOR CLINICAL USE" in meta["notice"]


def test_generate_match_volumes_records_the_warp(tiny_model_dir, tmp_path, capsys):
    from synth.anatomy.testing import make_tiny_segmenter

    seg = make_tiny_segmenter(tmp_path / "seg", Grid((32, 32, 32), 2.0, (-31, -31, -31)), steps=5)
    assert _gen(tiny_model_dir, tmp_path / "plain.nii.gz") == 0
    assert _gen(tiny_model_dir, tmp_path / "m.nii.gz", "--match-volumes", "--segmenter", str(seg)) == 0
    assert "volumes matched: " in capsys.readouterr().out
    meta = json.loads((tmp_path / "m.json").read_text())
    vm = meta["volume_matching"]
    assert vm["segmenter"] and set(vm) >= {"structures", "before", "after", "requested", "min_jacobian_per_round"}
    assert [h["command"] for h in meta["history"]][-1] == "match_volumes" and meta["seed"] == 3
    assert "volume_matching" not in json.loads((tmp_path / "plain.json").read_text())
    # a segmenter that is not there: one line, exit 2, nothing written
    assert _gen(tiny_model_dir, tmp_path / "bad.nii.gz", "--match-volumes", "--segmenter", str(tmp_path / "none")) == 2
    assert "no segmenter named or found at" in capsys.readouterr().err
    assert not list(tmp_path.glob("bad*"))


def test_generate_n_brains_with_consecutive_seeds(tiny_model_dir, tmp_path):
    assert _gen(tiny_model_dir, tmp_path / "b.nii.gz", "--n", "2") == 0
    seeds = [json.loads((tmp_path / f"b_{i:03d}.json").read_text())["seed"] for i in range(2)]
    assert seeds == [3, 4]
    a, b = (nib.load(str(tmp_path / f"b_{i:03d}.nii.gz")).get_fdata() for i in range(2))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--age", "200", "--sex", "F"], "expected an age in years within 18-95, got '200'"),
        (["--age", "abc", "--sex", "F"], "expected an age in years"),
            (["--age", "nan", "--sex", "F"], "expected an age in years"),
            (["--age", "inf", "--sex", "F"], "expected an age in years"),
        (["--age", "70", "--sex", "Q"], "expected one of F, M, got 'Q'"),
        (["--age", "70", "--sex", "F", "--diagnosis", "PD"], "expected one of CN, MCI, AD"),
        (["--age", "70", "--sex", "F", "--volume", "hippocampus"], "--volume expects NAME=FRACTION"),
        (["--age", "70", "--sex", "F", "--volume", "hippocampus=0.9"], "fraction of intracranial volume"),
        (["--age", "70", "--sex", "F", "--n", "0"], "expected a number of brains within 1-"),
        (["--age", "70", "--sex", "F", "--seed", "-1"], "expected a seed within 0-"),
            (["--age", "70", "--sex", "F", "--seed", str(2**63)], "expected a seed within 0-"),
            (["--age", "70", "--sex", "F", "--seed", str(2**63 - 1), "--n", "2"], "--seed must be within"),
        (["--age", "70", "--sex", "F", "--steps", "0"], "expected a number of DDIM steps within 1-1000"),
            (["--age", "70", "--sex", "F", "--guidance-scale", "nan"], "expected a guidance scale"),
            (["--age", "70", "--sex", "F", "--volume", "brain=-0.5"], "fraction of intracranial volume"),
            (["--age", "70", "--sex", "F", "--volume", "brain=1e300"], "fraction of intracranial volume"),
            (["--age", "70", "--sex", "F", "--volume", "brain=nan"], "finite number"),
            (["--age", "70", "--sex", "F", "--volume", "cortex=0.4"], "key must be one of"),
            (["--age", "70", "--sex", "F", "--device", "gpu"], "expected auto, cpu, cuda, cuda:N or mps"),
        (["--sex", "F"], "required: --age"),
    ],
)
def test_bad_arguments_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "x.nii.gz"
    code = main(["generate", *argv, "--out", str(out), "--model", str(tiny_model_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("synthbrain: error:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--channels", "0", "16"], "argument --channels: expected a positive integer, got '0'"),
        (["--latent-channels", "x"], "argument --latent-channels: expected a positive integer, got 'x'"),
        (["--adv-weight", "-1"], "argument --adv-weight: expected a number >= 0, got '-1'"),
        (["--adv-start", "1.5"], "argument --adv-start: expected an integer >= 0, got '1.5'"),
        (["--kl-weight", "-0.001"], "argument --kl-weight: expected a number >= 0, got '-0.001'"),
        (["--channels", "16", "24"], "--channels must be multiples of 16 (the GroupNorm groups), got [16, 24]"),
        (["--latent-noise", "0.3"], "--latent-noise needs --decoder-only (the encoder must be frozen), got --latent-noise 0.3"),
        (["--adv-latents", "bank.pt"], "--adv-latents needs --decoder-only and --adv-weight > 0, got --adv-latents bank.pt"),
        (["--decoder-only", "--adv-weight", "0.1", "--adv-latents", "nope.pt"],
         "--adv-latents expects a latent bank (.pt) written by scripts/sample_latents.py, got nope.pt"),
        (["--disc-crop", "16"], "--disc-crop must be at least 24 voxels (the discriminator's smallest input), got 16"),
        (["--snap-every", "0"], "argument --snap-every: expected a positive integer, got '0'"),
        (["--init-from", "nope"], "--init-from expects a training run folder holding last.pt or a model folder "
                                  "(config.json + autoencoder.safetensors), got nope"),
        (["diffusion", "--ae-run", "nope"], "--ae-run expects a training run folder holding last.pt or a model folder "
                                            "(config.json + autoencoder.safetensors), got nope"),
        (["diffusion", "--ae-run", "nope", "--augment", "-1"], "argument --augment: expected"),
        (["diffusion", "--ae-run", "nope", "--snap-every", "0"], "argument --snap-every: expected a positive integer, got '0'"),
        (["diffusion", "--ae-run", "nope", "--gap-every", "0"], "argument --gap-every: expected a positive integer, got '0'"),
    ],
)
def test_bad_training_arguments_exit_2_before_any_run_folder(tmp_path, capsys, argv, message):
    verb = "train-autoencoder"
    if argv[0] == "diffusion":
        verb, argv = "train-diffusion", argv[1:]
    code = main([verb, "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["ae", "ldm", "snapshot"])
def test_package_refuses_what_is_not_a_run_or_model_with_exit_2(tmp_path, capsys, which):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    ae, ldm = str(tmp_path / "run"), str(tmp_path / "run")
    if which == "ae":
        ae = str(tmp_path / "nope")
    elif which == "ldm":
        ldm = str(tmp_path / "nope")
    else:
        ldm = str(tmp_path / "run" / "snaps" / "step_000100.pt")  # a snapshot that was never kept
    code = main(["package", "--ae-run", ae, "--ldm-run", ldm, "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err
    flag = "--ae-run" if which == "ae" else "--ldm-run"
    assert code == 2 and err.count("\n") == 1 and f"{flag} expects" in err and err.rstrip().endswith(ae if which == "ae" else ldm)
    assert not (tmp_path / "model").exists()


def test_train_autoencoder_architecture_and_adversarial_flags_reach_the_run(tmp_path):
    from .conftest import write_prepared

    write_prepared(tmp_path / "data", split="train")
    run = tmp_path / "run"
    code = main(["train-autoencoder", "--run-dir", str(run), "--data", str(tmp_path / "data"), "--steps", "2", "--quiet",
                 "--no-bf16", "--channels", "16", "16", "--latent-channels", "2", "--adv-weight", "0.1",
                 "--kl-weight", "1e-4", "--disc-crop", "32", "--snap-every", "1"])
    assert code == 0
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] == 2 and "discriminator" in state
    assert state["config"]["autoencoder"]["channels"] == [16, 16] and state["config"]["autoencoder"]["latent_channels"] == 2
    assert state["config"]["adv_weight"] == 0.1 and state["config"]["kl_weight"] == 1e-4
    assert state["config"]["disc_crop"] == 32 and state["config"]["snap_every"] == 1
    assert sorted(p.name for p in (run / "snaps").iterdir()) == ["step_000001.pt", "step_000002.pt"]
    # --init-from takes the architecture of the run it starts from.
    assert main(["train-autoencoder", "--run-dir", str(tmp_path / "ft"), "--data", str(tmp_path / "data"), "--steps", "1",
                 "--quiet", "--no-bf16", "--init-from", str(run), "--decoder-only", "--latent-noise", "0.3"]) == 0
    ft = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    assert ft["config"]["autoencoder"]["channels"] == [16, 16] and ft["config"]["decoder_only"]
    assert ft["config"]["latent_noise"] == 0.3


def test_bad_output_suffix_and_overwrite(tiny_model_dir, tmp_path, capsys):
    assert _gen(tiny_model_dir, tmp_path / "x.png") == 2
    assert "expected a NIfTI path" in capsys.readouterr().err
    out = tmp_path / "x.nii.gz"
    assert _gen(tiny_model_dir, out) == 0
    before = out.read_bytes()
    assert _gen(tiny_model_dir, out) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _gen(tiny_model_dir, out, "--force") == 0


def test_unknown_model_and_device(tmp_path, capsys, tiny_model_dir):
    assert main(["generate", "--age", "70", "--sex", "F", "--out", str(tmp_path / "a.nii.gz"), "--model", "nope"]) == 2
    assert "no model named" in capsys.readouterr().err
    assert _gen(tiny_model_dir, tmp_path / "a.nii.gz", "--device", "tpu") == 2
    assert "expected auto, cpu, cuda, cuda:N or mps, got 'tpu'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_training_commands_check_arguments_before_importing_torch(tmp_path):
    """A wrong flag gets its one-line error (exit 2) at once, not after seconds of importing torch and MONAI."""
    import subprocess
    import sys

    for argv, says in ((["train-refiner", "--run", str(tmp_path), "--crop", "10"], "--crop must be at least 34"),
                       (["train-autoencoder", "--run", str(tmp_path), "--disc-crop", "4"], "--disc-crop must be at least 24"),
                       (["train-diffusion", "--run", str(tmp_path), "--ae-run", str(tmp_path / "none")], "--ae-run expects"),
                       (["train-refiner", "--run", str(tmp_path), "--init-disc-from", str(tmp_path)], "--init-disc-from expects")):
        code = f"import sys; from synth.cli import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.stdout.split() == ["2", "False"], (argv[0], r.stdout, r.stderr[-300:])
        assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1
